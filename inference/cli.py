"""The ``elbolab`` command: train, evaluate, demo.

User mistakes (bad flags, missing files, bad data, a diverged run) end with a
one-line ``elbolab: error: ...`` message and a non-zero exit status, never a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .data import DATASETS, DataError
from .objectives import OBJECTIVES
from .runs import RunError, TrainConfig, read_metrics

USER_ERRORS = (DataError, RunError)
# inference.partition.BETA_SCHEDULES, written out so that the CLI starts without Pyro (tested)
AIS_SCHEDULES = ("sm08", "linear")


def _int_list(text: str, *, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise argparse.ArgumentTypeError(f"expected {kind} integers, got {text!r}")
    return values


def _seed_list(text: str) -> list[int]:
    return _int_list(text, minimum=0)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from ppl_models import MODELS

    p.add_argument("--model", choices=MODELS, help="model (default vae)")
    p.add_argument("--data", choices=DATASETS, help="data set (default digits)")
    p.add_argument("--data-path", help="binarized MNIST .npz or .amat folder (or ELBOLAB_DATA)")
    p.add_argument("--objective", choices=OBJECTIVES, help="training objective (default iwae)")
    p.add_argument("--num-particles", type=int, help="K, particles per datapoint (default 5)")
    p.add_argument("--epochs", type=int, help="epochs (default 20)")
    p.add_argument("--batch-size", type=int, help="minibatch size (default 128)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--hidden", type=_int_list, help="hidden widths, e.g. 200,200")
    p.add_argument("--z-dim", type=int, help="latent dimension")
    p.add_argument("--activation", help="hidden nonlinearity (default tanh)")
    p.add_argument("--guide-type", choices=("exact", "diagonal"), help="linear-gaussian guide")
    p.add_argument("--layers", type=int, help="hvae: stochastic layers of the encoder (default 2)")
    p.add_argument(
        "--corruption", help="hvae: fixed first layer, salt-pepper:P, dropout:P or gaussian:S"
    )
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _config_from(args: argparse.Namespace, config):
    """``config`` with every field that was given on the command line replaced."""
    for field in dataclasses.fields(config):
        value = getattr(args, field.name, None)
        if value is not None:
            setattr(config, field.name, value)
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from .svi import train

    config = _config_from(args, TrainConfig())
    train(config, args.out, resume=args.resume, progress=not args.no_progress)
    last = read_metrics(args.out)[-1]
    heldout = next(k for k in last if k.endswith("_elbo"))
    print(
        f"trained {last['epoch']} epochs in {last['elapsed']:.1f} s: training bound "
        f"{last['train_bound']:.3f}, {heldout.replace('_', ' ')} {last[heldout]:.3f} nats; "
        f"run in {args.out}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run, format_report

    report = evaluate_run(
        args.run,
        ks=args.k,
        split=args.split,
        seed=args.seed,
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        progress=not args.no_progress,
    )
    print(format_report(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run, format_report
    from .plots import plot_images, plot_iwae_ladder, plot_training
    from .runs import load_run
    from .svi import train

    tic = time.perf_counter()
    out = Path(args.out)
    if (out / "config.json").exists():
        if not args.overwrite:
            raise RunError(f"{out} already holds a run; pass --overwrite or another --out")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise RunError(f"{out} exists and is not a run directory; choose another --out")
    config = TrainConfig(
        model="vae", data="digits", objective="iwae", num_particles=5,
        epochs=args.epochs, batch_size=128, seed=args.seed,
    )  # fmt: skip
    print(f"elbolab demo: VAE on digits, IWAE objective with K=5, {args.epochs} epochs")
    train(config, out, progress=not args.no_progress)
    report = evaluate_run(out, ks=(1, 10, 100, 1000), split="test", seed=args.seed,
                          progress=not args.no_progress)  # fmt: skip
    print(format_report(report))
    _, dataset, model = load_run(out)
    x = dataset.split("test")[:10]
    plots = [
        plot_iwae_ladder(report, out / "iwae_ladder.png"),
        plot_training(read_metrics(out), out / "training.png"),
        plot_images(
            [("data", x), ("reconstruction", model.reconstruct(x))], out / "reconstructions.png"
        ),  # fmt: skip
        plot_images([("samples", model.sample(10))], out / "samples.png"),
    ]
    print("plots: " + ", ".join(str(p) for p in plots))
    print(f"demo finished in {time.perf_counter() - tic:.1f} s")
    return 0


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other user mistake."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .reference import diagnose_run, format_diagnose

    report = diagnose_run(
        args.run,
        points=args.points,
        indices=args.indices,
        split=args.split,
        num_chains=args.chains,
        num_samples=args.samples,
        warmup_steps=args.warmup,
        num_particles=args.num_particles,
        seed=args.seed,
        progress=not args.no_progress,
        jit=args.jit,
    )
    print(format_diagnose(report))
    print(f"written {args.run}/diagnose.json, diagnose.nc, diagnose_pairs.png")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_runs, format_compare

    result = compare_runs(args.runs, out=args.out, seed=args.seed)
    print(format_compare(result))
    print(f"written {args.out}/compare.json, compare.png")
    return 0


def cmd_rbm_train(args: argparse.Namespace) -> int:
    from .contrastive import RBMConfig, train_rbm

    config = _config_from(args, RBMConfig())
    train_rbm(config, args.out, resume=args.resume, progress=not args.no_progress)
    last = read_metrics(args.out)[-1]
    exact = last.get("exact_log_likelihood")
    print(
        f"trained {last['epoch']} epochs ({last['method']}) in {last['elapsed']:.1f} s: "
        f"held-out reconstruction error {last['reconstruction_error']:.3f}, "
        f"pseudo-log-likelihood {last['pseudo_log_likelihood']:.3f}"
        + (f", exact log-likelihood {exact:.3f}" if exact is not None else "")
        + f"; run in {args.out}"
    )
    return 0


def cmd_rbm_evaluate(args: argparse.Namespace) -> int:
    from .contrastive import evaluate_rbm_run, format_rbm_report

    report = evaluate_rbm_run(
        args.run,
        split=args.split,
        num_chains=args.chains,
        num_betas=args.betas,
        schedule=args.schedule,
        seed=args.seed,
    )
    print(format_rbm_report(report))
    return 0


def cmd_gaps(args: argparse.Namespace) -> int:
    from .gaps import format_gaps, gaps_run

    report = gaps_run(
        args.run, split=args.split, limit=args.limit, num_particles=args.k,
        inner_samples=args.inner_samples, marg_particles=args.marg_particles,
        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    print(format_gaps(report))
    print(f"written {args.run}/gaps.json, gaps.png")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import format_experiment, stochastic_layers

    result = stochastic_layers(
        out=args.out, data=args.data, data_path=args.data_path, objective=args.objective,
        num_particles=args.num_particles, epochs=args.epochs, seeds=args.seeds,
        hidden=args.hidden, z_dim=args.z_dim, eval_particles=args.k,
        inner_samples=args.inner_samples, limit=args.limit, progress=not args.no_progress,
    )  # fmt: skip
    print(format_experiment(result))
    print(f"written {args.out}/experiment.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="elbolab",
        description="Train Pyro models and measure their bounds: ELBO, IWAE-K, log p(x).",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    p = sub.add_parser("train", help="train a model with SVI into a run directory")
    _add_train_flags(p)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="ELBO, IWAE-k and log p(x) of a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--k", type=_int_list, default=[1, 10, 100, 1000], help="e.g. 1,10,100,1000")
    p.add_argument("--split", default="test", help="data split (default test)")
    p.add_argument("--batch-size", type=int, default=100, help="datapoints per pass")
    p.add_argument("--limit", type=int, help="evaluate only the first N datapoints")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("gaps", help="log p(x), L_marg, L_aux, L_h and every gap, with errors")
    p.add_argument("run", help="run directory")
    p.add_argument("--split", default="test", help="data split (default test)")
    p.add_argument("--limit", type=int, help="only the first N datapoints")
    p.add_argument("--k", type=int, default=1000, help="particles for log p(x) (default 1000)")
    p.add_argument("--inner-samples", type=_int_list, default=[1, 10, 100],
                   help="S for the L_marg estimate (default 1,10,100)")  # fmt: skip
    p.add_argument("--marg-particles", type=int, default=10, help="outer draws for L_marg")
    p.add_argument("--batch-size", type=int, default=100, help="datapoints per pass")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_gaps)

    p = sub.add_parser("experiment", help="experiments; stochastic-layers: L = 1, 2, 3, denoising")
    p.add_argument("name", choices=("stochastic-layers",), help="which experiment")
    p.add_argument("--out", default="runs/stochastic-layers", help="folder for the runs")
    p.add_argument("--data", choices=("digits", "binarized-mnist"), default="digits")
    p.add_argument("--data-path", help="binarized MNIST .npz or .amat folder")
    p.add_argument("--objective", choices=OBJECTIVES, default="iwae")
    p.add_argument("--num-particles", type=int, default=5, help="K in training (default 5)")
    p.add_argument("--epochs", type=int, default=100, help="epochs per run (default 100)")
    p.add_argument("--seeds", type=_seed_list, default=[0, 1, 2], help="default 0,1,2")
    p.add_argument("--hidden", type=_int_list, help="hidden widths")
    p.add_argument("--z-dim", type=int, help="latent dimension")
    p.add_argument("--k", type=int, default=1000, help="particles for the bounds")
    p.add_argument("--inner-samples", type=_int_list, default=[1, 10, 100])
    p.add_argument("--limit", type=int, help="evaluate the first N test datapoints")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("diagnose", help="NUTS reference posteriors vs the guide, with k-hat")
    p.add_argument("run", help="run directory")
    p.add_argument("--points", type=int, default=5, help="datapoints to diagnose (default 5)")
    p.add_argument("--indices", type=_int_list, help="datapoint indices instead of --points")
    p.add_argument("--split", default="test", help="data split (default test)")
    p.add_argument("--chains", type=int, default=4, help="NUTS chains (default 4)")
    p.add_argument("--samples", type=int, default=500, help="draws per chain (default 500)")
    p.add_argument("--warmup", type=int, default=500, help="warm-up steps (default 500)")
    p.add_argument("--num-particles", type=int, default=5000, help="K for k-hat (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--jit",
        action="store_true",
        help="trace NUTS's potential with Pyro's JIT (about 1.6x faster on MNIST)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("compare", help="bounds, k-hat and active units of several runs")
    p.add_argument("runs", nargs="+", help="run directories, each evaluated already")
    p.add_argument("--out", default="runs/compare", help="folder for compare.json/png")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_compare)

    rbm = sub.add_parser("rbm", help="RBM energy models: train with CD/PCD, evaluate log Z")
    rbm_sub = rbm.add_subparsers(dest="rbm_command", required=True, metavar="COMMAND",
                                 parser_class=_Parser)  # fmt: skip
    p = rbm_sub.add_parser("train", help="train an RBM with CD-k or PCD-k")
    p.add_argument("--data", choices=("digits", "binarized-mnist"), help="default digits")
    p.add_argument("--data-path", help="binarized MNIST .npz or .amat folder")
    p.add_argument("--hidden", type=int, help="hidden units (default 20)")
    p.add_argument("--method", choices=("cd", "pcd"), help="default pcd")
    p.add_argument("--cd-steps", type=int, help="Gibbs steps per update, k (default 1)")
    p.add_argument("--epochs", type=int, help="epochs (default 30)")
    p.add_argument("--batch-size", type=int, help="minibatch size (default 20)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.05)")
    p.add_argument("--momentum", type=float, help="momentum (default 0.5)")
    p.add_argument("--weight-decay", type=float, help="L2 on W (default 1e-4)")
    p.add_argument("--lr-schedule", choices=("constant", "linear"),
                   help="linear: decay to 0 over the epochs (default), or constant")  # fmt: skip
    p.add_argument("--train-limit", type=int, help="train on the first N training images")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out; a new --epochs also stretches the linear "
                   "learning-rate decay over the new total")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_rbm_train)
    p = rbm_sub.add_parser("evaluate", help="log-likelihood: exact, AIS and reverse AIS")
    p.add_argument("run", help="run directory")
    p.add_argument("--split", default="test", help="data split (default test)")
    p.add_argument("--chains", type=int, default=100, help="AIS chains (default 100)")
    p.add_argument(
        "--betas",
        type=int,
        default=14500,
        help="inverse temperatures (default 14500, as Salakhutdinov & Murray 2008)",
    )
    p.add_argument("--schedule", choices=AIS_SCHEDULES, default="sm08",
                   help="spacing of the temperatures: sm08 (denser near 1, the paper's) "
                   "or linear (default sm08)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_rbm_evaluate)

    p = sub.add_parser("demo", help="train on digits, evaluate, and plot (about a minute)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--epochs", type=int, default=150, help="epochs (default 150)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``elbolab`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .svi import TrainingDiverged

    try:
        return args.func(args)
    except (*USER_ERRORS, TrainingDiverged) as err:
        print(f"elbolab: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("elbolab: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
