"""Reference posteriors by NUTS, and ``elbolab diagnose``: how good is q(z|x) really.

For chosen datapoints, NUTS (Hoffman & Gelman 2014) samples p(z | x) under
the trained model, with several independent chains whose R-hat and ESS are
checked (Vehtari et al. 2021). The guide q(z | x) is compared with it through
the moments of each latent, and through the PSIS k-hat of q as an importance
proposal for p(z | x) (Yao et al. 2018), which needs no MCMC at all.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS

from . import diagnostics
from .bounds import iwae_bound, log_importance_weights
from .runs import RunError, load_run, write_json

DIAGNOSE = "diagnose.json"
DIAGNOSE_TREE = "diagnose.nc"
RHAT_MAX = 1.01
ESS_MIN = 400


def run_nuts(
    model: Callable,
    *args,
    num_chains: int = 4,
    num_samples: int = 500,
    warmup_steps: int = 500,
    seed: int = 0,
    progress: bool = False,
    jit: bool = False,
    **kwargs,
) -> tuple[dict[str, torch.Tensor], dict[int, list[int]]]:
    """Run NUTS chains one after another (no worker processes) on ``model(*args)``.

    ``jit=True`` traces the potential energy with Pyro's JIT (``torch.jit.trace``,
    deprecated in recent torch, whose warning is silenced here): 1.6x faster
    for a binarized-MNIST VAE posterior, and a different, equally valid, chain.

    Returns
    -------
    samples : dict
        Site name -> tensor of shape (chain, draw, ...).
    divergences : dict
        Chain -> indices of divergent transitions.
    """
    per_chain: list[dict[str, torch.Tensor]] = []
    divergences: dict[int, list[int]] = {}
    for chain in range(num_chains):
        pyro.set_rng_seed(seed + chain)
        kernel = NUTS(model, jit_compile=jit, ignore_jit_warnings=True)
        mcmc = MCMC(
            kernel,
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            disable_progbar=not progress,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.trace` is deprecated", DeprecationWarning)
            mcmc.run(*args, **kwargs)
        per_chain.append({k: v.detach() for k, v in mcmc.get_samples().items()})
        divergences[chain] = list(mcmc.diagnostics().get("divergences", {}).get("chain 0", []))
    samples = {name: torch.stack([c[name] for c in per_chain]) for name in per_chain[0]}
    return samples, divergences


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
    from .plots import plot_posterior_pairs

    run_dir = Path(run_dir)
    _, dataset, model = load_run(run_dir)
    data = dataset.split(split)
    chosen = np.asarray(indices) if indices else _choose(points, data.shape[0], seed)
    if chosen.min() < 0 or chosen.max() >= data.shape[0]:
        raise RunError(f"--indices must lie in 0..{data.shape[0] - 1}")
    x = data[torch.as_tensor(chosen)]
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
    z_nuts = samples["z"]  # (chain, draw, point, latent)
    coords = {"datapoint": chosen, "latent": np.arange(z_nuts.shape[-1])}
    tree = diagnostics.samples_to_datatree(
        {"z": z_nuts},
        coords=coords,
        sample_stats={"diverging": _diverging(divergences, z_nuts.shape[:2])},
    )
    rhat, ess = diagnostics.rhat_ess(tree, "z")

    pyro.set_rng_seed(seed)
    with torch.no_grad():
        z_q = model.posterior(x).sample((num_chains * num_samples,))  # (draw, point, latent)
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
        "divergences": int(sum(len(v) for v in divergences.values())),
        "max_rhat": float(rhat.max()),
        "min_ess_bulk": float(ess.min()),
        "converged": converged,
        "khat": diagnostics.khat_summary(khat),
        "points": per_point,
    }
    guide_tree = diagnostics.samples_to_datatree({"z": z_q.unsqueeze(0)}, coords=coords)
    weights = diagnostics.weights_to_datatree(log_w, bounds={"iwae": iwae}, datapoints=chosen)
    tree["guide"] = guide_tree["posterior"]
    tree["log_weights"] = weights["log_weights"]
    tree["bounds"] = weights["bounds"]
    diagnostics.save_datatree(tree, run_dir / DIAGNOSE_TREE)
    plot_posterior_pairs(
        flat_nuts.numpy(), z_q.numpy(), chosen, run_dir / "diagnose_pairs.png", khat=khat
    )
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
        f"{'index':>6} {'k-hat':>6} {'IS ESS':>8} {'IWAE':>9} {'mean err/sd':>11} "
        f"{'sd q/nuts':>10} {'R-hat':>6} {'ESS':>6}",
    ]
    for p in report["points"]:
        lines.append(
            f"{p['index']:>6} {p['khat']:>6.2f} {p['is_ess']:>8.1f} {p['log_px_iwae']:>9.2f} "
            f"{p['max_mean_error_sd']:>11.2f} {p['sd_ratio_q_over_nuts_median']:>10.2f} "
            f"{p['max_rhat']:>6.3f} {p['min_ess_bulk']:>6.0f}"
        )
    k = report["khat"]
    lines.append(
        f"k-hat of q as a proposal for p(z|x) (K={report['num_particles']}): {k['good']} good "
        f"(< 0.5), {k['ok']} usable (0.5-0.7), {k['bad']} bad (>= 0.7)"
    )
    warning = diagnostics.khat_warning(report["khat"], what="the IWAE estimate")
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def read_report(run_dir: Path, name: str) -> dict:
    path = Path(run_dir) / name
    if not path.exists():
        raise RunError(f"{run_dir} has no {name}")
    return json.loads(path.read_text())
