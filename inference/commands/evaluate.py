"""``elbolab evaluate``: bounds of a trained run on one split, as a table and ``eval.json``."""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import diagnostics, distributed, provenance
from ..ais import MIN_ACCEPTANCE, ais_over_data, annealing_pair
from ..bounds import across_datapoints
from ..evaluation import evaluate_bounds, perplexity, unigram_perplexity
from ..runs import RunError, check_device, checkpoint_of, load_run
from . import store
from .flags import add_ais_flags, add_flags, ais_settings, datapoints, int_list, spread
from .report import bound_table, plus_minus

EVAL = store.EVAL


def evaluate_run(
    run_dir: str | Path,
    *,
    ks: Sequence[int] = (1, 10, 100, 1000),
    split: str = "test",
    seed: int = 0,
    batch_size: int = 100,
    limit: int | None = None,
    every: int = 1,
    device: str = "cpu",
    progress: bool = True,
    ais: dict | None = None,
    compile: bool | None = None,
    name: str | None = None,
) -> dict:
    """Evaluate ELBO, IWAE-k and the ELBO decomposition of a trained run; write the report.

    The report goes to ``evals/NAME.json`` with its per-datapoint values (see
    :mod:`inference.commands.store`) and to ``eval.json`` (the latest).

    Parameters
    ----------
    run_dir : path-like
        A run directory written by ``elbolab train``.
    ks : sequence of int
        Particle counts; log p(x) is reported as IWAE with the largest.
    split : str
        Data split to evaluate.
    seed : int
        Seed of the particles: each batch draws from a stream of its own (the
        seed and the batch's number), so the same seed and ``batch_size`` give
        the same numbers, with any number of processes (torchrun).
    batch_size : int
        Datapoints per vectorised pass.
    limit : int, optional
        Evaluate only the first ``limit`` datapoints of the split.
    every : int
        Only every ``every``-th datapoint (before ``limit``): a subset spread
        over a split stored in order.
    ais : dict, optional
        Also estimate log p(x) by AIS with these settings (keyword arguments
        of :func:`inference.ais.annealed_log_marginal`).
    compile : bool, optional
        Compile the IWAE passes (default: long evaluations do; see
        :func:`inference.evaluation.evaluate_bounds`).
    name : str, optional
        The evaluation's name (default from its settings, e.g. ``test-k1000``
        or ``test-first20-k10``): an evaluation replaces only one of its name.

    Returns
    -------
    dict
        The contents written to ``eval.json``.
    """
    run_dir = Path(run_dir)
    if not ks or min(ks) < 1:
        raise RunError(f"--k needs positive particle counts, got {list(ks)}")
    check_device(device)
    if name is not None:
        store.check_name(name)
    started = time.time()
    world = distributed.current(device)
    config, dataset, model = load_run(run_dir, device=device)
    rows = dataset.split(split)
    x = datapoints(rows, limit=limit, every=every)
    points = provenance.datapoints(x, split=split, total=rows.shape[0], every=every, limit=limit)
    x = x.to(device)
    tic = time.perf_counter()
    result = evaluate_bounds(
        model.model,
        model.guide,
        x,
        ks=ks,
        batch_size=batch_size,
        statistics={"khat": diagnostics.psis_khat, "is_ess": diagnostics.importance_ess},
        seed=seed,
        world=world,
        progress=progress,
        compile=compile,
    )
    seconds = time.perf_counter() - tic
    k_max = max(ks)
    log_px = result["iwae"][k_max]
    report = {
        "run": str(run_dir),
        "split": split,
        "num_datapoints": int(x.shape[0]),
        "every": every,
        "compiled": result["compiled"],
        "seed": seed,
        "batch_size": batch_size,
        "data": config.data,
        "binarization": dataset.binarization,
        "seconds": seconds,
        "elbo": result["elbo"].summary(),
        "iwae": {str(k): b.summary() for k, b in result["iwae"].items()},
        "log_px": {**log_px.summary(), "k": k_max, "estimator": f"IWAE-{k_max}"},
        "decomposition": {name: float(v.mean()) for name, v in result["decomposition"].items()},
        "decomposition_stderr": {
            name: across_datapoints(v)["stderr"] for name, v in result["decomposition"].items()
        },
        "kl_analytic": result["kl_analytic"],
        "khat": diagnostics.khat_summary(result["statistics"]["khat"].numpy()),
        "is_ess_median": float(result["statistics"]["is_ess"].median()),
        "stderr_note": "Monte Carlo standard error of the split average (datapoints fixed)",
    }
    truth = getattr(dataset, "truth", None)
    if hasattr(model, "log_marginal"):
        with torch.no_grad():
            report["exact_log_px"] = float(model.log_marginal(x).mean())
    if truth is not None:
        with torch.no_grad():
            report["generating_model_log_px"] = float(truth.log_marginal(x.cpu()).mean())
    if ais is not None:
        tic = time.perf_counter()
        estimate = ais_over_data(*annealing_pair(model), x, batch_size=batch_size, seed=seed,
                                 world=world, progress=progress, **ais)  # fmt: skip
        report["ais"] = ais_report(estimate, ais, time.perf_counter() - tic)
        result["statistics"]["ais"] = estimate.value
        # The headline is the most trustworthy estimate computed: AIS's, not the IWAE weights'.
        report["log_px"] = {
            **estimate.summary(), "k": k_max,
            "estimator": f"AIS-{report['ais']['num_temperatures']}",
            "converged": report["ais"]["converged"],
        }  # fmt: skip
        report["iwae_log_px"] = {**log_px.summary(), "k": k_max, "estimator": f"IWAE-{k_max}"}
    if dataset.likelihood == "multinomial":
        report["perplexity"] = perplexity_report(report, x.cpu(), dataset.word_counts)
    report["peak_rss_mb"] = peak_rss_mb()  # this process's own: not a compiler's children
    per_point = {
        "elbo": result["elbo"].value,
        **{f"iwae{k}": b.value for k, b in result["iwae"].items()},
        **result["statistics"],
    }
    arrays = {k: v.cpu().numpy() for k, v in per_point.items()}
    if name is None:
        name = store.evaluation_name(split, count=int(x.shape[0]), every=every, limit=limit,
                                     k=k_max, ais=ais)  # fmt: skip
    settings = {"ks": list(ks), "split": split, "batch_size": batch_size, "limit": limit,
                "every": every, "device": device, "compile": compile, "ais": ais}  # fmt: skip
    report["provenance"] = provenance.record(
        "evaluate", settings=settings, seed=seed, started=started, world_size=world.size,
        checkpoint=checkpoint_of(model), datapoints=points, model_files=config.model_files,
    )  # fmt: skip
    # every rank has every result; rank 0 writes
    return distributed.on_main(world, lambda: store.write_evaluation(run_dir, name, report, arrays))


def bound_rows(report: dict) -> dict:
    """The report's bounds by the names the table prints: ELBO, IWAE-k, AIS-T."""
    rows = {"ELBO": report["elbo"], **{f"IWAE-{k}": v for k, v in report["iwae"].items()}}
    if "ais" in report:
        rows[f"AIS-{report['ais']['num_temperatures']}"] = report["ais"]
    return rows


def perplexity_report(report: dict, counts: torch.Tensor, word_counts: torch.Tensor) -> dict:
    """Per-word perplexity of every bound in ``report`` (text data), and the unigram's."""
    return {
        "bounds": {name: perplexity(entry, counts) for name, entry in bound_rows(report).items()},
        "unigram": unigram_perplexity(counts, word_counts),
        "words": int(counts.sum()),
        "note": "per word, from log p(x) less the multinomial coefficient; a lower bound on "
        "log p(x) is an upper bound on perplexity; unigram: training word frequencies (add-one)",
    }


def peak_rss_mb() -> float:
    """Peak resident memory of the process so far, in MB (Linux reports KB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def ais_report(estimate, settings: dict, seconds: float) -> dict:
    """An AIS estimate as a report entry: its mean, Monte Carlo error and settings."""
    if settings.get("schedule") == "adaptive":  # the temperatures it placed (at most the cap)
        settings = {**settings, "num_temperatures": estimate.num_temperatures,
                    "temperature_cap": settings.get("num_temperatures")}  # fmt: skip
    return {
        **estimate.summary(),
        **settings,
        "estimator": "AIS with HMC (stochastic lower bound)",
        "acceptance": float(estimate.acceptance.mean()),
        "converged": ais_verdict(estimate, settings),
        "compiled": estimate.compiled,
        "seconds": seconds,
    }


def ais_verdict(estimate, settings: dict) -> str:
    """What can be said of an AIS run's convergence from the run alone.

    Chains that barely moved (acceptance under 5%) make AIS importance
    sampling from its start; only BDMC's gap (``elbolab bdmc``) bounds the
    error of a run that did move.
    """
    rate = float(estimate.acceptance.mean())
    if settings.get("num_temperatures", 2) > 1 and rate < MIN_ACCEPTANCE:
        return f"NOT CONVERGED: HMC accepted {rate:.1%} of proposals, the chains barely moved"
    return "chains moved; convergence is checked by BDMC's gap (elbolab bdmc)"


def format_report(report: dict) -> str:
    """The bound table of an ``eval.json`` report, as printed by ``elbolab evaluate``."""
    lines = [
        f"{report['run']}: {report['split']} split, "
        f"{spread(report['num_datapoints'], report.get('every', 1))}, "
        f"{report['data']} ({report['binarization']}), seed {report['seed']}"
        + (f"; evaluation {report['name']!r}" if "name" in report else ""),
    ]
    lines += bound_table(bound_rows(report))
    dec = report["decomposition"]
    if report["kl_analytic"]:  # exact per datapoint: no Monte Carlo error to print
        kl = f"{dec['kl']:.3f} (analytic)"
    else:  # a Monte Carlo estimate of a KL can come out below 0: its error beside it
        se = report.get("decomposition_stderr", {}).get("kl", math.nan)
        kl = f"{dec['kl']:.3f} +- {se:.3f} (Monte Carlo; s.e. across datapoints)"
    lines.append(
        f"decomposition: reconstruction {dec['reconstruction']:.3f}, KL(q||p) {kl}, "
        f"entropy {dec['entropy']:.3f}"
    )
    log_px = report["log_px"]
    iwae = report.get("iwae_log_px", log_px)
    gap = log_px["mean"] - report["elbo"]["mean"]
    gap_se = math.hypot(log_px["stderr"], report["elbo"]["stderr"])
    line = (
        f"log p(x) ~ {log_px['mean']:.3f} +- {log_px['stderr']:.3f} ({log_px['estimator']}); "
        f"gap log p(x) - ELBO >= {gap:.3f}"
    )
    if gap < 3 * gap_se:  # a gap cannot be negative: say how far from 0 it may be
        line += f" +- {gap_se:.3f} (not distinguishable from 0 at 3 s.e.)"
    lines.append(line)
    if "khat" in report:
        k = report["khat"]
        lines.append(
            f"PSIS k-hat of the {iwae['k']} weights: {diagnostics.khat_counts(k)}; median IS "
            f"ESS {report['is_ess_median']:.1f}"
        )
        warning = diagnostics.khat_warning(k, what=f"the {iwae['estimator']} estimate of log p(x)")
        if warning:
            lines.append(warning)
    if "ais" in report:
        a = report["ais"]
        lines.append(
            f"AIS: {a['num_chains']} chains x {a['num_temperatures']} temperatures "
            f"({a['schedule']}), {a['leapfrog_steps']} leapfrog steps, mean acceptance "
            f"{a['acceptance']:.2f} ({a['seconds']:.1f} s); a stochastic lower bound on log p(x), "
            f"{a['mean'] - iwae['mean']:+.3f} from {iwae['estimator']}; "
            f"{a.get('converged', 'convergence not recorded')}"
        )
    if "perplexity" in report:
        ppl = report["perplexity"]
        cells = ", ".join(f"{k} {plus_minus(v, digits=1)}" for k, v in ppl["bounds"].items())
        lines.append(
            f"perplexity per word ({ppl['words']:,} words; upper bounds): {cells}; "
            f"unigram {ppl['unigram']:.1f}"
        )
    if "exact_log_px" in report:
        lines.append(f"exact log p(x) of this model: {report['exact_log_px']:.3f}")
    if "generating_model_log_px" in report:
        lines.append(
            f"log p(x) under the generating model: {report['generating_model_log_px']:.3f}"
        )
    lines.append(f"({report['seconds']:.1f} s)")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="ELBO, IWAE-k and log p(x) of a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--k", type=int_list, default=[1, 10, 100, 1000], help="e.g. 1,10,100,1000")
    add_flags(p, "split", "batch_size", "limit", "every", "seed", "device", "no_progress")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="record a chunk of particles once and compile it (inductor); default: "
                   "compile when batches x chunks >= 2000")  # fmt: skip
    p.add_argument("--ais", action="store_true", help="also estimate log p(x) by AIS")
    p.add_argument(
        "--name",
        type=_name,
        help="name of this evaluation (default from its "
        "settings, e.g. test-k1000, test-first20-k10); it replaces only one of its name",
    )
    add_ais_flags(p)
    p.set_defaults(func=run, shared=True)


def _name(text: str) -> str:
    try:
        return store.check_name(text)
    except RunError as err:
        raise argparse.ArgumentTypeError(str(err).partition(": ")[2]) from None


def run(args: argparse.Namespace) -> int:
    report = evaluate_run(
        args.run,
        ks=args.k,
        split=args.split,
        seed=args.seed,
        batch_size=args.batch_size,
        limit=args.limit,
        every=args.every,
        device=args.device,
        progress=not args.no_progress,
        ais=ais_settings(args) if args.ais else None,
        compile=args.compile,
        name=args.name,
    )
    if distributed.current().is_main:
        print(format_report(report))
    return 0
