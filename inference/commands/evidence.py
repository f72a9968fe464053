"""``elbolab evidence``: log evidence of models on one data set, BDMC brackets and Bayes factors.

Two forms. ``elbolab evidence --model a.py:model --model b.py:make --data D``
anneals each Pyro model from its prior (or the guide its factory returns) to
its posterior on the named arrays of ``D`` (.npz, .csv or .json, passed to
the model by name) and brackets each estimate by BDMC on data simulated from
that model at the same schedule. ``elbolab evidence RUN [RUN ...]`` does the
same for trained runs: log p(D) summed over the first ``--limit`` datapoints
of a split, the bracket from BDMC on ``--bdmc-points`` simulated datapoints.
Both print the log Bayes factor of every pair, with its standard error, and
write ``evidence.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pyro
import torch

from .. import provenance
from ..ais import SCHEDULES, TARGET_CESS, ais_over_data, annealing_pair, bdmc_summary
from ..ais import bdmc as bdmc_sandwich
from ..data import DataError
from ..evidence import (
    Evidence,
    bayes_factors,
    log_evidence,
    model_kwargs,
    model_pair,
    read_named_arrays,
)
from ..inspection import PairError
from ..runs import RunError, checkpoint_of, load_run, write_json
from ..user_model import ModelError, digest, file_digests, load_object
from .flags import add_flags
from .report import table

EVIDENCE = "evidence.json"


def evidence_of_models(
    references: list[str],
    data: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    **settings,
) -> dict:
    """The report of ``elbolab evidence --model ... --data ...`` (see :func:`log_evidence`)."""
    started = time.time()
    if len(set(references)) < len(references):
        raise ModelError("--model: the same model is named twice")
    arrays = read_named_arrays(data)
    results, models = {}, []
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # sums of many log densities: in double precision
    try:
        for reference in references:
            model, guide = model_pair(load_object(reference), source=reference)
            kwargs = model_kwargs(model, arrays, source=reference)
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            try:
                results[reference] = log_evidence(model, guide, progress=progress, **settings,
                                                  **kwargs)  # fmt: skip
            except ValueError as err:
                detail = err.for_command() if isinstance(err, PairError) else str(err)
                raise RunError(f"evidence: {reference}: {detail}") from None
            models.append({"model": reference, "sha256": digest(reference),
                           "files": file_digests(reference),
                           "arrays": sorted(kwargs), **results[reference].as_dict()})  # fmt: skip
    finally:
        torch.set_default_dtype(previous)
    return {
        "data": str(data),
        "seed": seed,
        "settings": _json_settings(settings),
        "models": models,
        "bayes_factors": bayes_factors(results),
        "provenance": provenance.record(
            "evidence", settings=provenance.settings({"models": references, **settings}),
            seed=seed, started=started,
            datapoints={"file": str(data), "sha256": provenance.file_sha256(data)},
        ),
    }  # fmt: skip


def evidence_of_runs(
    runs: list[str],
    *,
    split: str = "test",
    limit: int | None = 100,
    bdmc_points: int = 10,
    seed: int = 0,
    progress: bool = True,
    num_chains: int = 16,
    num_temperatures: int | None = 1000,
    schedule: str = "sigmoid",
    target_ess: float = TARGET_CESS,
    leapfrog_steps: int = 10,
    step_size: float = 0.1,
    bdmc: bool = True,
    compile: bool | None = None,
) -> dict:
    """The report of ``elbolab evidence RUN ...``: log p(D) over ``limit`` datapoints of a split."""
    started = time.time()
    arguments = provenance.settings(locals())
    if limit is not None and limit < 1:
        raise RunError(f"--limit must be >= 1, got {limit}")
    settings = dict(num_chains=num_chains, num_temperatures=num_temperatures,
                    schedule=schedule, target_ess=target_ess, leapfrog_steps=leapfrog_steps,
                    step_size=step_size, compile=compile)  # fmt: skip
    results, models, datasets = {}, [], set()
    for run in runs:
        config, dataset, model = load_run(Path(run))
        model.requires_grad_(False)
        datasets.add((config.data, config.data_path))
        x = dataset.split(split)[:limit]
        pair = annealing_pair(model)
        tic = time.perf_counter()
        try:
            est = ais_over_data(*pair, x, seed=seed, progress=progress, **settings)
            found = dict(
                log_evidence=float(est.value.sum()),
                stderr=float(est.stderr.pow(2).sum().sqrt()),
                temperatures=est.num_temperatures or num_temperatures,
                acceptance=float(est.acceptance.mean()),
            )  # fmt: skip
            if bdmc:
                pyro.set_rng_seed(seed)
                points = min(bdmc_points, x.shape[0])
                result = bdmc_sandwich(*pair, x, num_points=points, progress=progress, **settings)
                sandwich = bdmc_summary(result)
                n = x.shape[0]  # the bracket per datapoint, scaled to the data set's size
                for key in ("lower", "upper", "gap"):
                    found[key] = n * sandwich[key]["mean"]
                    found[f"{key}_stderr"] = n * sandwich[key]["stderr"]
        except ValueError as err:
            detail = err.for_command() if isinstance(err, PairError) else str(err)
            raise RunError(f"evidence: {run}: {detail}") from None
        # a bracket of 0.1 nats per datapoint, as for the evidence of one model
        results[run] = Evidence(**found, seconds=time.perf_counter() - tic,
                                tolerance=0.1 * x.shape[0])  # fmt: skip
        whole = dataset.split(split)
        models.append({"run": run, "model": config.model, "datapoints": int(x.shape[0]),
                       "checkpoint": checkpoint_of(model),
                       "datapoints_identity": provenance.datapoints(
                           x, split=split, total=whole.shape[0], limit=limit),
                       **results[run].as_dict()})  # fmt: skip
    if len(datasets) > 1:
        raise RunError(
            "evidence: the runs were trained on different data sets; Bayes factors compare "
            "models of the same data"
        )
    return {
        "split": split,
        "datapoints": models[0]["datapoints"],
        "seed": seed,
        "settings": _json_settings({**settings, "bdmc": bdmc, "bdmc_points": bdmc_points}),
        "models": models,
        "bayes_factors": bayes_factors(results),
        "provenance": provenance.record("evidence", settings=arguments, seed=seed, started=started),
    }


def _json_settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool, type(None)))}


def format_evidence(report: dict) -> str:
    """The table printed by ``elbolab evidence``."""
    if "data" in report:
        where = f"on {report['data']}"
    else:
        where = f"on {report['datapoints']} datapoints of the {report['split']} split"
    lines = [f"log evidence (nats, +- Monte Carlo s.e.) {where}; BDMC bracket on data simulated "
             "from each model at the same schedule"]  # fmt: skip
    columns = [
        ("model", "<32"), ("log p(D)", ">12.3f"), ("+-", ">8.3f"), ("temps", ">7"),
        ("accept", ">8.2f"), ("BDMC gap", ">10"), ("", "<4"), ("seconds", ">9.1f"),
    ]  # fmt: skip
    rows = []
    for m in report["models"]:
        name = m.get("run", m["model"])
        gap = "n/a" if m["gap"] is None else f"{m['gap']:.3f}"
        mark = "" if m["converged"] else " !"
        rows.append((_short(name, 31), m["log_evidence"], m["stderr"], m["temperatures"],
                     m["acceptance"], gap, mark, m["seconds"]))  # fmt: skip
    lines += table(columns, rows)
    if any(not m["converged"] for m in report["models"]):
        lines.append("! not converged: the chains barely moved, or the BDMC gap plus two of its "
                     "s.e. exceeds 0.1 nats (per datapoint for runs); more temperatures "
                     "(--target-ess closer to 1) close it, more chains make it surer")  # fmt: skip
    for bf in report["bayes_factors"]:
        verdict = "" if bf["decided"] else "  (not decided: within 3 s.e. or a BDMC gap)"
        lines.append(
            f"log BF [{_short(bf['numerator'], 40)} : {_short(bf['denominator'], 40)}] = "
            f"{bf['log_bf']:.3f} +- {bf['stderr']:.3f}{verdict}"
        )
    return "\n".join(lines)


def _short(name: str, width: int) -> str:
    """A model's label: its file's name and factory (``a.py:model``), or a run's folder name."""
    target, colon, attr = name.rpartition(":")
    name = f"{Path(target).name}:{attr}" if colon else Path(name).name
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evidence", help="log evidence of models (or runs) with BDMC brackets and Bayes factors"
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="trained run directories")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FILE.py:NAME",
        help="a Pyro model (or a factory of one); give --model once per model",
    )
    p.add_argument("--data", help="named arrays passed to each --model: .npz, .csv or .json")
    p.add_argument(
        "--out",
        default=None,
        help=f"where to write the report (default ./{EVIDENCE}, or RUN/{EVIDENCE})",
    )
    p.add_argument(
        "--chains",
        type=int,
        default=None,
        help="AIS chains (64 for --model, 16 per datapoint for runs)",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help="temperatures: adaptive (default for --model) or sigmoid (runs), linear",
    )
    p.add_argument(
        "--temperatures",
        type=int,
        default=None,
        help="schedule length (the adaptive schedule's cap: 10000; runs: 1000)",
    )
    p.add_argument(
        "--target-ess",
        type=float,
        default=TARGET_CESS,
        help=f"the adaptive schedule's conditional ESS per step ({TARGET_CESS})",
    )
    p.add_argument("--leapfrog", type=int, default=10, help="leapfrog steps per HMC (10)")
    p.add_argument("--step-size", type=float, default=0.1, help="initial leapfrog step (0.1)")
    p.add_argument(
        "--bdmc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bracket each estimate by BDMC on simulated data (default: yes)",
    )
    p.add_argument("--split", default="test", help="runs: the split (test)")
    p.add_argument("--limit", type=int, default=100, help="runs: datapoints of the split (100)")
    p.add_argument(
        "--bdmc-points",
        type=int,
        default=10,
        help="runs: simulated datapoints for the bracket (10)",
    )
    add_flags(p, "seed", "no_progress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.runs) == bool(args.model):
        raise RunError("evidence: give run directories, or --model (once per model) with --data")
    for flag in ("chains", "temperatures", "leapfrog"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise RunError(f"--{flag} must be >= 1, got {value}")
    if not 0.0 < args.target_ess < 1.0:
        raise RunError(f"--target-ess must lie in (0, 1), got {args.target_ess}")
    common = dict(target_ess=args.target_ess, leapfrog_steps=args.leapfrog,
                  step_size=args.step_size, bdmc=args.bdmc, seed=args.seed,
                  progress=not args.no_progress)  # fmt: skip
    if args.model:
        if args.data is None:
            raise DataError("evidence: --model needs --data (the named arrays the models take)")
        report = evidence_of_models(
            args.model, args.data, num_chains=args.chains or 64,
            schedule=args.schedule or "adaptive", num_temperatures=args.temperatures, **common,
        )  # fmt: skip
        out = Path(args.out or EVIDENCE)
    else:
        schedule = args.schedule or "sigmoid"
        temperatures = args.temperatures or (None if schedule == "adaptive" else 1000)
        report = evidence_of_runs(
            args.runs, split=args.split, limit=args.limit, bdmc_points=args.bdmc_points,
            num_chains=args.chains or 16, schedule=schedule, num_temperatures=temperatures,
            **common,
        )  # fmt: skip
        out = Path(args.out or Path(args.runs[0]) / EVIDENCE)
    write_json(out, report)
    print(format_evidence(report))
    print(f"wrote {out}")
    return 0 if all(math.isfinite(m["log_evidence"]) for m in report["models"]) else 1
