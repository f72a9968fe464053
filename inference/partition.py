r"""The RBM partition function Z: exact enumeration, AIS, and reverse AIS for a bracket.

Exact: enumerate the smaller layer and sum the other out analytically,

    log Z = logsumexp_h [ b_h^T h + sum_i softplus(b_v_i + (W h)_i) ]   (or the same over v),

in chunks, feasible up to about 25 units in the smaller layer.

AIS (Neal 2001; Salakhutdinov & Murray 2008): a geometric path from a
base-rate RBM A (W = 0, visible biases from the data's pixel means) to the
target B, p*_beta(v) = exp((1 - beta) b_A^T v + beta b_v^T v)
prod_j (1 + exp(beta (b_h_j + (v^T W)_j))), with block Gibbs transitions at
each beta. The mean of the importance weights is unbiased for Z_B / Z_A, so
log of the estimate is biased *low* in expectation (Jensen).

Reverse AIS (Burda, Grosse & Salakhutdinov 2015) runs the path backwards from
samples of B; its weights are unbiased for Z_A / Z_B, so its log Z estimate
is biased *high*. Started from data instead of exact samples it is an
approximation, which is what the two together bracket: forward <= log Z <=
reverse, up to Monte Carlo error.

The inverse temperatures are linearly spaced (``schedule="linear"``) or
follow Salakhutdinov & Murray's schedule (``"sm08"``): 500 of every 14,500
on [0, 0.5], 4,000 on [0.5, 0.9] and 10,000 on [0.9, 1], where the path's
distributions change fastest for a trained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ppl_models.rbm import sample_bernoulli

from .bounds import log_mean_weight_stderr, logsumexp

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["exact_log_partition", "ais_log_partition"]

MAX_EXACT_UNITS = 25
BETA_SCHEDULES = ("linear", "sm08")
_SM08_KNOTS = ([0.0, 500 / 14_500, 4_500 / 14_500, 1.0], [0.0, 0.5, 0.9, 1.0])


@dataclass(frozen=True)
class PartitionEstimate:
    """log Z with its standard error (delta method on the importance weights)."""

    log_z: float
    stderr: float
    log_weights: torch.Tensor
    method: str
    final_states: torch.Tensor | None = None
    """Visible states of the chains at the end of the path: approximate samples
    of the RBM after forward AIS, of the base-rate model after reverse AIS."""
    offset: float = 0.0
    """log Z_A of the base-rate model: log_z = offset + sign log mean(w)."""
    sign: float = 1.0


def join_estimates(parts: list[PartitionEstimate]) -> PartitionEstimate:
    """One estimate from the chains of several runs of the same path (pieces of one AIS run)."""
    if len(parts) == 1:
        return parts[0]
    states = [p.final_states for p in parts]
    return _estimate(
        torch.cat([p.log_weights for p in parts]), parts[0].offset, parts[0].sign,
        parts[0].method, None if any(s is None for s in states) else torch.cat(states),
    )  # fmt: skip


def exact_log_partition(rbm, *, chunk_size: int = 2**14) -> float:
    """log Z by enumerating the smaller layer (at most ``MAX_EXACT_UNITS`` units).

    Examples
    --------
    >>> import torch
    >>> from ppl_models.rbm import RBM
    >>> from inference import exact_log_partition
    >>> rbm = RBM(6, 4)
    >>> _ = [p.data.zero_() for p in rbm.parameters()]  # E = 0: Z = 2^(6+4)
    >>> round(exact_log_partition(rbm) / float(torch.log(torch.tensor(2.0))), 6)
    10.0
    """
    n_v, n_h = rbm.n_visible, rbm.n_hidden
    n = min(n_v, n_h)
    if n > MAX_EXACT_UNITS:
        raise ValueError(
            f"exact log Z enumerates 2^{n} states; feasible up to {MAX_EXACT_UNITS} units"
        )
    with torch.no_grad():
        W, b_v, b_h = rbm.W.double(), rbm.b_v.double(), rbm.b_h.double()
        bits = 2 ** torch.arange(n, dtype=torch.int64)
        parts = []
        for start in range(0, 2**n, chunk_size):
            codes = torch.arange(start, min(start + chunk_size, 2**n), dtype=torch.int64)
            states = ((codes[:, None] & bits) > 0).double()
            if n_h <= n_v:  # states are h
                parts.append(states @ b_h + F.softplus(states @ W.T + b_v).sum(-1))
            else:  # states are v
                parts.append(states @ b_v + F.softplus(states @ W + b_h).sum(-1))
        return float(logsumexp(torch.cat(parts), 0))


def base_rate_biases(data: torch.Tensor, *, smoothing: float = 1e-3) -> torch.Tensor:
    """Visible biases of the base-rate model: logit of the smoothed pixel means."""
    p = (data.double().mean(0) * (1 - 2 * smoothing) + smoothing).clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


class _Path:
    """The AIS path p*_beta(v) = exp((1 - beta) b_a.v) * p~_B(v)^beta, hidden units summed out.

    ``state(v)`` caches what every temperature needs from v (one product with
    W), so that a transition and the weight update share it.
    """

    def __init__(self, rbm, b_a: torch.Tensor) -> None:
        self.W = rbm.W.detach().double()
        self.b_v, self.b_h = rbm.b_v.detach().double(), rbm.b_h.detach().double()
        self.b_a = b_a

    def state(self, v: torch.Tensor) -> tuple:
        return v, torch.addmm(self.b_h, v, self.W), v @ (self.b_v - self.b_a)

    @staticmethod
    def log_ratio(state: tuple, beta: float, prev: float) -> torch.Tensor:
        """log p*_beta(v) - log p*_prev(v) at the state's v."""
        _, x, v_diff = state
        return (beta - prev) * v_diff + (F.softplus(beta * x) - F.softplus(prev * x)).sum(-1)

    def gibbs(self, state: tuple, beta: float, generator) -> tuple:
        """One transition h ~ p_beta(h|v), v ~ p_beta(v|h) that leaves p*_beta invariant."""
        _, x, _ = state
        h = sample_bernoulli(torch.sigmoid(beta * x), generator)
        logits = torch.addmm(self.b_v, h, self.W.T).mul_(beta).add_(self.b_a, alpha=1 - beta)
        return self.state(sample_bernoulli(logits.sigmoid_(), generator))


def _estimate(
    log_w: torch.Tensor, offset: float, sign: float, method: str, states: torch.Tensor
) -> PartitionEstimate:
    lse = logsumexp(log_w, 0)
    log_mean = float(lse) - math.log(log_w.numel())
    stderr = float(log_mean_weight_stderr(log_w, lse=lse))
    return PartitionEstimate(offset + sign * log_mean, stderr, log_w, method, states, offset, sign)


def beta_schedule(num_betas: int, schedule: str = "sm08") -> torch.Tensor:
    """``num_betas`` inverse temperatures from 0 to 1 (float64), increasing."""
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"AIS schedule {schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
    u = np.linspace(0.0, 1.0, num_betas)
    if schedule == "sm08":
        u = np.interp(u, *_SM08_KNOTS)
    return torch.as_tensor(u, dtype=torch.float64)


def ais_log_partition(
    rbm,
    *,
    num_chains: int = 100,
    num_betas: int = 14_500,
    data: torch.Tensor | None = None,
    seed: int | None = None,
    reverse: bool = False,
    schedule: str = "sm08",
) -> PartitionEstimate:
    """AIS estimate of log Z from a base-rate RBM (forward), or reverse AIS from data.

    Parameters
    ----------
    rbm : ppl_models.RBM
        The target model B.
    num_chains : int
        Independent annealing runs (importance weights).
    num_betas : int
        Inverse temperatures from 0 to 1 (the defaults are Salakhutdinov &
        Murray's 14,500).
    data : torch.Tensor, optional
        Binary data: sets the base-rate biases, and starts the reverse chains
        (drawn with replacement). Without it the base model is uniform.
    seed : int, optional
        Seed of a private generator (the global random state is untouched).
    reverse : bool
        Run the path from B to A, starting from ``data``.
    schedule : {"sm08", "linear"}
        Spacing of the inverse temperatures (see the module docstring).

    Returns
    -------
    PartitionEstimate
        ``log_z`` and its standard error.

    Examples
    --------
    >>> import torch
    >>> from ppl_models.rbm import RBM
    >>> from inference import ais_log_partition, exact_log_partition
    >>> rbm = RBM(6, 4)
    >>> torch.nn.init.normal_(rbm.W, std=0.5)
    Parameter...
    >>> est = ais_log_partition(rbm, num_chains=50, num_betas=500, seed=0)
    >>> abs(est.log_z - exact_log_partition(rbm)) < 0.2
    True
    """
    if num_chains < 1 or num_betas < 2:
        raise ValueError("AIS needs num_chains >= 1 and num_betas >= 2")
    if reverse and data is None:
        raise ValueError("reverse AIS starts from data: pass data")
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    n_v = rbm.n_visible
    b_a = base_rate_biases(data) if data is not None else torch.zeros(n_v, dtype=torch.float64)
    log_z_a = float(F.softplus(b_a).sum()) + rbm.n_hidden * math.log(2.0)
    betas = beta_schedule(num_betas, schedule)
    with torch.no_grad():
        if reverse:
            idx = torch.randint(data.shape[0], (num_chains,), generator=generator)
            v = data[idx].double()
            betas = betas.flip(0)
        else:
            v = sample_bernoulli(torch.sigmoid(b_a).expand(num_chains, n_v), generator)
        path = _Path(rbm, b_a)
        state = path.state(v)
        log_w = torch.zeros(num_chains, dtype=torch.float64)
        betas = betas.tolist()
        for prev, beta in zip(betas[:-1], betas[1:], strict=True):
            log_w += path.log_ratio(state, beta, prev)
            state = path.gibbs(state, beta, generator)
    if reverse:
        # mean of the weights estimates Z_A / Z_B
        return _estimate(log_w, log_z_a, -1.0, "reverse AIS", state[0])
    return _estimate(log_w, log_z_a, 1.0, "AIS", state[0])


def ais_bracket(mean_neg_free: float, forward, reverse) -> list[float]:
    """Interval for the mean log p(v) from forward and reverse AIS, 3 s.e. at each end.

    Forward AIS tends to underestimate log Z and reverse AIS to overestimate
    it, so their log-likelihoods usually bracket the truth; reverse AIS started
    from data rather than model samples can break that order (a model far
    from the data), so the interval is the union of both estimates' 3-s.e.
    intervals.
    """
    ends = [
        mean_neg_free - estimate.log_z + sign * 3 * estimate.stderr
        for estimate in (forward, reverse)
        for sign in (-1, 1)
    ]
    return [min(ends), max(ends)]
