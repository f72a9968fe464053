"""``elbolab diagnose``: how good is q(z|x) really, against a NUTS reference posterior.

For chosen datapoints, NUTS samples p(z | x) under the trained model
(:func:`inference.reference.run_nuts`). The guide is compared with it through
the moments of each latent of its *marginal* q(z | x) (z drawn from the whole
guide: for an encoder with several stochastic layers, the auxiliary layers
are sampled, not fixed at their means), and through the PSIS k-hat of the
guide as an importance proposal for p(z | x) (Yao et al. 2018), which needs
no MCMC at all.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyro
import torch

from .. import diagnostics, provenance
from ..bounds import iwae_bound
from ..plots import plot_marginals, plot_posterior_pairs
from ..reference import ESS_MIN, RHAT_MAX, run_nuts
from ..runs import RunError, load_run, write_json
from ..tracing import log_importance_weights, top_latent
from .flags import add_flags, nonnegative_list
from .report import table

DIAGNOSE = "diagnose.json"
DIAGNOSE_TREE = "diagnose.nc"
GUIDE_DRAWS = "marginal q(z|x): z from the whole guide, every layer below it sampled"


def _choose(num: int, size: int, seed: int) -> np.ndarray:
    if num > size:
        raise RunError(f"--points {num} is more than the {size} datapoints of the split")
    return np.sort(np.random.default_rng(seed).choice(size, size=num, replace=False))


def diagnose_run(
    run_dir: str | Path,
    *,
    points: int = 5,
    indices: list[int] | None = None,
    split: str = "test",
    num_chains: int = 4,
    num_samples: int = 500,
    warmup_steps: int = 500,
    num_particles: int = 5000,
    seed: int = 0,
    progress: bool = True,
    jit: bool = False,
) -> dict:
    """NUTS reference posteriors for chosen datapoints, compared with the run's guide.

    Writes ``diagnose.json`` (summary), ``diagnose.nc`` (DataTree with groups
    ``posterior`` and ``sample_stats`` from NUTS, ``guide`` draws of q(z|x),
    ``log_weights`` and ``bounds``) and ``diagnose_pairs.png`` into the run.
    """
    settings, started = provenance.settings(locals()), time.time()
    run_dir = Path(run_dir)
    config, dataset, model = load_run(run_dir)
    data = dataset.split(split)
    chosen = np.asarray(indices) if indices else _choose(points, data.shape[0], seed)
    if chosen.min() < 0 or chosen.max() >= data.shape[0]:
        raise RunError(f"--indices must lie in 0..{data.shape[0] - 1}")
    x = data[torch.as_tensor(chosen)]
    try:
        site = top_latent(model.guide, x)
    except ValueError as err:
        raise RunError(f"diagnose: {err}") from None
    model.requires_grad_(False)  # NUTS needs gradients in z only
    tic = time.perf_counter()
    samples, divergences = run_nuts(
        model.model,
        x,
        num_chains=num_chains,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        seed=seed,
        progress=progress,
        jit=jit,
    )
    nuts_seconds = time.perf_counter() - tic
    z_nuts = samples[site]  # (chain, draw, point, latent)
    coords = {"datapoint": chosen, "latent": np.arange(z_nuts.shape[-1])}
    # The tree names the top latent "z" whatever the site is called (a site named "latent"
    # would clash with the dimension of that name); the report names the site.
    tree = diagnostics.samples_to_datatree(
        {"z": z_nuts},
        coords=coords,
        sample_stats={"diverging": _diverging(divergences, z_nuts.shape[:2])},
    )
    rhat, ess = diagnostics.rhat_ess(tree, "z")

    pyro.set_rng_seed(seed)
    guide_tree = diagnostics.from_guide(
        model.guide, x, num_samples=num_chains * num_samples, sites=[site], names={site: "z"},
        coords=coords,
    )  # fmt: skip
    z_q = torch.as_tensor(guide_tree["posterior"]["z"].values[0])  # (draw, point, latent)
    with torch.no_grad():
        log_w = log_importance_weights(
            model.model, model.guide, x, num_particles=num_particles, chunk_size=1000
        )
    khat = diagnostics.psis_khat(log_w)
    ess_is = diagnostics.importance_ess(log_w)
    iwae = iwae_bound(log_w).value.numpy()

    flat_nuts = z_nuts.reshape(-1, *z_nuts.shape[2:])
    nuts_mean, nuts_sd = flat_nuts.mean(0), flat_nuts.std(0)
    q_mean, q_sd = z_q.mean(0), z_q.std(0)
    per_point = []
    for i, index in enumerate(chosen):
        per_point.append(
            {
                "index": int(index),
                "khat": float(khat[i]),
                "is_ess": float(ess_is[i]),
                "log_px_iwae": float(iwae[i]),
                "max_rhat": float(rhat[i].max()),
                "min_ess_bulk": float(ess[i].min()),
                # how far q's means sit from the reference, in posterior standard deviations
                "max_mean_error_sd": float(((q_mean[i] - nuts_mean[i]).abs() / nuts_sd[i]).max()),
                "sd_ratio_q_over_nuts_median": float((q_sd[i] / nuts_sd[i]).median()),
                "sd_ratio_q_over_nuts_min": float((q_sd[i] / nuts_sd[i]).min()),
            }
        )
    converged = bool(rhat.max() <= RHAT_MAX and ess.min() >= ESS_MIN)
    report = {
        "run": str(run_dir),
        "split": split,
        "seed": seed,
        "num_chains": num_chains,
        "num_samples": num_samples,
        "warmup_steps": warmup_steps,
        "num_particles": num_particles,
        "nuts_seconds": nuts_seconds,
        "jit": jit,
        "guide_draws": GUIDE_DRAWS,
        "site": site,
        "divergences": int(sum(len(v) for v in divergences.values())),
        "max_rhat": float(rhat.max()),
        "min_ess_bulk": float(ess.min()),
        "converged": converged,
        "khat": diagnostics.khat_summary(khat),
        "points": per_point,
    }
    indices_hash = provenance.tensor_sha256(np.asarray(chosen, dtype=np.int64))
    report["provenance"] = provenance.of_run(
        "diagnose", model, config, settings=settings, seed=seed, started=started,
        datapoints={"split": split, "indices": [int(i) for i in chosen],
                    "indices_sha256": indices_hash, "values_sha256": provenance.tensor_sha256(x)},
    )  # fmt: skip
    weights = diagnostics.weights_to_datatree(log_w, bounds={"iwae": iwae}, datapoints=chosen)
    tree["guide"] = guide_tree["posterior"]
    tree["log_weights"] = weights["log_weights"]
    tree["bounds"] = weights["bounds"]
    diagnostics.save_datatree(tree, run_dir / DIAGNOSE_TREE)
    plot_posterior_pairs(
        flat_nuts.numpy(), z_q.numpy(), chosen, run_dir / "diagnose_pairs.png", khat=khat
    )
    hardest = int(np.nan_to_num(khat, nan=-1.0).argmax())
    widest = np.argsort(-nuts_sd[hardest].numpy())[: min(4, nuts_sd.shape[-1])]
    plot_marginals(tree, guide_tree, datapoint=int(chosen[hardest]), latents=sorted(widest),
                   path=run_dir / "diagnose_marginals.png", khat=float(khat[hardest]))  # fmt: skip
    write_json(run_dir / DIAGNOSE, report)
    return report


def _diverging(divergences: dict[int, list[int]], shape) -> np.ndarray:
    out = np.zeros(tuple(shape), dtype=bool)
    for chain, idx in divergences.items():
        out[chain, idx] = True
    return out


def format_diagnose(report: dict) -> str:
    """The table printed by ``elbolab diagnose``."""
    lines = [
        f"{report['run']}: NUTS reference for {len(report['points'])} {report['split']} "
        f"datapoints, {report['num_chains']} chains x {report['num_samples']} draws "
        f"({report['nuts_seconds']:.1f} s), {report['divergences']} divergences",
        f"NUTS convergence: max R-hat {report['max_rhat']:.3f}, min bulk ESS "
        f"{report['min_ess_bulk']:.0f} -> "
        + (
            "ok"
            if report["converged"]
            else f"NOT converged (want R-hat <= {RHAT_MAX}, "
            f"ESS >= {ESS_MIN}); add --samples/--warmup"
        ),  # fmt: skip
        f"guide: {report.get('guide_draws', 'q(z|x)')}",
    ]
    columns = [
        ("index", ">6"), ("k-hat", ">7.2f"), ("IS ESS", ">9.1f"), ("IWAE", ">10.2f"),
        ("mean err/sd", ">12.2f"), ("sd q/nuts", ">11.2f"), ("R-hat", ">7.3f"), ("ESS", ">7.0f"),
    ]  # fmt: skip
    lines += table(
        columns,
        (
            (p["index"], p["khat"], p["is_ess"], p["log_px_iwae"], p["max_mean_error_sd"],
             p["sd_ratio_q_over_nuts_median"], p["max_rhat"], p["min_ess_bulk"])
            for p in report["points"]
        ),
    )  # fmt: skip
    k = report["khat"]
    lines.append(
        f"k-hat of q as a proposal for p(z|x) (K={report['num_particles']}): "
        f"{diagnostics.khat_counts(k)}"
    )
    warning = diagnostics.khat_warning(report["khat"], what="the IWAE estimate")
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="NUTS reference posteriors vs the guide, with k-hat")
    p.add_argument("run", help="run directory")
    p.add_argument("--points", type=int, default=5, help="datapoints to diagnose (default 5)")
    p.add_argument("--indices", type=nonnegative_list, help="datapoint indices instead of --points")
    add_flags(p, "split")
    p.add_argument("--chains", type=int, default=4, help="NUTS chains (default 4)")
    p.add_argument("--samples", type=int, default=500, help="draws per chain (default 500)")
    p.add_argument("--warmup", type=int, default=500, help="warm-up steps (default 500)")
    p.add_argument("--num-particles", type=int, default=5000, help="K for k-hat (default 5000)")
    add_flags(p, "seed")
    p.add_argument(
        "--jit",
        action="store_true",
        help="trace NUTS's potential with Pyro's JIT (about 1.6x faster on MNIST)",
    )
    add_flags(p, "no_progress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
