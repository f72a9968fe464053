"""``elbolab rbm train`` and ``elbolab rbm evaluate``: RBMs by CD/PCD, log-likelihood by AIS."""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path

import torch

from .. import distributed, provenance
from ..contrastive import RBMConfig, load_rbm_run, train_rbm
from ..partition import (
    BETA_SCHEDULES,
    MAX_EXACT_UNITS,
    ais_bracket,
    ais_log_partition,
    exact_log_partition,
    join_estimates,
)
from ..plots import plot_rbm
from ..runs import RunError, read_metrics, write_json
from .flags import Parser, add_flags, config_from, train_from_args
from .report import table

RBM_EVAL = "rbm_eval.json"


def evaluate_rbm_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    num_chains: int = 100,
    num_betas: int = 14_500,
    schedule: str = "sm08",
    seed: int = 0,
    pieces: int = 1,
    progress: bool = True,
) -> dict:
    """Held-out log-likelihood of a trained RBM: exact where enumerable, AIS with a bracket.

    log p(v) = -F(v) - log Z. Forward AIS (base rates from the training split)
    tends to underestimate log Z, so its log-likelihood is optimistic; reverse
    AIS started from training data tends to overestimate it, so its
    log-likelihood is conservative: together, each widened by 3 standard errors
    (reverse AIS from data rather than exact samples is only approximately
    biased high), they bracket the truth.
    Writes ``rbm_eval.json``.

    The chains of each direction are run in ``pieces`` pieces, piece j of the
    forward run seeded ``seed + 2 j``, of the reverse run ``seed + 2 j + 1``;
    under torchrun the pieces are shared among the processes (with one piece,
    the two directions run side by side on two). The numbers depend on
    ``pieces``, not on the number of processes.
    """
    settings, started = provenance.settings(locals()), time.time()
    run_dir = Path(run_dir)
    if not 1 <= pieces <= num_chains:
        raise RunError(f"--pieces must be between 1 and the {num_chains} chains, got {pieces}")
    world = distributed.current()
    config, dataset, rbm = load_rbm_run(run_dir)
    x = dataset.split(split)
    train = dataset.split("train")
    with torch.no_grad():
        mean_neg_free = float(-rbm.free_energy(x).double().mean())
    tic = time.perf_counter()
    ais = {"num_chains": num_chains, "num_betas": num_betas, "schedule": schedule, "data": train}
    sizes = [len(c) for c in torch.tensor_split(torch.arange(num_chains), pieces)]

    def piece(u: int):  # u = 2 j + direction
        ais["num_chains"] = sizes[u // 2]
        return ais_log_partition(rbm, **ais, seed=seed + u, reverse=bool(u % 2))

    done = distributed.map_units(2 * pieces, piece, seed=None, world=world, progress=progress,
                                 desc="AIS runs")  # fmt: skip
    forward, reverse = join_estimates(done[0::2]), join_estimates(done[1::2])
    seconds = time.perf_counter() - tic
    report = {
        "run": str(run_dir),
        "split": split,
        "num_datapoints": int(x.shape[0]),
        "method": f"{config.method}-{config.cd_steps}",
        "hidden": config.hidden,
        "mean_neg_free_energy": mean_neg_free,
        "ais": {
            "log_z": forward.log_z,
            "stderr": forward.stderr,
            "log_likelihood": mean_neg_free - forward.log_z,
        },  # fmt: skip
        "reverse_ais": {
            "log_z": reverse.log_z,
            "stderr": reverse.stderr,
            "log_likelihood": mean_neg_free - reverse.log_z,
        },  # fmt: skip
        "bracket": ais_bracket(mean_neg_free, forward, reverse),
        # Reverse AIS should not fall below forward AIS beyond Monte Carlo error.
        "ordered": reverse.log_z >= forward.log_z - 3 * math.hypot(forward.stderr, reverse.stderr),
        "ais_chains": num_chains,
        "ais_betas": num_betas,
        "ais_schedule": schedule,
        "ais_seconds": seconds,
        "seed": seed,
    }
    if min(rbm.n_visible, rbm.n_hidden) <= MAX_EXACT_UNITS:
        log_z = exact_log_partition(rbm)
        report["exact"] = {"log_z": log_z, "log_likelihood": mean_neg_free - log_z}
    figure = run_dir / "rbm_eval.png"
    report["figure"] = str(figure)
    if pieces > 1:
        report["ais_pieces"] = pieces
    report["provenance"] = provenance.of_run(
        "rbm evaluate", rbm, config, settings=settings, seed=seed, started=started,
        world_size=world.size, datapoints=provenance.datapoints(x, split=split, total=len(x)),
    )  # fmt: skip

    def write() -> None:
        plot_rbm(read_metrics(run_dir), forward.final_states, figure)
        write_json(run_dir / RBM_EVAL, report)

    distributed.on_main(world, write)
    return report


def format_rbm_report(report: dict) -> str:
    """The table printed by ``elbolab rbm evaluate``."""
    lines = [
        f"{report['run']}: RBM {report['hidden']} hidden, {report['method']}, "
        f"{report['split']} split ({report['num_datapoints']} datapoints)",
    ]
    rows = [("exact", report["exact"]["log_z"], 0.0, report["exact"]["log_likelihood"])]
    rows = rows if "exact" in report else []
    for name, key in (("AIS", "ais"), ("reverse AIS", "reverse_ais")):
        rows.append((name, report[key]["log_z"], report[key]["stderr"],
                     report[key]["log_likelihood"]))  # fmt: skip
    columns = [("method", "<14"), ("log Z", ">12.3f"), ("MC s.e.", ">9.3f"), ("log p(v)", ">12.3f")]
    lines += table(columns, rows)
    low, high = report["bracket"]
    lines.append(
        f"bracket (3 s.e. at each end): {low:.3f} <= log p(v) <= {high:.3f} nats "
        f"({report['ais_chains']} chains, "
        f"{report['ais_betas']} inverse temperatures ({report.get('ais_schedule', 'linear')}), "
        f"{report['ais_seconds']:.1f} s)"
    )
    if not report.get("ordered", True):
        lines.append(
            "note: reverse AIS from data gave a log Z more than 3 s.e. below forward AIS; the "
            "data are not close to model samples, so the bracket is the union of both intervals"
        )
    if "figure" in report:
        lines.append(f"figure: {report['figure']}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    rbm = sub.add_parser("rbm", help="RBM energy models: train with CD/PCD, evaluate log Z")
    rbm_sub = rbm.add_subparsers(
        dest="rbm_command", required=True, metavar="COMMAND", parser_class=Parser
    )
    p = rbm_sub.add_parser("train", help="train an RBM with CD-k or PCD-k")
    p.add_argument("--data", choices=("digits", "binarized-mnist"), help="default digits")
    add_flags(p, "data_path")
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
    add_flags(p, "seed", seed=None, seed_shown=0)
    p.add_argument("--sparse-kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="run the products with a binary factor over its nonzeros, in C built on "
                   "first use; default: when the data are at most 25%% ones and a C compiler "
                   "works")  # fmt: skip
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out; a new --epochs also stretches the linear "
                   "learning-rate decay over the new total")  # fmt: skip
    add_flags(p, "overwrite", "no_progress")
    p.set_defaults(func=run_train, shared=True)

    p = rbm_sub.add_parser("evaluate", help="log-likelihood: exact, AIS and reverse AIS")
    p.add_argument("run", help="run directory")
    add_flags(p, "split")
    p.add_argument("--chains", type=int, default=100, help="AIS chains (default 100)")
    p.add_argument(
        "--betas",
        type=int,
        default=14500,
        help="inverse temperatures (default 14500, as Salakhutdinov & Murray 2008)",
    )
    p.add_argument("--schedule", choices=BETA_SCHEDULES, default="sm08",
                   help="spacing of the temperatures: sm08 (denser near 1, the paper's) "
                   "or linear (default sm08)")  # fmt: skip
    p.add_argument("--pieces", type=int, default=1,
                   help="run each direction's chains in this many pieces, shared among the "
                   "processes of a torchrun job (default 1)")  # fmt: skip
    add_flags(p, "seed", "no_progress")
    p.set_defaults(func=run_evaluate, shared=True)


def run_train(args: argparse.Namespace) -> int:
    config = config_from(args, RBMConfig())
    train = functools.partial(train_rbm, sparse_kernels=args.sparse_kernels)
    last = train_from_args(train, config, args)
    if not last:  # another rank than 0 of a torchrun job
        return 0
    exact = last.get("exact_log_likelihood")
    print(
        f"trained {last['epoch']} epochs ({last['method']}) in {last['elapsed']:.1f} s: "
        f"held-out reconstruction error {last['reconstruction_error']:.3f}, "
        f"pseudo-log-likelihood {last['pseudo_log_likelihood']:.3f}"
        + (f", exact log-likelihood {exact:.3f}" if exact is not None else "")
        + (f"; {last['products']} products" if "products" in last else "")
        + f"; run in {args.out}"
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    report = evaluate_rbm_run(
        args.run,
        split=args.split,
        num_chains=args.chains,
        num_betas=args.betas,
        schedule=args.schedule,
        seed=args.seed,
        pieces=args.pieces,
        progress=not args.no_progress,
    )
    if distributed.current().is_main:
        print(format_rbm_report(report))
    return 0
