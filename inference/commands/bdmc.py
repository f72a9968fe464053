"""``elbolab bdmc``: how far AIS is from log p(x), measured on data simulated from the model.

For each number of temperatures: forward AIS (a stochastic lower bound on
log p(x)) and reverse AIS from the exact posterior sample (a stochastic upper
bound) on the same simulated datapoints; the gap between them bounds the
error of both (Grosse et al. 2015, Wu et al. 2017). Writes ``bdmc.json`` and
``bdmc.png`` (the sandwich closing as the temperatures grow).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import pyro

from .. import provenance
from ..ais import SCHEDULES, annealing_pair, bdmc, bdmc_summary
from ..inspection import PairError
from ..plots import plot_bdmc
from ..runs import RunError, load_run, write_json
from .flags import AIS_COMPILE_HELP, add_flags, int_list
from .report import table

BDMC = "bdmc.json"


def bdmc_run(
    run_dir: str | Path,
    *,
    points: int = 100,
    temperatures: Sequence[int] = (100, 1000),
    num_chains: int = 16,
    leapfrog_steps: int = 10,
    schedule: str = "sigmoid",
    split: str = "test",
    seed: int = 0,
    progress: bool = True,
    compile: bool | None = None,
) -> dict:
    """BDMC on ``points`` datapoints simulated from a trained run, for each schedule length."""
    settings, started = provenance.settings(locals()), time.time()
    run_dir = Path(run_dir)
    if points < 1 or num_chains < 1 or leapfrog_steps < 1:
        raise RunError("--points, --chains and --leapfrog must be >= 1")
    config, dataset, model = load_run(run_dir)
    model.requires_grad_(False)  # HMC needs gradients in z only
    template = dataset.split(split)
    if points > template.shape[0]:
        raise RunError(f"--points {points} is more than the {template.shape[0]} of the split")
    rows = []
    for temps in sorted(set(temperatures)):
        pyro.set_rng_seed(seed)  # the same simulated data for every schedule length
        tic = time.perf_counter()
        try:
            result = bdmc(
                *annealing_pair(model), template, num_points=points, num_chains=num_chains,
                num_temperatures=temps, leapfrog_steps=leapfrog_steps, schedule=schedule,
                progress=progress, compile=compile,
            )  # fmt: skip
        except ValueError as err:
            detail = err.for_command() if isinstance(err, PairError) else str(err)
            raise RunError(f"bdmc: {detail}") from None
        rows.append({"temperatures": temps, **bdmc_summary(result),
                     "seconds": time.perf_counter() - tic})  # fmt: skip
    report = {
        "run": str(run_dir),
        "model": config.model,
        "points": points,
        "num_chains": num_chains,
        "leapfrog_steps": leapfrog_steps,
        "schedule": schedule,
        "seed": seed,
        "rows": rows,
    }
    report["provenance"] = provenance.of_run("bdmc", model, config, settings=settings, seed=seed,
                                             started=started)  # fmt: skip
    write_json(run_dir / BDMC, report)
    plot_bdmc(report, run_dir / "bdmc.png")
    return report


def format_bdmc(report: dict) -> str:
    """The sandwich per schedule length, as printed by ``elbolab bdmc``."""
    lines = [
        f"{report['run']}: BDMC on {report['points']} datapoints simulated from the model, "
        f"{report['num_chains']} chains, {report['leapfrog_steps']} leapfrog steps, "
        f"{report['schedule']} schedule (nats per datapoint, +- Monte Carlo s.e.)"
    ]
    columns = [
        ("temperatures", ">12"), ("lower (AIS)", ">13.3f"), ("+-", ">7.3f"),
        ("upper (rev.)", ">13.3f"), ("+-", ">7.3f"), ("gap", ">9.3f"), ("accept", ">8.2f"),
        ("seconds", ">9.1f"),
    ]  # fmt: skip
    lines += table(
        columns,
        (
            (r["temperatures"], r["lower"]["mean"], r["lower"]["stderr"], r["upper"]["mean"],
             r["upper"]["stderr"], r["gap"]["mean"], r["acceptance_forward"], r["seconds"])
            for r in report["rows"]
        ),
    )  # fmt: skip
    last = report["rows"][-1]["gap"]
    lines.append(
        f"AIS with {report['rows'][-1]['temperatures']} temperatures is within "
        f"{last['mean']:.3f} +- {last['stderr']:.3f} nats of log p(x) on data from this model"
    )
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bdmc", help="BDMC sandwich: how far AIS is from log p(x), on simulated data"
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--points", type=int, default=100, help="simulated datapoints (default 100)")
    p.add_argument("--temperatures", type=int_list, default=[100, 1000],
                   help="schedule lengths, e.g. 1000,10000 (default 100,1000)")  # fmt: skip
    p.add_argument("--chains", type=int, default=16, help="AIS chains per datapoint (16)")
    p.add_argument("--leapfrog", type=int, default=10, help="leapfrog steps per HMC (10)")
    p.add_argument("--schedule", choices=SCHEDULES, default="sigmoid", help="default sigmoid")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help=AIS_COMPILE_HELP)  # fmt: skip
    add_flags(p, "split", "seed", "no_progress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = bdmc_run(
        args.run, points=args.points, temperatures=args.temperatures, num_chains=args.chains,
        leapfrog_steps=args.leapfrog, schedule=args.schedule, split=args.split, seed=args.seed,
        progress=not args.no_progress, compile=args.compile,
    )  # fmt: skip
    print(format_bdmc(report))
    print(f"written {args.run}/bdmc.json, bdmc.png")
    return 0
