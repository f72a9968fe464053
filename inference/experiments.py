"""``elbolab experiment stochastic-layers``: do more stochastic layers tighten the bound.

Trains encoders with L = 1, 2, 3 stochastic layers and the denoising variant
(a fixed corruption as the first layer) with the same data, objective,
budget and seeds, measures every bound with ``gaps_run``, and reports means
and standard errors across seeds. Whatever the numbers say is the answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .gaps import gaps_run
from .runs import TrainConfig, write_json
from .svi import train

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
            if not (run / "checkpoint.pt").exists():
                train(config, run, progress=progress)
            report = gaps_run(
                run, limit=limit, num_particles=eval_particles, inner_samples=inner_samples,
                seed=seed, progress=False,
            )  # fmt: skip
            rows[name].append({column: fn(report) for column, fn in COLUMNS.items()})
    table = {
        name: {
            column: {
                "mean": float(np.mean([r[column] for r in runs])),
                "stderr": float(np.std([r[column] for r in runs], ddof=1) / math.sqrt(len(runs)))
                if len(runs) > 1
                else math.nan,
            }
            for column in COLUMNS
        }
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
        f"({result['seconds'] / 60:.1f} min)",
        header,
    ]
    for name, row in result["table"].items():
        cells = []
        for column in COLUMNS:
            m, s = row[column]["mean"], row[column]["stderr"]
            cells.append(f"{'n/a':>17}" if math.isnan(m) else f"{m:>9.2f} +- {s:<5.2f}")
        lines.append(f"{name:<17}" + "".join(cells))
    return "\n".join(lines)
