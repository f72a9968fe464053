"""``elbolab gaps``: every bound and gap of a trained run, with the inequalities they obey.

On one split: log p(x) (IWAE with the extended target), L_marg (plug-in, for
several S), L_aux, L_h, the mutual information and reverse-model slack, the
chain log p(x) >= L_marg >= L_aux, L_marg >= L_h checked at 3 standard
errors, the approximation/amortisation split (Cremer et al. 2018), ELBO
surgery and active units. Bounds carry Monte Carlo standard errors (the
datapoints fixed); the Cremer split, an average of per-datapoint gaps on a
subset, carries the standard error across those datapoints. Each entry of
``gaps.json`` says which (``"error"``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import diagnostics, distributed, provenance
from ..ais import annealed_log_marginal, annealing_pair
from ..amortization import amortization_split
from ..bounds import MONTE_CARLO, Bound, across_datapoints
from ..evaluation import perplexity
from ..hierarchical import hierarchical_bounds
from ..plots import plot_gaps
from ..runs import load_run, write_json
from ..surgery import active_units, aggregate_posterior_terms, hierarchical_surgery, posterior_means
from .flags import add_ais_flags, add_flags, ais_settings, datapoints, int_list, spread
from .report import bound_table, plus_minus

GAPS = "gaps.json"


def _inequality(name: str, high: tuple, low: tuple, *, paired: dict | None = None) -> dict:
    """Whether ``high >= low`` held at 3 standard errors.

    ``paired`` is the per-particle difference's summary when there is one
    (same draws on both sides): its mean and smaller standard error are used.
    """
    if paired is not None:
        diff, se = paired["mean"], paired["stderr"]
    else:
        diff, se = high[0] - low[0], math.hypot(high[1], low[1])
    if diff > 3 * se:
        verdict = "held (strictly, > 3 s.e.)"
    elif diff >= -3 * se:
        verdict = "held within 3 s.e. (equality not excluded)"
    else:
        verdict = "VIOLATED by more than 3 s.e."
    return {
        "inequality": name, "difference": diff, "stderr": se, "error": MONTE_CARLO,
        "verdict": verdict,
    }  # fmt: skip


def gaps_run(
    run_dir,
    *,
    split: str = "test",
    limit: int | None = None,
    every: int = 1,
    num_particles: int = 1000,
    inner_samples: Sequence[int] = (1, 10, 100),
    marg_particles: int = 10,
    batch_size: int = 100,
    cremer_steps: int = 300,
    cremer_points: int = 500,
    seed: int = 0,
    progress: bool = True,
    ais: dict | None = None,
) -> dict:
    """Every bound and gap of a trained run on one split; writes ``gaps.json`` and ``gaps.png``.

    The Cremer split (an optimisation per datapoint) runs on the first
    ``cremer_points`` datapoints, and the multi-layer ELBO surgery (N^2 pairs)
    on the first 500; every other term uses the whole split. With ``ais``
    (settings of :func:`inference.ais.annealed_log_marginal`) log p(x) is
    AIS's estimate, also for the Cremer split (as Cremer et al. 2018 did),
    instead of IWAE with ``num_particles``.
    """
    settings, started = provenance.settings(locals()), time.time()
    estimator = f"AIS-{ais['num_temperatures']}" if ais else f"IWAE-{num_particles}"
    run_dir = Path(run_dir)
    config, dataset, model = load_run(run_dir)
    whole = dataset.split(split)
    x_all = datapoints(whole, limit=limit, every=every)
    points = provenance.datapoints(x_all, split=split, total=whole.shape[0], every=every,
                                   limit=limit)  # fmt: skip
    aux = list(getattr(model, "h_names", []))
    # elbolab's models expose their encoder; a user's own model may not
    conventions = callable(getattr(model, "posterior", None)) and callable(
        getattr(model, "prior", None)
    )
    world = distributed.current()

    def batch(x: torch.Tensor, start: int) -> tuple[dict, torch.Tensor, dict | None]:
        result = hierarchical_bounds(
            model.model, model.guide, x, aux_sites=aux, num_particles=num_particles,
            inner_samples=inner_samples if aux else (), marg_particles=marg_particles,
            statistics={"khat": diagnostics.psis_khat},
        )  # fmt: skip
        bounds = result["bounds"]
        if ais:
            model.requires_grad_(False)
            estimate = annealed_log_marginal(*annealing_pair(model), x, **ais)
            bounds[f"iwae[{num_particles}]"] = bounds["log_px"]  # kept beside AIS's
            bounds["log_px"] = Bound(estimate.value, estimate.stderr)
        if not aux:  # one stochastic layer: q(z|x) is exact, L_marg = L_aux = L_h
            for s in inner_samples:
                bounds[f"l_marg[{s}]"] = bounds["l_aux"]
        khat = torch.as_tensor(result["statistics"]["khat"]).reshape(-1)
        split = None
        if conventions and not getattr(model, "corruption", None) and start < cremer_points:
            split = amortization_split(model, x, log_px=bounds["log_px"].value, steps=cremer_steps)
        return bounds, khat, split

    done = distributed.map_batches(x_all, batch_size, batch, seed=(seed, distributed.STREAM_GAPS),
                                   world=world, desc="gaps", progress=progress)  # fmt: skip
    parts = [bounds for bounds, _, _ in done]
    khats = [khat for _, khat, _ in done]
    splits = [split for _, _, split in done if split is not None]
    # What follows is computed on every rank alike (from one seed); rank 0 writes it.
    distributed.seed_all(distributed.batch_seed(seed, distributed.STREAM_GAPS_WHOLE))
    bounds = {name: Bound.cat([p[name] for p in parts]) for name in parts[0]}
    summary = {name: b.summary() for name, b in bounds.items()}
    s_max = max(inner_samples)
    marg = summary[f"l_marg[{s_max}]"]
    chain = [
        _inequality("log p(x) >= L_marg", _pair(summary["log_px"]), _pair(marg)),
        _inequality(
            "L_marg >= L_aux", _pair(marg), _pair(summary["l_aux"]),
            paired=summary.get(f"reverse_slack[{s_max}]"),
        ),
        _inequality(
            "L_marg >= L_h", _pair(marg), _pair(summary["l_h"]),
            paired=summary.get(f"mutual_information[{s_max}]"),
        ),
    ]  # fmt: skip
    # Every one of these is a valid lower bound on log p(x); IWAE-K is only the tightest
    # once it has converged (few particles, or a poor reverse model, leave it loose).
    lower = {name: summary[name]["mean"] for name in ("log_px", "l_aux", "l_h")}
    best = max(lower, key=lower.get)
    if best != "log_px":
        chain[0]["verdict"] += (
            f" ({estimator} lies below {best} = {lower[best]:.2f}, itself a lower "
            "bound: the importance-sampling estimate of log p(x) has not converged)"
        )
    if aux and len(inner_samples) > 1:
        # The plug-in is biased upwards, less so as S grows: has it stopped moving?
        s_prev = sorted(inner_samples)[-2]
        drop = summary[f"l_marg[{s_prev}]"]["mean"] - marg["mean"]
        spread = math.hypot(summary[f"l_marg[{s_prev}]"]["stderr"], marg["stderr"])
        converged = drop < 3 * spread
        if not converged:
            chain[0]["verdict"] += (
                f" (L_marg's plug-in estimate fell by {drop:.2f} from S={s_prev} to S={s_max}: "
                "not converged, biased upwards; raise --inner-samples)"
            )
    else:
        converged = True
    khat = torch.cat(khats).numpy()
    report = {
        "run": str(run_dir),
        "model": config.model,
        "layers": getattr(model, "layers", 1),
        "objective": config.objective,
        "split": split,
        "num_datapoints": int(x_all.shape[0]),
        "every": every,
        "num_particles": num_particles,
        "log_px_estimator": estimator,
        **({"ais": ais} if ais else {}),
        "inner_samples": list(inner_samples),
        "marg_particles": marg_particles,
        "seed": seed,
        "bounds": summary,
        "chain": chain,
        "l_marg_converged": converged,
        "best_lower_bound": {"name": best, "value": lower[best]},
        "khat": diagnostics.khat_summary(khat),
        "active_units": _active_units(model.guide, x_all[:2000]),
    }
    if dataset.likelihood == "multinomial":  # documents: the same bounds as perplexities
        names = ("log_px", f"iwae[{num_particles}]", f"l_marg[{s_max}]", "l_aux", "l_h")
        names = [name for name in names if name in summary]
        report["perplexity"] = {name: perplexity(summary[name], x_all) for name in names}
    if not conventions:
        report["not_measured"] = (
            "the Cremer split and ELBO surgery: they need the model's posterior(x) and prior(x) "
            "(elbolab's VAE conventions)"
        )
    if splits:
        joined = {k: torch.cat([s[k] for s in splits]) for k in splits[0]}
        report["cremer_points"] = min(cremer_points, int(x_all.shape[0]))
        report["cremer"] = {k: across_datapoints(v) for k, v in joined.items()}
    if not conventions:
        pass
    elif not aux:  # one stochastic layer: q(z | x) has a density
        report["surgery"] = aggregate_posterior_terms(
            model.posterior, model.prior(x_all), x_all[:2000]
        )
    else:  # a mixture: plug-in densities over all N^2 pairs, so on fewer datapoints
        report["surgery"] = hierarchical_surgery(
            model.model, model.guide, x_all[:500], aux_sites=aux, prior=model.prior(x_all),
            inner_samples=10,
        )  # fmt: skip

    report["provenance"] = provenance.of_run(
        "gaps", model, config, settings=settings, seed=seed, started=started,
        world_size=world.size, datapoints=points,
    )  # fmt: skip

    def write() -> None:
        write_json(run_dir / GAPS, report)
        plot_gaps(report, run_dir / "gaps.png")

    distributed.on_main(world, write)
    return report


def _active_units(guide, x) -> int | None:
    """Active units of the guide's top latent; None when it has no single one."""
    try:
        return active_units(posterior_means(guide, x))
    except ValueError:
        return None


def _pair(summary: dict) -> tuple[float, float]:
    return summary["mean"], summary["stderr"]


def format_gaps(report: dict) -> str:
    """The inequality chain and gap table printed by ``elbolab gaps``."""
    b = report["bounds"]
    lines = [
        f"{report['run']}: {report['model']} with {report['layers']} stochastic layer(s), "
        f"{report['split']} split ({spread(report['num_datapoints'], report.get('every', 1))}), "
        f"log p(x) by {report.get('log_px_estimator', 'IWAE-' + str(report['num_particles']))}",
    ]
    lines += bound_table(b, title="term", widths=(28, 11, 9))
    for item in report["chain"]:
        lines.append(
            f"{item['inequality']:<22} difference {item['difference']:8.3f} "
            f"+- {item['stderr']:.3f}: {item['verdict']}"
        )
    if "cremer" in report:
        c = report["cremer"]
        bound = "L_aux" if report["layers"] > 1 else "ELBO"
        lines.append(
            f"Cremer split of log p(x) - {bound} = {c['total_gap']['mean']:.3f} (first "
            f"{report.get('cremer_points', '?')} datapoints): approximation "
            f"{c['approximation_gap']['mean']:.3f} +- {c['approximation_gap']['stderr']:.3f}, "
            f"amortisation {c['amortization_gap']['mean']:.3f} "
            f"+- {c['amortization_gap']['stderr']:.3f} (s.e. across those datapoints)"
        )
    if "surgery" in report:
        lines += format_surgery(report["surgery"])
    if "perplexity" in report:
        cells = ", ".join(f"{k} {plus_minus(v, digits=1)}" for k, v in report["perplexity"].items())
        lines.append(f"perplexity per word (from each bound; upper bounds): {cells}")
    lines.append(f"active units: {report['active_units']}")
    if "not_measured" in report:
        lines.append(f"not measured for this model: {report['not_measured']}")
    warning = None
    if "ais" not in report:  # with AIS, log p(x) does not rest on these importance weights
        warning = diagnostics.khat_warning(
            report["khat"], what=f"the IWAE-{report['num_particles']} estimate"
        )
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def format_surgery(s: dict) -> list[str]:
    """The surgery identity with each term's standard error, and any impossible sign named."""

    def term(name: str) -> str:
        se = s.get(f"{name}_stderr")
        return f"{s[name]:.3f}" + (f" +- {se:.3f}" if se is not None else "")

    lines = [
        f"ELBO surgery: average KL {term('average_kl')} = I_q(x;z) {term('mutual_information')} "
        f"(<= log N = {s['log_n']:.2f}) + KL(q(z)||p(z)) {term('marginal_kl')} (s.e. across "
        "datapoints)"
    ]
    for name in s.get("impossible", []):
        lines.append(
            f"  {name} is below 0 by more than 3 s.e., which no KL or mutual information can "
            "be: the estimator is biased here (few datapoints for q(z), or few inner samples); "
            "do not read the split"
        )
    return lines


def add_parser(sub) -> None:
    p = sub.add_parser("gaps", help="log p(x), L_marg, L_aux, L_h and every gap, with errors")
    p.add_argument("run", help="run directory")
    add_flags(p, "split", "limit", "every")
    p.add_argument("--k", type=int, default=1000, help="particles for log p(x) (default 1000)")
    p.add_argument("--inner-samples", type=int_list, default=[1, 10, 100],
                   help="S for the L_marg estimate (default 1,10,100)")  # fmt: skip
    p.add_argument("--marg-particles", type=int, default=10, help="outer draws for L_marg")
    add_flags(p, "batch_size", "seed", "no_progress")
    p.add_argument(
        "--logpx",
        choices=("iwae", "ais"),
        default="iwae",
        help="estimator of log p(x): IWAE with --k particles or AIS (default iwae)",
    )
    add_ais_flags(p)
    p.set_defaults(func=run, shared=True)


def run(args: argparse.Namespace) -> int:
    report = gaps_run(
        args.run, split=args.split, limit=args.limit, every=args.every, num_particles=args.k,
        inner_samples=args.inner_samples, marg_particles=args.marg_particles,
        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
        ais=ais_settings(args) if args.logpx == "ais" else None,
    )  # fmt: skip
    if distributed.current().is_main:
        print(format_gaps(report))
        print(f"written {args.run}/gaps.json, gaps.png")
    return 0
