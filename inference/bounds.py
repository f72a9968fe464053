r"""Bounds on log p(x) from log importance weights: pure tensor functions, no Pyro.

Given log weights log w_k = log p(x, z_k) - log q(z_k | x), z_k ~ q(z | x)
(shape (K, N), particles first; see :mod:`inference.tracing`),

    ELBO     = mean_k log w_k                    (Kingma & Welling 2014)
    IWAE_K   = logsumexp_k log w_k - log K       (Burda, Grosse & Salakhutdinov 2016)

with E[ELBO] = IWAE_1 <= E[IWAE_K] <= E[IWAE_K'] <= log p(x) for K <= K', and
IWAE_K -> log p(x) as K -> infinity.

Two kinds of standard error appear in elbolab's reports, and each summary
says which it is (:data:`MONTE_CARLO` or :data:`ACROSS_DATAPOINTS`): the
Monte Carlo error of an average over *fixed* datapoints (how much the number
would move with another seed), and the spread across datapoints (how much it
would move with other data, Monte Carlo included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["Bound", "elbo_bound", "iwae_bound"]

MONTE_CARLO = "monte carlo (datapoints fixed)"
ACROSS_DATAPOINTS = "across datapoints (std / sqrt(N))"


def logsumexp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log sum exp(x)`` along ``dim`` with the max shift; all ``-inf`` gives ``-inf``, not NaN.

    Computes ``a + log sum exp(x_i - a)`` with ``a = max_i x_i`` (taken as 0
    when it is infinite, so that ``-inf - (-inf)`` never occurs).
    """
    shift = x.detach().amax(dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return (x - shift).exp().sum(dim).log() + shift.squeeze(dim)


def squared_weight_sum(log_w: torch.Tensor, *, lse: torch.Tensor | None = None) -> torch.Tensor:
    r"""sum_k wbar_k^2 of the normalised weights wbar_k = w_k / sum_j w_j, along dim 0.

    It is 1 / ESS (the importance-sampling effective sample size) and the
    core of the delta-method error of log mean_k w_k. ``lse`` is
    ``logsumexp(log_w, 0)`` when the caller has it already. Columns whose
    weights are all zero give NaN.
    """
    lse = logsumexp(log_w, 0) if lse is None else lse
    return (log_w - lse).exp().pow(2).sum(0)


def importance_ess(log_w: torch.Tensor) -> torch.Tensor:
    """Importance-sampling effective sample size 1 / sum_k wbar_k^2, per column."""
    return 1.0 / squared_weight_sum(log_w)


def log_mean_weight_stderr(log_w: torch.Tensor, *, lse: torch.Tensor | None = None) -> torch.Tensor:
    r"""Delta-method standard error of log (1/K) sum_k w_k, along dim 0.

    Var[log Z^] ~ Var[w] / (K E[w]^2), estimated by ``sum_k wbar_k^2 - 1/K``
    = 1/ESS - 1/K. The estimate is optimistic when the weights are
    heavy-tailed (check the PSIS k-hat).
    """
    k = log_w.shape[0]
    return (squared_weight_sum(log_w, lse=lse) - 1.0 / k).clamp(min=0.0).sqrt()


def summary(mean: float, stderr: float, error: str) -> dict:
    """A reported number with its standard error and what the error measures."""
    return {"mean": float(mean), "stderr": float(stderr), "error": error}


def across_datapoints(values: torch.Tensor) -> dict:
    """Mean of per-datapoint values and its standard error from their spread."""
    n = values.numel()
    stderr = float(values.std() / math.sqrt(n)) if n > 1 else math.inf
    return summary(float(values.mean()), stderr, ACROSS_DATAPOINTS)


@dataclass(frozen=True)
class Bound:
    """A bound per datapoint with its Monte Carlo standard error (same shape).

    Every estimator of elbolab returns its per-datapoint results this way:
    ``value[n]`` bounds (or estimates) log p(x_n), ``stderr[n]`` is its Monte
    Carlo standard error. The average over datapoints has two errors, named
    apart: :attr:`mc_stderr` (another seed, the datapoints fixed) and
    :attr:`datapoint_stderr` (other datapoints; std / sqrt(N)).

    Examples
    --------
    >>> import torch
    >>> from inference import iwae_bound
    >>> log_w = torch.randn(100, 5) - 3.0          # K = 100 particles, N = 5 datapoints
    >>> b = iwae_bound(log_w)
    >>> b.value.shape, b.stderr.shape
    (torch.Size([5]), torch.Size([5]))
    >>> summary = b.summary()                      # the average, with both errors
    >>> sorted(summary)
    ['datapoint_stderr', 'error', 'mc_stderr', 'mean', 'stderr']
    >>> b.to_xarray().sizes["datapoint"]
    5
    """

    value: torch.Tensor
    stderr: torch.Tensor

    @property
    def mc_stderr(self) -> float:
        """Monte Carlo standard error of the average over datapoints (datapoints fixed)."""
        return self.mean()[1]

    @property
    def datapoint_stderr(self) -> float:
        """Standard error of the average from the spread over datapoints, std / sqrt(N)."""
        return across_datapoints(self.value.double())["stderr"]

    def to_xarray(self, name: str = "bound"):
        """The per-datapoint values and errors as an ``xarray.Dataset`` (dim ``datapoint``).

        The average and both of its errors are the Dataset's attributes, so
        that it slots into an ArviZ ``DataTree`` (``tree["bounds"] = ...``).
        """
        import xarray as xr

        value = self.value.detach().cpu().double().reshape(-1).numpy()
        stderr = self.stderr.detach().cpu().double().reshape(-1).numpy()
        return xr.Dataset(
            {name: ("datapoint", value), f"{name}_mc_stderr": ("datapoint", stderr)},
            attrs={"mean": float(value.mean()), "mc_stderr": self.mc_stderr,
                   "datapoint_stderr": self.datapoint_stderr, "units": "nats"},
        )  # fmt: skip

    def mean(self) -> tuple[float, float]:
        """Average over datapoints and the standard error of that average.

        The error is Monte Carlo only (the datapoints are fixed):
        ``sqrt(sum_n stderr_n^2) / N``.
        """
        n = self.value.numel()
        return float(self.value.mean()), float(self.stderr.pow(2).sum().sqrt() / n)

    def summary(self) -> dict:
        """:meth:`mean` as a report entry, with both kinds of standard error, named.

        ``stderr`` (and ``mc_stderr``) is the Monte Carlo error with the
        datapoints fixed (labelled :data:`MONTE_CARLO`); ``datapoint_stderr``
        is the spread of the per-datapoint values, std / sqrt(N): how much the
        average would move with other datapoints from the same distribution.
        """
        mean, mc = self.mean()
        return {**summary(mean, mc, MONTE_CARLO), "mc_stderr": mc,
                "datapoint_stderr": self.datapoint_stderr}  # fmt: skip

    @staticmethod
    def cat(bounds: list[Bound]) -> Bound:
        """Per-datapoint bounds of consecutive batches joined into one."""
        return Bound(torch.cat([b.value for b in bounds]), torch.cat([b.stderr for b in bounds]))


def elbo_bound(log_w: torch.Tensor) -> Bound:
    """ELBO = mean_k log w_k per datapoint, standard error std_k / sqrt(K).

    Parameters
    ----------
    log_w : torch.Tensor
        Shape (K, ...), particles first.

    Examples
    --------
    >>> import torch
    >>> from inference import elbo_bound
    >>> log_w = torch.randn(100, 5) - 3.0             # K = 100 particles, N = 5 datapoints
    >>> elbo_bound(log_w).value.shape
    torch.Size([5])
    """
    num = log_w.shape[0]
    value = log_w.mean(0)
    if num > 1:
        stderr = log_w.std(0) / math.sqrt(num)
    else:
        stderr = torch.full_like(value, math.inf)
    stderr = torch.where(torch.isfinite(value), stderr, torch.full_like(stderr, math.inf))
    return Bound(value, stderr)


def iwae_bound(log_w: torch.Tensor, *, k: int | None = None) -> Bound:
    r"""IWAE_k = logsumexp_k log w_k - log k per datapoint, with a standard error.

    With ``k`` smaller than the K rows of ``log_w``, the rows are split into
    G = K // k disjoint groups and the G independent IWAE_k estimates are
    averaged (rows beyond G k are unused); the standard error is their
    spread, std_g / sqrt(G). With one group (k = K) it follows from the delta
    method (:func:`log_mean_weight_stderr`).

    Parameters
    ----------
    log_w : torch.Tensor
        Shape (K, ...), particles first.
    k : int, optional
        Particles per estimate (default K).

    References
    ----------
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders, ICLR.

    Examples
    --------
    >>> import torch
    >>> from inference import elbo_bound, iwae_bound
    >>> log_w = torch.randn(1000, 5) - 3.0
    >>> bool((iwae_bound(log_w, k=10).value >= elbo_bound(log_w).value).all())
    True
    """
    total = log_w.shape[0]
    k = total if k is None else int(k)
    if not 1 <= k <= total:
        raise ValueError(f"k must be between 1 and the {total} particles available, got {k}")
    groups = total // k
    grouped = log_w[: groups * k].reshape(groups, k, *log_w.shape[1:])
    lse = logsumexp(grouped, dim=1)
    value = lse - math.log(k)
    if groups > 1:
        stderr = value.std(0) / math.sqrt(groups)
    else:
        stderr = log_mean_weight_stderr(grouped[0], lse=lse[0])
    mean = value.mean(0)
    stderr = torch.where(torch.isfinite(mean), stderr, torch.full_like(stderr, math.inf))
    return Bound(mean, stderr)
