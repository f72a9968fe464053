"""``elbolab compare``: bounds, k-hat distributions and active units across runs, side by side."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyro

from ..plots import plot_compare
from ..runs import (
    RunError,
    check_output_dir,
    load_run,
    mark_folder,
    read_report,
    write_json,
)
from ..surgery import active_units, posterior_means
from .evaluate import EVAL, EVAL_DATAPOINTS
from .flags import add_flags
from .report import table

COMPARE = "compare.json"


def compare_runs(
    runs: Sequence[str | Path], *, out: str | Path, seed: int = 0, max_points: int = 2000
) -> dict:
    """Put several evaluated runs side by side; write ``compare.json`` and ``compare.png``.

    Each run's ``eval.json`` (from ``elbolab evaluate``) and per-datapoint
    k-hat are read; active units are counted on the evaluated split.
    """
    if len(runs) < 1:
        raise RunError("compare needs at least one run directory")
    out = Path(out)
    check_output_dir(out, ours_ok=True)
    rows, khats = [], {}
    for run in map(Path, runs):
        report = read_report(run, EVAL)
        config, dataset, model = load_run(run)
        x = dataset.split(report["split"])[: min(report["num_datapoints"], max_points)]
        pyro.set_rng_seed(seed)
        try:
            units = active_units(posterior_means(model.guide, x))
        except ValueError:  # no single top latent to count
            units = None
        with np.load(run / EVAL_DATAPOINTS) as per_point:
            khat = per_point["khat"] if "khat" in per_point.files else np.array([])
        khat = khat[~np.isnan(khat)]  # K too small for a tail fit
        khats[run.name] = khat
        rows.append(
            {
                "run": str(run),
                "name": run.name,
                "model": config.model,
                "objective": config.objective,
                "num_particles": config.num_particles,
                "epochs": config.epochs,
                "split": report["split"],
                "elbo": report["elbo"],
                "iwae": report["iwae"],
                "log_px": report["log_px"],
                "gap": report["log_px"]["mean"] - report["elbo"]["mean"],
                "khat": report.get("khat"),
                "active_units": units,
                "latent_units": int(getattr(model, "z_dim", 0)) or None,
            }
        )
    result = {"runs": rows}
    mark_folder(out, "compare")
    write_json(out / COMPARE, result)
    plot_compare(rows, khats, out / "compare.png")
    return result


def format_compare(result: dict) -> str:
    """The side-by-side table printed by ``elbolab compare``."""
    columns = [
        ("run", "<18"), ("objective", ">10"), ("K", ">4"), ("ELBO", ">10.2f"),
        ("log p(x)", ">10.2f"), ("+-", ">6.2f"), ("gap", ">7.2f"), ("k-hat med", ">10"),
        ("k>=0.7", ">8"), ("active", ">8"),
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
        rows.append(
            (r["name"][:17], r["objective"], r["num_particles"], r["elbo"]["mean"],
             r["log_px"]["mean"], r["log_px"]["stderr"], r["gap"], med, bad, units)
        )  # fmt: skip
    lines = table(columns, rows)
    splits = {(r["split"], r["log_px"]["k"]) for r in result["runs"]}
    if len(splits) > 1:
        lines.append("note: the runs were evaluated on different splits or K: " + str(splits))
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="bounds, k-hat and active units of several runs")
    p.add_argument("runs", nargs="+", help="run directories, each evaluated already")
    p.add_argument("--out", default="runs/compare", help="folder for compare.json/png")
    add_flags(p, "seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = compare_runs(args.runs, out=args.out, seed=args.seed)
    print(format_compare(result))
    print(f"written {args.out}/compare.json, compare.png")
    return 0
