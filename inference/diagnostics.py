"""Posterior diagnostics with ArviZ 1.x: Pyro results as DataTrees, PSIS k-hat, NUTS references.

This is the only module that imports arviz (where used, so that the command line
starts without its second of imports). ArviZ 1.x has no Pyro converter;
the functions here build ``xarray.DataTree`` objects with named dimensions
(``chain``, ``draw``, ``datapoint``, ``latent``) from Pyro MCMC runs, guide
samples and elbolab's log importance weights, and save them as netCDF.

Importance-sampling diagnostics follow Yao, Vehtari, Simpson & Gelman (2018),
"Yes, but did it work?": the Pareto shape k-hat of the upper tail of the
importance weights w = p(x, z) / q(z | x), z ~ q, says whether the IWAE
estimate of log p(x) can be trusted: k < 0.5 good, 0.5 <= k < 0.7 usable with
care, k >= 0.7 the estimate is unreliable (the weights' variance is
effectively infinite and convergence impractically slow).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pyro.infer import Predictive

from . import bounds
from .bounds import Bound
from .runs import atomic_write

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["psis_khat", "importance_ess", "weights_to_datatree", "from_mcmc", "from_guide"]

KHAT_GOOD = 0.5
KHAT_BAD = 0.7
# PSIS fits the largest K/5 weights (K <= 225) and needs at least 5 of them.
KHAT_MIN_PARTICLES = 25


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def psis_khat(log_w) -> np.ndarray:
    """Pareto k-hat of the importance weights, one per datapoint.

    Parameters
    ----------
    log_w : array-like or torch.Tensor
        Log importance weights, shape (K, N) (particles first) or (K,).

    Returns
    -------
    numpy.ndarray
        Shape (N,), or a 0-d array for (K,) input. NaN where it cannot be
        estimated: fewer than :data:`KHAT_MIN_PARTICLES` weights (unless they
        are all equal or all zero, which need no fit).

    Notes
    -----
    ArviZ's ``psislw`` follows the leave-one-out convention (weights
    proportional to exp(-ary)), so it is given ``-log_w``. Datapoints whose
    weights are all -inf get k-hat = inf; equal weights get 0.

    References
    ----------
    Vehtari, Simpson, Gelman, Yao & Gabry (2024), Pareto Smoothed Importance
    Sampling, JMLR 25. Yao, Vehtari, Simpson & Gelman (2018), Yes, but Did It
    Work?: Evaluating Variational Inference, ICML.

    Examples
    --------
    >>> import torch
    >>> from inference import psis_khat
    >>> log_w = torch.distributions.Normal(0.0, 1.0).log_prob(torch.randn(1000, 4) * 0.5)
    >>> psis_khat(log_w).shape                        # one k-hat per datapoint (column)
    (4,)
    """
    from arviz_stats.base import array_stats

    lw = _numpy(log_w)
    if lw.ndim not in (1, 2):
        raise ValueError(f"log_w must have shape (K,) or (K, N), got {lw.shape}")
    columns = lw.reshape(lw.shape[0], -1)
    khat = np.array([_column_khat(c, array_stats) for c in columns.T])
    return khat.reshape(lw.shape[1:])


def _column_khat(lw: np.ndarray, array_stats) -> float:
    finite = np.isfinite(lw)
    if not finite.any():
        return np.inf  # no weight is positive: nothing can be estimated
    if np.ptp(lw[finite]) == 0:
        return 0.0  # equal weights are bounded
    if lw.size < KHAT_MIN_PARTICLES:
        return np.nan  # too few weights for a tail fit
    # -inf weights are exact zeros, below any tail: put them just under the smallest.
    lw = np.where(finite, lw, lw[finite].min() - 50.0)
    try:
        _, khat = array_stats.psislw(-lw, r_eff=1, axis=0)
    except ValueError as err:  # a constant tail: the largest weights are all equal, so bounded
        if "same" not in str(err):
            raise
        return 0.0
    return float(khat)


def importance_ess(log_w) -> np.ndarray:
    """Importance-sampling effective sample size 1 / sum_k wbar_k^2 per datapoint, as numpy.

    Examples
    --------
    >>> import torch
    >>> from inference import importance_ess
    >>> importance_ess(torch.zeros(100, 2))           # equal weights: ESS = K
    array([100., 100.]...)
    """
    return bounds.importance_ess(torch.as_tensor(_numpy(log_w))).numpy()


def khat_summary(khat) -> dict:
    """Counts of datapoints in each k-hat band of Yao et al. (2018), and the worst value.

    Datapoints whose k-hat could not be estimated (NaN) are counted apart,
    as ``not_estimable``; ``max`` and ``median`` are over the others (NaN if none).
    """
    k = np.atleast_1d(np.asarray(khat, dtype=np.float64))
    known = k[~np.isnan(k)]
    return {
        "num_datapoints": int(k.size),
        "good": int((known < KHAT_GOOD).sum()),
        "ok": int(((known >= KHAT_GOOD) & (known < KHAT_BAD)).sum()),
        "bad": int((known >= KHAT_BAD).sum()),
        "not_estimable": int(k.size - known.size),
        "max": float(known.max()) if known.size else float("nan"),
        "median": float(np.median(known)) if known.size else float("nan"),
    }


def khat_counts(summary: dict) -> str:
    """The bands of a :func:`khat_summary` in words, for the printed reports."""
    text = (
        f"{summary['good']} good (< {KHAT_GOOD}), {summary['ok']} usable, {summary['bad']} bad "
        f"(>= {KHAT_BAD}) of {summary['num_datapoints']}"
    )
    missing = summary.get("not_estimable", 0)
    if missing:
        text += (
            f"; not estimable for {missing} (PSIS needs K >= {KHAT_MIN_PARTICLES} weights "
            "unless they are all equal)"
        )
    return text


def khat_warning(summary: dict, *, what: str) -> str | None:
    """A sentence for users when some k-hat are >= 0.7 (given :func:`khat_summary`), else None."""
    if not summary["bad"]:
        return None
    return (
        f"warning: PSIS k-hat >= {KHAT_BAD} for {summary['bad']} of "
        f"{summary['num_datapoints']} datapoints (max {summary['max']:.2f}): {what} is not "
        "to be trusted for them (Yao et al. 2018); use more particles or a better guide"
    )


# ---------------------------------------------------------------------------
# DataTree converters
# ---------------------------------------------------------------------------


def _sample_dims(value: np.ndarray, name: str, dims: Mapping[str, list[str]] | None) -> list[str]:
    if dims and name in dims:
        return list(dims[name])
    rest = value.ndim - 2
    if rest == 2:  # a variable may not share its name with a dimension
        return [d if d != name else f"{d}_dim" for d in ("datapoint", "latent")]
    return [f"{name}_dim_{i}" for i in range(rest)]


def samples_to_datatree(
    samples: Mapping[str, object],
    *,
    group: str = "posterior",
    dims: Mapping[str, list[str]] | None = None,
    coords: Mapping[str, object] | None = None,
    sample_stats: Mapping[str, object] | None = None,
    attrs: Mapping[str, object] | None = None,
):
    """A DataTree from arrays shaped (chain, draw, ...), one variable per Pyro site.

    Site values with two dimensions beyond (chain, draw) are named
    (``datapoint``, ``latent``) unless ``dims`` says otherwise.
    """
    from arviz_base import from_dict

    arrays = {name: _numpy(v) for name, v in samples.items()}
    for name, value in arrays.items():
        if value.ndim < 2:
            raise ValueError(f"{name}: expected shape (chain, draw, ...), got {value.shape}")
    all_dims = {name: _sample_dims(v, name, dims) for name, v in arrays.items()}
    data = {group: arrays}
    if sample_stats:
        data["sample_stats"] = {name: _numpy(v) for name, v in sample_stats.items()}
    return from_dict(data, dims=all_dims, coords=dict(coords or {}), attrs=dict(attrs or {}))


def from_mcmc(mcmc, *, dims=None, coords=None):
    """Convert a finished Pyro ``MCMC`` (any number of chains) to a DataTree.

    ``posterior`` holds every sampled site as (chain, draw, ...); ``sample_stats``
    holds the per-chain divergence indicator when Pyro recorded it.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro.infer import MCMC, NUTS
    >>> from inference import from_mcmc
    >>> def model():
    ...     pyro.sample("mu", dist.Normal(0.0, 1.0))
    >>> mcmc = MCMC(NUTS(model), num_samples=20, warmup_steps=20, disable_progbar=True)
    >>> mcmc.run()
    >>> tree = from_mcmc(mcmc)
    >>> dict(tree["posterior"]["mu"].sizes)
    {'chain': 1, 'draw': 20}
    """
    samples = mcmc.get_samples(group_by_chain=True)
    chains, draws = next(iter(samples.values())).shape[:2]
    stats = {}
    diagnostics = mcmc.diagnostics()
    divergences = diagnostics.get("divergences")
    if divergences:
        diverging = np.zeros((chains, draws), dtype=bool)
        for c, idx in enumerate(divergences.values()):
            diverging[c, list(idx)] = True
        stats["diverging"] = diverging
    return samples_to_datatree(samples, dims=dims, coords=coords, sample_stats=stats or None)


def from_guide(
    guide: Callable,
    *args,
    num_samples: int,
    sites: Sequence[str] | None = None,
    names: Mapping[str, str] | None = None,
    dims=None,
    coords=None,
    **kwargs,
):
    """Draws from a guide (via ``pyro.infer.Predictive``) as a one-chain DataTree.

    Each draw runs the whole guide, so a site's draws follow its marginal
    under the guide (for a hierarchical encoder, q(z | x) with the layers
    below z sampled). ``sites`` restricts the tree to those sites; ``names``
    renames sites in it (site -> variable).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...         pyro.sample("x", dist.Normal(z, 0.5), obs=x)
    >>> def guide(x):
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Normal(0.8 * x, 0.6))
    >>> x = torch.tensor([-1.0, 0.3, 2.0])
    >>> from inference import from_guide
    >>> tree = from_guide(guide, x, num_samples=10)
    >>> tree["posterior"]["z"].sizes["draw"]
    10
    """
    with torch.no_grad():
        predictive = Predictive(guide, num_samples=num_samples, parallel=True, return_sites=sites)
        draws = predictive(*args, **kwargs)
    draws = {(names or {}).get(name, name): v.unsqueeze(0) for name, v in draws.items()}
    return samples_to_datatree(draws, dims=dims, coords=coords)


def weights_to_datatree(
    log_w,
    *,
    bounds: Mapping[str, object] | None = None,
    datapoints=None,
):
    """Per-datapoint log weights (and bounds, k-hat, ESS) as a DataTree.

    ``log_weights`` holds ``log_w`` with dims (particle, datapoint);
    ``bounds`` holds per-datapoint values (dim ``datapoint``): arrays, or
    :class:`~inference.bounds.Bound` objects, whose Monte Carlo errors go
    beside them as ``NAME_mc_stderr``.

    Examples
    --------
    >>> import torch
    >>> from inference import iwae_bound, weights_to_datatree
    >>> log_w = torch.randn(50, 3)
    >>> tree = weights_to_datatree(log_w, bounds={"iwae": iwae_bound(log_w)})
    >>> sorted(tree.children)
    ['bounds', 'log_weights']
    """
    import xarray as xr

    lw = _numpy(log_w)
    if lw.ndim == 1:
        lw = lw[:, None]
    coords = {"datapoint": np.arange(lw.shape[1]) if datapoints is None else datapoints}
    weights = xr.Dataset(
        {"log_w": (("particle", "datapoint"), lw)},
        coords={**coords, "particle": np.arange(lw.shape[0])},
    )
    per_point = {
        "khat": psis_khat(lw),
        "is_ess": importance_ess(lw),
    }
    for name, value in (bounds or {}).items():
        if isinstance(value, Bound):
            per_point[f"{name}_mc_stderr"] = _numpy(value.stderr)
            value = value.value
        per_point[name] = _numpy(value)
    stats = xr.Dataset({k: ("datapoint", v) for k, v in per_point.items()}, coords=coords)
    return xr.DataTree.from_dict({"log_weights": weights, "bounds": stats})


def save_datatree(tree, path: str | Path) -> Path:
    """Write a DataTree to netCDF (h5netcdf) atomically."""
    atomic_write(Path(path), lambda tmp: tree.to_netcdf(tmp, engine="h5netcdf"))
    return Path(path)


def load_datatree(path: str | Path):
    """Read a DataTree written by :func:`save_datatree` (fully loaded, file closed)."""
    import xarray as xr

    with xr.open_datatree(path, engine="h5netcdf") as tree:
        return tree.load()


def rhat_ess(tree, var: str) -> tuple[np.ndarray, np.ndarray]:
    """Rank-normalised R-hat and bulk ESS of one posterior variable, as arrays."""
    import arviz_stats

    rhat = arviz_stats.rhat(tree, var_names=[var])[var].values
    ess = arviz_stats.ess(tree, var_names=[var], method="bulk")[var].values
    return np.asarray(rhat), np.asarray(ess)
