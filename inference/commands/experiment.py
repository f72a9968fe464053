"""``elbolab experiment stochastic-layers``: do more stochastic layers tighten the bound.

Trains encoders with L = 1, 2, 3 stochastic layers and the denoising variant
(a fixed corruption as the first layer) with the same data, objective,
budget and seeds, measures every bound with ``gaps_run``, and reports means
and standard errors across seeds. Whatever the numbers say is the answer.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..bounds import summary
from ..objectives import OBJECTIVES
from ..runs import (
    CONFIG,
    RunError,
    TrainConfig,
    config_differences,
    load_checkpoint,
    mark_folder,
    read_config,
    write_json,
)
from ..svi import train
from .flags import add_flags, int_list, nonnegative_list
from .gaps import gaps_run

ACROSS_SEEDS = "across seeds (std / sqrt(seeds))"

VARIANTS = {
    "L=1": dict(layers=1),
    "L=2": dict(layers=2),
    "L=3": dict(layers=3),
    "denoising (L=2)": dict(layers=2, corruption="salt-pepper:0.1"),
}
COLUMNS = {
    "log p(x)": lambda r: r["bounds"]["log_px"]["mean"],
    "L_marg": lambda r: _marg(r),
    "L_aux": lambda r: r["bounds"]["l_aux"]["mean"],
    "L_h": lambda r: r["bounds"]["l_h"]["mean"],
    "I(z;h|x)": lambda r: _marg(r) - r["bounds"]["l_h"]["mean"],
    "KL gap": lambda r: r["bounds"]["log_px"]["mean"] - _marg(r),
    "amortisation": lambda r: r.get("cremer", {}).get("amortization_gap", {}).get("mean", math.nan),
}


def _marg(report: dict) -> float:
    s = max(report["inner_samples"])
    return report["bounds"][f"l_marg[{s}]"]["mean"]


def _across_seeds(values: list[float]) -> dict:
    n = len(values)
    stderr = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return summary(float(np.mean(values)), stderr, ACROSS_SEEDS)


def ensure_trained(config: TrainConfig, run: Path, *, progress: bool) -> None:
    """Train ``config`` into ``run``, or reuse the run there if it is this configuration.

    A run of the same configuration with fewer epochs is continued (``--resume``);
    one of another configuration, or with more epochs, is an error: an
    experiment never mixes runs of different settings.
    """
    if not (run / CONFIG).exists():
        train(config, run, progress=progress)
        return
    detail = config_differences(read_config(run), config, ignore=("epochs", "device"))
    if detail:
        raise RunError(
            f"{run} holds a run of another configuration ({detail}); choose another --out "
            "for this experiment"
        )
    done = load_checkpoint(run)["epoch"]
    if done > config.epochs:
        raise RunError(
            f"{run} was trained for {done} epochs, the experiment asks for {config.epochs}; "
            "choose another --out or --epochs"
        )
    if done < config.epochs:
        train(config, run, resume=True, progress=progress)


def stochastic_layers(
    *,
    out: str | Path,
    data: str = "digits",
    data_path: str | None = None,
    objective: str = "iwae",
    num_particles: int = 5,
    epochs: int = 100,
    seeds: Sequence[int] = (0, 1, 2),
    hidden: list[int] | None = None,
    z_dim: int | None = None,
    eval_particles: int = 1000,
    inner_samples: Sequence[int] = (1, 10, 100),
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Run the experiment; write ``experiment.json`` in ``out`` and return it."""
    out = Path(out)
    mark_folder(out, "experiment")
    tic = time.perf_counter()
    rows: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in seeds:
        for name, options in VARIANTS.items():
            tag = "denoising" if "corruption" in options else f"L{options['layers']}"
            run = out / f"{tag}-seed{seed}"
            config = TrainConfig(
                model="hvae", data=data, data_path=data_path, objective=objective,
                num_particles=num_particles, epochs=epochs, seed=seed, hidden=hidden,
                z_dim=z_dim, **options,
            )  # fmt: skip
            ensure_trained(config, run, progress=progress)
            report = gaps_run(
                run, limit=limit, num_particles=eval_particles, inner_samples=inner_samples,
                seed=seed, progress=False,
            )  # fmt: skip
            rows[name].append({column: fn(report) for column, fn in COLUMNS.items()})
    table = {
        name: {column: _across_seeds([r[column] for r in runs]) for column in COLUMNS}
        for name, runs in rows.items()
    }
    result = {
        "data": data,
        "objective": objective,
        "num_particles": num_particles,
        "epochs": epochs,
        "seeds": list(seeds),
        "eval_particles": eval_particles,
        "inner_samples": list(inner_samples),
        "table": table,
        "per_seed": rows,
        "seconds": time.perf_counter() - tic,
    }
    write_json(out / "experiment.json", result)
    return result


def format_experiment(result: dict) -> str:
    """The table: mean +- standard error across seeds, in nats."""
    header = f"{'encoder':<17}" + "".join(f"{c:>17}" for c in COLUMNS)
    lines = [
        f"{result['data']}, {result['objective']} K={result['num_particles']}, "
        f"{result['epochs']} epochs, seeds {result['seeds']}; bounds by gaps with "
        f"K={result['eval_particles']}, S={max(result['inner_samples'])} "
        f"({result['seconds'] / 60:.1f} min); mean +- standard error across seeds",
        header,
    ]
    for name, row in result["table"].items():
        cells = []
        for column in COLUMNS:
            m, s = row[column]["mean"], row[column]["stderr"]
            cells.append(f"{'n/a':>17}" if math.isnan(m) else f"{m:>9.2f} +- {s:<5.2f}")
        lines.append(f"{name:<17}" + "".join(cells))
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="experiments; stochastic-layers: L = 1, 2, 3, denoising")
    p.add_argument("name", choices=("stochastic-layers",), help="which experiment")
    p.add_argument("--out", default="runs/stochastic-layers", help="folder for the runs")
    p.add_argument("--data", choices=("digits", "binarized-mnist"), default="digits")
    add_flags(p, "data_path")
    p.add_argument("--objective", choices=OBJECTIVES, default="iwae")
    p.add_argument("--num-particles", type=int, default=5, help="K in training (default 5)")
    p.add_argument("--epochs", type=int, default=100, help="epochs per run (default 100)")
    p.add_argument("--seeds", type=nonnegative_list, default=[0, 1, 2], help="default 0,1,2")
    p.add_argument("--hidden", type=int_list, help="hidden widths")
    p.add_argument("--z-dim", type=int, help="latent dimension")
    p.add_argument("--k", type=int, default=1000, help="particles for the bounds")
    p.add_argument("--inner-samples", type=int_list, default=[1, 10, 100])
    add_flags(p, "limit", "no_progress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = stochastic_layers(
        out=args.out, data=args.data, data_path=args.data_path, objective=args.objective,
        num_particles=args.num_particles, epochs=args.epochs, seeds=args.seeds,
        hidden=args.hidden, z_dim=args.z_dim, eval_particles=args.k,
        inner_samples=args.inner_samples, limit=args.limit, progress=not args.no_progress,
    )  # fmt: skip
    print(format_experiment(result))
    print(f"written {args.out}/experiment.json")
    return 0
