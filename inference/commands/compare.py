"""``elbolab compare``: bounds, k-hat distributions and active units across runs, side by side."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyro

from .. import provenance
from ..plots import plot_compare
from ..runs import (
    RunError,
    check_output_dir,
    checkpoint_of,
    load_run,
    mark_folder,
    read_config,
    write_json,
)
from ..surgery import active_units, posterior_means
from . import store
from .flags import add_flags
from .report import table

COMPARE = "compare.json"


def _choose(found: dict[Path, dict[str, dict]], name: str | None, any_datapoints: bool):
    """Each run's evaluation to compare, and how they were matched (a sentence).

    ``name``: that evaluation in every run. Otherwise the evaluations over the
    same datapoints (their values' hash) that every run has, the largest set
    (latest on a tie); with ``any_datapoints`` each run's latest where none is
    shared.
    """
    if name is not None:
        missing = [str(run) for run, evals in found.items() if name not in evals]
        if missing:
            raise RunError(f"--eval {name}: no evaluation of that name in {', '.join(missing)}")
        return {run: evals[name] for run, evals in found.items()}, f"evaluation {name!r}"

    def key(report: dict):
        points = (report.get("provenance") or {}).get("datapoints") or {}
        return points.get("values_sha256")

    shared = None
    for evals in found.values():
        keys = {key(r) for r in evals.values()} - {None}
        shared = keys if shared is None else shared & keys
    if shared:

        def size(k):
            return max(int(r["num_datapoints"]) for e in found.values() for r in e.values()
                       if key(r) == k)  # fmt: skip

        best = max(shared, key=size)
        chosen = {run: [r for r in evals.values() if key(r) == best][-1]
                  for run, evals in found.items()}  # fmt: skip
        first = next(iter(chosen.values()))
        names = ", ".join(sorted({r.get("name", "eval") for r in chosen.values()}))
        return chosen, (
            f"the same {first['num_datapoints']} datapoints of the {first['split']} split in "
            f"every run (evaluations {names})"
        )
    if len(found) > 1 and not any_datapoints:
        held = "; ".join(
            f"{run.name}: " + ", ".join(f"{n} ({r['num_datapoints']} {r['split']})"
                                        for n, r in evals.items())
            for run, evals in found.items()
        )  # fmt: skip
        raise RunError(
            f"the runs share no evaluation over the same datapoints ({held}); evaluate them with "
            "the same --split, --limit and --every, or pass --any-datapoints"
        )
    chosen = {run: list(evals.values())[-1] for run, evals in found.items()}
    what = "each run's latest evaluation"
    return chosen, what + (", NOT over the same datapoints" if len(found) > 1 else "")


def compare_runs(
    runs: Sequence[str | Path],
    *,
    out: str | Path,
    seed: int = 0,
    max_points: int = 2000,
    name: str | None = None,
    any_datapoints: bool = False,
) -> dict:
    """Put several evaluated runs side by side; write ``compare.json`` and ``compare.png``.

    Each run's evaluations (``elbolab evaluate``) are read, and those over the
    same datapoints compared (:func:`_choose`); an evaluation computed from
    another checkpoint than the run's current one is marked stale. Runs over
    the same datapoints get paired differences of log p(x) against the first
    run, with their paired s.e. over datapoints and their Monte Carlo s.e.
    Active units are counted on the evaluated split.
    """
    if len(runs) < 1:
        raise RunError("compare needs at least one run directory")
    started = time.time()
    out = Path(out)
    check_output_dir(out, ours_ok=True)
    runs = [Path(r) for r in runs]
    if len(set(map(Path.resolve, runs))) < len(runs):
        raise RunError("compare: a run is named twice")
    for run in runs:
        read_config(run)  # a folder that is no run: one line before anything is read
    found = {run: store.evaluations(run) for run in runs}
    chosen, matched = _choose(found, name, any_datapoints)
    rows, khats, headline = [], {}, {}
    for run, report in chosen.items():
        config, dataset, model = load_run(run)
        arrays = store.read_arrays(run, report)
        x = dataset.split(report["split"])[: min(report["num_datapoints"], max_points)]
        pyro.set_rng_seed(seed)
        try:
            units = active_units(posterior_means(model.guide, x))
        except ValueError:  # no single top latent to count
            units = None
        khat = arrays["khat"] if "khat" in arrays else np.array([])
        khats[run.name] = khat[~np.isnan(khat)]  # K too small for a tail fit
        key = store.headline_key(report)
        headline[run] = arrays.get(key)
        checkpoint = checkpoint_of(model) or {}
        rows.append(
            {
                "run": str(run),
                "name": run.name,
                "evaluation": report.get("name", "eval"),
                "model": config.model,
                "objective": config.objective,
                "num_particles": config.num_particles,
                "epochs": checkpoint.get("epoch"),
                "split": report["split"],
                "num_datapoints": report["num_datapoints"],
                "datapoints": (report.get("provenance") or {}).get("datapoints"),
                "elbo": report["elbo"],
                "iwae": report["iwae"],
                "log_px": report["log_px"],
                "gap": report["log_px"]["mean"] - report["elbo"]["mean"],
                "khat": report.get("khat"),
                "active_units": units,
                "latent_units": int(getattr(model, "z_dim", 0)) or None,
                "stale": provenance.stale(report, run),
            }
        )
    paired = []
    if not matched.endswith("NOT over the same datapoints") and len(rows) > 1:
        first = runs[0]
        for row, run in zip(rows[1:], runs[1:], strict=True):
            a, b = headline[run], headline[first]
            if a is None or b is None or a.shape != b.shape:
                continue
            diff = store.paired_difference(a, b, row["log_px"]["stderr"],
                                           rows[0]["log_px"]["stderr"])  # fmt: skip
            paired.append({"run": row["name"], "against": rows[0]["name"], **diff})
    result = {"runs": rows, "matched": matched, "paired_differences": paired}
    result["provenance"] = provenance.record(
        "compare", settings={"runs": [str(r) for r in runs], "eval": name,
                             "any_datapoints": any_datapoints, "max_points": max_points},
        seed=seed, started=started,
    )  # fmt: skip
    mark_folder(out, "compare")
    write_json(out / COMPARE, result)
    plot_compare(rows, khats, out / "compare.png", paired=paired)
    return result


def format_compare(result: dict) -> str:
    """The side-by-side table printed by ``elbolab compare``."""
    columns = [
        ("run", "<18"), ("objective", ">10"), ("K", ">4"), ("epochs", ">7"), ("ELBO", ">10.2f"),
        ("log p(x)", ">10.2f"), ("MC s.e.", ">8.3f"), ("data s.e.", ">10.3f"), ("gap", ">7.2f"),
        ("k-hat med", ">10"), ("k>=0.7", ">8"), ("active", ">8"),
    ]  # fmt: skip
    rows = []
    for r in result["runs"]:
        k = r["khat"] or {}
        bad = f"{100 * k['bad'] / k['num_datapoints']:.0f}%" if k else "-"
        med = f"{k['median']:.2f}" if k and not math.isnan(k["median"]) else "-"
        units = "-" if r["active_units"] is None else str(r["active_units"])
        units += (
            f"/{r['latent_units']}" if r["latent_units"] and r["active_units"] is not None else ""
        )
        spread = r["log_px"].get("datapoint_stderr")
        rows.append(
            (("! " if r["stale"] else "") + r["name"][:16], r["objective"], r["num_particles"],
             "-" if r["epochs"] is None else str(r["epochs"]), r["elbo"]["mean"],
             r["log_px"]["mean"], r["log_px"]["stderr"], "-" if spread is None else spread,
             r["gap"], med, bad, units)
        )  # fmt: skip
    lines = [f"compared: {result['matched']}"]
    lines += table(columns, rows)
    lines.append(
        "MC s.e.: Monte Carlo error with the datapoints fixed; data s.e.: the spread over "
        "datapoints, std / sqrt(N)"
    )
    for r in result["runs"]:
        if r["stale"]:
            lines.append(f"! {r['name']}: evaluation {r['evaluation']!r} is stale: {r['stale']}")
    ks = {r["log_px"].get("k") for r in result["runs"]}
    if len(ks) > 1:
        lines.append(f"note: log p(x) comes from different K across the runs: {sorted(ks)}")
    for d in result.get("paired_differences", []):
        se = d["paired_stderr"]
        verdict = (
            "higher" if d["mean"] > 3 * se else "lower" if d["mean"] < -3 * se
            else "not distinguishable at 3 paired s.e."
        )  # fmt: skip
        lines.append(
            f"log p(x) {d['run']} - {d['against']}: {d['mean']:+.3f} nats, paired s.e. "
            f"{se:.3f} over {d['num_datapoints']} datapoints (MC s.e. {d['mc_stderr']:.3f}): "
            f"{verdict}"
        )
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="bounds, k-hat and active units of several runs")
    p.add_argument("runs", nargs="+", help="run directories, each evaluated already")
    p.add_argument("--out", default="runs/compare", help="folder for compare.json/png")
    p.add_argument(
        "--eval",
        dest="eval_name",
        help="compare the evaluation of this name in "
        "every run (default: those over the same datapoints)",
    )
    p.add_argument(
        "--any-datapoints",
        action="store_true",
        help="where the runs share no "
        "evaluation over the same datapoints, compare each one's latest anyway",
    )
    add_flags(p, "seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = compare_runs(args.runs, out=args.out, seed=args.seed, name=args.eval_name,
                          any_datapoints=args.any_datapoints)  # fmt: skip
    print(format_compare(result))
    print(f"written {args.out}/compare.json, compare.png")
    return 0
