"""``elbolab experiment``: a question answered by training variants under one budget.

``stochastic-layers``: do more stochastic layers tighten the bound? Encoders
with L = 1, 2, 3 stochastic layers and the denoising variant (a fixed
corruption as the first layer).

``word-dropout``: what does word dropout, the denoising criterion for text,
do to a document model's bounds? No dropout (a plain NVDM, L = 1) against
uniform and frequency-based word dropout as the encoder's first layer, at
the same drop rates (frequency-based: the alpha at which the same fraction
of the training tokens is dropped).

Every variant is trained with the same data, objective, budget and seeds,
measured by ``gaps_run``, and reported as means and standard errors across
seeds. Whatever the numbers say is the answer.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ppl_models.text import alpha_for_rate, expected_drop_rate

from ..bounds import summary
from ..data import TEXT_DATASETS, load_dataset
from ..objectives import OBJECTIVES
from ..plots import plot_experiment
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
from .flags import add_ais_flags, add_flags, ais_settings, int_list, nonnegative_list
from .gaps import gaps_run

ACROSS_SEEDS = "across seeds (std / sqrt(seeds))"
EXPERIMENTS = ("stochastic-layers", "word-dropout")

# name -> (run folder prefix, TrainConfig fields)
VARIANTS = {
    "L=1": ("L1", dict(layers=1)),
    "L=2": ("L2", dict(layers=2)),
    "L=3": ("L3", dict(layers=3)),
    "denoising (L=2)": ("denoising", dict(layers=2, corruption="salt-pepper:0.1")),
}
COLUMNS: dict[str, Callable[[dict], float]] = {
    "log p(x)": lambda r: r["bounds"]["log_px"]["mean"],
    "L_marg": lambda r: _marg(r),
    "L_aux": lambda r: r["bounds"]["l_aux"]["mean"],
    "L_h": lambda r: r["bounds"]["l_h"]["mean"],
    "I(z;h|x)": lambda r: _marg(r) - r["bounds"]["l_h"]["mean"],
    "KL gap": lambda r: r["bounds"]["log_px"]["mean"] - _marg(r),
    "amortisation": lambda r: r.get("cremer", {}).get("amortization_gap", {}).get("mean", math.nan),
}
# The inequality of the gaps chain that each column reads as a gap or bound: where it is
# VIOLATED for a seed, the column's number is no gap of the kind its name says.
COLUMN_CHECKS = {
    "log p(x)": "log p(x) >= L_marg",
    "L_marg": "log p(x) >= L_marg",
    "KL gap": "log p(x) >= L_marg",
    "I(z;h|x)": "L_marg >= L_h",
}
GAP_COLUMNS = ("KL gap", "I(z;h|x)")  # differences that cannot be negative where their
# inequality holds: where it was VIOLATED the table prints that instead of the number
TEXT_COLUMNS: dict[str, Callable[[dict], float]] = {
    "perplexity IWAE": lambda r: _iwae_perplexity(r),
    "perplexity AIS": lambda r: r["perplexity"]["log_px"]["mean"] if "ais" in r else math.nan,
    **{k: v for k, v in COLUMNS.items() if k != "amortisation"},
}


def _iwae_perplexity(report: dict) -> float:
    """Perplexity from IWAE-K, which is log p(x)'s estimate unless AIS took its place."""
    ppl = report["perplexity"]
    return ppl.get(f"iwae[{report['num_particles']}]", ppl["log_px"])["mean"]


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
    detail = config_differences(read_config(run), config, ignore=("epochs", "device", "compile"))
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


def run_variants(
    experiment: str,
    variants: dict[str, tuple[str, dict]],
    columns: dict[str, Callable[[dict], float]],
    *,
    out: str | Path,
    data: str,
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
    ais: dict | None = None,
    progress: bool = True,
    **details,
) -> dict:
    """Train every variant for every seed, measure it, write ``experiment.json``; return it.

    ``variants`` maps a row name to (run folder prefix, :class:`TrainConfig`
    fields of the hvae); ``columns`` maps a column name to a function of
    the ``gaps`` report; ``details`` are recorded in the result as they are.
    """
    out = Path(out)
    mark_folder(out, "experiment")
    tic = time.perf_counter()
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    checks: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in seeds:
        for name, (tag, options) in variants.items():
            config = TrainConfig(
                model="hvae", data=data, data_path=data_path, objective=objective,
                num_particles=num_particles, epochs=epochs, seed=seed, hidden=hidden,
                z_dim=z_dim, **options,
            )  # fmt: skip
            run = out / f"{tag}-seed{seed}"
            ensure_trained(config, run, progress=progress)
            report = gaps_run(
                run, limit=limit, num_particles=eval_particles, inner_samples=inner_samples,
                seed=seed, progress=False, ais=ais,
            )  # fmt: skip
            rows[name].append({column: fn(report) for column, fn in columns.items()})
            checks[name].append(
                {"seed": seed, **{c["inequality"]: c["verdict"] for c in report["chain"]}}
            )
    table = {
        name: {column: _across_seeds([r[column] for r in runs]) for column in columns}
        for name, runs in rows.items()
    }
    result = {
        "experiment": experiment,
        "data": data,
        "objective": objective,
        "num_particles": num_particles,
        "epochs": epochs,
        "seeds": list(seeds),
        "eval_particles": eval_particles,
        "log_px_estimator": f"AIS-{ais['num_temperatures']}" if ais else f"IWAE-{eval_particles}",
        **({"ais": ais} if ais else {}),
        "inner_samples": list(inner_samples),
        **details,
        "table": table,
        "per_seed": rows,
        "checks": checks,
        "violated": violations(checks),
        "seconds": time.perf_counter() - tic,
    }
    result["flagged"] = {
        name: [c for c in columns if _flagged(result, name, c)] for name in result["violated"]
    }
    write_json(out / "experiment.json", result)
    plot_experiment(result, out / "experiment.png")
    return result


def violations(checks: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Per variant, each inequality of the gaps chain VIOLATED for some seed, with the seeds."""
    out = {}
    for name, per_seed in checks.items():
        found: dict[str, list] = {}
        for entry in per_seed:
            for inequality, verdict in entry.items():
                if inequality != "seed" and verdict.startswith("VIOLATED"):
                    found.setdefault(inequality, []).append(entry["seed"])
        if found:
            out[name] = [f"{ineq} (seeds {seeds})" for ineq, seeds in found.items()]
    return out


def _flagged(result: dict, variant: str, column: str) -> bool:
    check = COLUMN_CHECKS.get(column)
    return check is not None and any(
        v.startswith(check) for v in result.get("violated", {}).get(variant, [])
    )


def stochastic_layers(*, out: str | Path, data: str = "digits", **settings) -> dict:
    """L = 1, 2, 3 and the denoising encoder (see :func:`run_variants` for ``settings``)."""
    if data in TEXT_DATASETS:
        raise RunError(f"stochastic-layers is an experiment on images; {data} is text")
    return run_variants("stochastic-layers", VARIANTS, COLUMNS, out=out, data=data, **settings)


def word_dropout_variants(rates: Sequence[float], word_counts) -> dict[str, tuple[str, dict]]:
    """No dropout, then uniform and frequency-based word dropout at each drop rate."""
    variants = {"none (L=1)": ("none", dict(layers=1))}
    for rate in rates:
        variants[f"uniform {rate:g}"] = (
            f"uniform{rate:g}",
            dict(layers=2, corruption=f"word-dropout:{rate:g}"),
        )
    for rate in rates:
        alpha = float(f"{alpha_for_rate(rate, word_counts):.4g}")
        variants[f"frequency {rate:g}"] = (
            f"frequency{rate:g}",
            dict(layers=2, corruption=f"word-dropout-freq:{alpha:g}"),
        )
    return variants


def word_dropout(
    *,
    out: str | Path,
    data: str = "lee",
    data_path: str | None = None,
    rates: Sequence[float] = (0.1, 0.3),
    **settings,
) -> dict:
    """No dropout vs uniform vs frequency-based word dropout (see :func:`run_variants`)."""
    if data not in TEXT_DATASETS:
        raise RunError(f"word-dropout needs text data ({', '.join(TEXT_DATASETS)}), not {data}")
    for rate in rates:
        if not 0 < rate < 1:
            raise RunError(f"--rates: a drop rate must lie in (0, 1), got {rate:g}")
    counts = load_dataset(data, path=data_path).word_counts
    variants = word_dropout_variants(rates, counts)
    alphas = {
        name: float(options["corruption"].split(":")[1])
        for name, (_, options) in variants.items()
        if "freq" in options.get("corruption", "")
    }
    rates_at = {name: expected_drop_rate(a, counts) for name, a in alphas.items()}
    return run_variants(
        "word-dropout", variants, TEXT_COLUMNS, out=out, data=data, data_path=data_path,
        rates=list(rates), alphas=alphas, drop_rates_of_alphas=rates_at, **settings,
    )  # fmt: skip


def format_experiment(result: dict) -> str:
    """The table: mean +- standard error across seeds (nats; perplexity per word)."""
    columns = list(next(iter(result["table"].values())))
    width = max(17, *(len(name) + 2 for name in result["table"]))
    header = f"{'variant':<{width}}" + "".join(f"{c:>17}" for c in columns)
    lines = [
        f"{result.get('experiment', 'stochastic-layers')}: {result['data']}, "
        f"{result['objective']} K={result['num_particles']}, {result['epochs']} epochs, seeds "
        f"{result['seeds']}; bounds by gaps, log p(x) by "
        f"{result.get('log_px_estimator', 'IWAE-' + str(result['eval_particles']))}, "
        f"S={max(result['inner_samples'])} ({result['seconds'] / 60:.1f} min); mean +- "
        "standard error across seeds",
        header,
    ]
    for name, row in result["table"].items():
        cells = []
        for column in columns:
            m, s = row[column]["mean"], row[column]["stderr"]
            flagged = column in result.get("flagged", {}).get(name, [])
            if flagged and column in GAP_COLUMNS:  # never a gap with an impossible sign
                cells.append(f"{'VIOLATED!':>17}")
                continue
            mark = "!" if flagged else " "
            cells.append(f"{'n/a':>17}" if math.isnan(m) else f"{m:>9.2f} +- {s:<5.2f}{mark}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    for name, violated in result.get("violated", {}).items():
        lines.append(
            f"! {name}: {'; '.join(violated)} VIOLATED by more than 3 s.e.: the marked cells "
            "are not the gaps their names say (log p(x) is underestimated, or L_marg's "
            "plug-in has not converged; see each run's gaps.json)"
        )
    if "alphas" in result:
        lines.append(
            "frequency-based: drop probability alpha / (c(w) + alpha); "
            + ", ".join(f"{name}: alpha {a:g}" for name, a in result["alphas"].items())
        )
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="experiments; stochastic-layers: L = 1, 2, 3, denoising; word-dropout: text",
    )
    p.add_argument("name", choices=EXPERIMENTS, help="which experiment")
    p.add_argument("--out", help="folder for the runs (default runs/NAME)")
    p.add_argument("--data", help="data set (default digits; lee for word-dropout)")
    add_flags(p, "data_path")
    p.add_argument("--objective", choices=OBJECTIVES, default="iwae")
    p.add_argument("--num-particles", type=int, default=5, help="K in training (default 5)")
    p.add_argument("--epochs", type=int, default=100, help="epochs per run (default 100)")
    p.add_argument("--seeds", type=nonnegative_list, default=[0, 1, 2], help="default 0,1,2")
    p.add_argument("--hidden", type=int_list, help="hidden widths")
    p.add_argument("--z-dim", type=int, help="latent dimension")
    p.add_argument("--k", type=int, default=1000, help="particles for the bounds")
    p.add_argument("--inner-samples", type=int_list, default=[1, 10, 100])
    p.add_argument("--rates", type=rate_list, default=[0.1, 0.3],
                   help="word-dropout: drop rates (default 0.1,0.3)")  # fmt: skip
    p.add_argument("--ais", action="store_true", help="log p(x) by AIS instead of IWAE")
    add_ais_flags(p)
    add_flags(p, "limit", "no_progress")
    p.set_defaults(func=run)


def rate_list(text: str) -> list[float]:
    """``"0.1,0.3"`` -> ``[0.1, 0.3]``, each in (0, 1)."""
    try:
        rates = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, e.g. 0.1,0.3, got {text!r}") from None
    if not rates or not all(0 < r < 1 for r in rates):
        raise argparse.ArgumentTypeError(f"drop rates must lie in (0, 1), got {text!r}")
    return rates


def run(args: argparse.Namespace) -> int:
    out = args.out or f"runs/{args.name}"
    settings = dict(
        out=out, data_path=args.data_path, objective=args.objective,
        num_particles=args.num_particles, epochs=args.epochs, seeds=args.seeds,
        hidden=args.hidden, z_dim=args.z_dim, eval_particles=args.k,
        inner_samples=args.inner_samples, limit=args.limit,
        ais=ais_settings(args) if args.ais else None, progress=not args.no_progress,
    )  # fmt: skip
    if args.name == "word-dropout":
        result = word_dropout(data=args.data or "lee", rates=args.rates, **settings)
    else:
        result = stochastic_layers(data=args.data or "digits", **settings)
    print(format_experiment(result))
    print(f"written {out}/experiment.json, experiment.png")
    return 0
