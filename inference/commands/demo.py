"""``elbolab demo``: the whole loop on the embedded digits data (train, evaluate, plot)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..plots import objective_label, plot_images, plot_iwae_ladder, plot_training
from ..runs import TrainConfig, load_run, read_metrics
from ..svi import train
from .evaluate import evaluate_run, format_report
from .flags import add_flags, train_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train on digits, evaluate, and plot (about a minute)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--epochs", type=int, default=150, help="epochs (default 150)")
    add_flags(p, "seed")
    add_flags(p, "overwrite", "no_progress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tic = time.perf_counter()
    out = Path(args.out)
    config = TrainConfig(
        model="vae", data="digits", objective="iwae", num_particles=5,
        epochs=args.epochs, batch_size=128, seed=args.seed,
    )  # fmt: skip
    print(f"elbolab demo: VAE on digits, IWAE objective with K=5, {args.epochs} epochs")
    train_from_args(train, config, args)
    report = evaluate_run(out, ks=(1, 10, 100, 1000), split="test", seed=args.seed,
                          progress=not args.no_progress)  # fmt: skip
    print(format_report(report))
    _, dataset, model = load_run(out)
    x = dataset.split("test")[:10]
    trained = objective_label(config.objective, config.num_particles)
    plots = [
        plot_iwae_ladder(report, out / "iwae_ladder.png"),
        plot_training(read_metrics(out), out / "training.png", objective=trained),
        plot_images(
            [("data", x), ("reconstruction", model.reconstruct(x))], out / "reconstructions.png"
        ),  # fmt: skip
        plot_images([("samples", model.sample(10))], out / "samples.png"),
    ]
    print("plots: " + ", ".join(str(p) for p in plots))
    print(f"demo finished in {time.perf_counter() - tic:.1f} s")
    return 0
