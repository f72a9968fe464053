r"""The aggregate posterior: ELBO surgery and active units.

With the aggregate posterior q(z) = (1/N) sum_n q(z | x_n) over N datapoints
(Hoffman & Johnson 2016),

    (1/N) sum_n KL(q(z | x_n) || p(z)) = I_q(x; z) + KL(q(z) || p(z)),

where I_q(x; z) <= log N. An active unit u has Cov_x(E_q[z_u | x]) > 0.01
(Burda, Grosse & Salakhutdinov 2016, section 5.2): the encoder's mean of that
latent changes with the datapoint, so the decoder can use it.

References
----------
Hoffman & Johnson (2016), ELBO surgery: yet another way to carve up the
variational evidence lower bound, NIPS Workshop on Advances in Approximate
Bayesian Inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pyro.distributions.kl import kl_divergence
from pyro.infer import Predictive

from .bounds import logsumexp
from .hierarchical import plug_in_log_marginal
from .tracing import Layout, guess_max_plate_nesting, latent_values, top_latent, trace_guide

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["aggregate_posterior_terms", "active_units"]

ACTIVE_THRESHOLD = 0.01


def posterior_means(
    guide: Callable, x: torch.Tensor, *, site: str | None = None, num_samples: int = 64, **kwargs
) -> torch.Tensor:
    """Monte Carlo E_q[z | x] per datapoint, shape (N, latent), for any guide.

    ``site`` defaults to :func:`~inference.tracing.top_latent`'s choice.
    """
    site = site or top_latent(guide, x, **kwargs)
    with torch.no_grad():
        draws = Predictive(guide, num_samples=num_samples, parallel=True)(x, **kwargs)
    if site not in draws:
        raise ValueError(f"the guide has no site {site!r}; sites: {', '.join(draws)}")
    return draws[site].mean(0).reshape(x.shape[0], -1)


def active_units(means: torch.Tensor, *, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Number of latent units u with Var_x(E_q[z_u | x]) > ``threshold``.

    ``means`` holds E_q[z | x] per datapoint (rows).

    Examples
    --------
    >>> import torch
    >>> from inference import active_units
    >>> means = torch.stack([torch.randn(100), torch.zeros(100)], dim=1)  # E_q[z | x_n], 2 units
    >>> active_units(means)                          # the second never moves with x
    1
    """
    return int((means.var(0) > threshold).sum())


def _surgery_terms(kl: torch.Tensor, log_q_own: torch.Tensor, log_q_marginal: torch.Tensor):
    """The surgery identity from per-datapoint KLs and, per draw, log q(z_n | x_n) and log q(z_n).

    KL(q(z) || p(z)) is the difference, so the identity holds exactly. Each
    term is a mean over datapoints and comes with the standard error of that
    mean; both KLs and the mutual information are >= 0 in truth, so an
    estimate below 0 by more than 3 standard errors is flagged
    (``impossible``): the estimator is biased there (too few datapoints for
    the aggregate posterior, or too few inner samples for a plug-in density).
    """
    mi_terms = log_q_own - log_q_marginal
    n = mi_terms.numel()

    def stderr(values: torch.Tensor) -> float:
        return float(values.std() / math.sqrt(n)) if n > 1 else math.inf

    out = {
        "average_kl": float(kl.mean()),
        "average_kl_stderr": stderr(kl),
        "marginal_kl": float((kl - mi_terms).mean()),
        "marginal_kl_stderr": stderr(kl - mi_terms),
        "mutual_information": float(mi_terms.mean()),
        "mutual_information_stderr": stderr(mi_terms),
        "log_n": math.log(n),
        "error": "across datapoints (std / sqrt(N))",
    }
    out["impossible"] = [
        name
        for name in ("average_kl", "marginal_kl", "mutual_information")
        if out[name] < -3 * out[f"{name}_stderr"]
    ]
    return out


def aggregate_posterior_terms(
    posterior: Callable[[torch.Tensor], object],
    prior: object,
    x: torch.Tensor,
    *,
    chunk_size: int = 512,
) -> dict[str, float]:
    r"""ELBO surgery: the average KL term split into I_q(x; z) + KL(q(z) || p(z)).

    I_q(x; z) = E[log q(z_n | x_n) - log q(z_n)] is estimated with one draw
    z_n ~ q(z | x_n) per datapoint and log q(z_n) = logsumexp_m
    log q(z_n | x_m) - log N (an O(N^2) sum, done in chunks); the average KL is
    analytic where torch knows it, and KL(q(z) || p(z)) is the difference.

    Parameters
    ----------
    posterior : callable
        ``posterior(x)`` -> a distribution q(z | x) batched over the rows of x
        (for example ``VAE.posterior``), whose ``log_prob`` broadcasts.
    prior : distribution
        p(z), with the same event shape.
    x : torch.Tensor
        The data (N rows).

    Returns
    -------
    dict
        ``average_kl``, ``marginal_kl`` (KL(q(z) || p(z))), ``mutual_information``
        (I_q(x; z)), ``log_n`` (its upper bound), in nats.

    Examples
    --------
    >>> import torch
    >>> from ppl_models import build_model
    >>> from inference import aggregate_posterior_terms
    >>> vae = build_model("vae", x_dim=8, hidden=[16], z_dim=2)
    >>> x = torch.bernoulli(torch.full((20, 8), 0.5))
    >>> terms = aggregate_posterior_terms(vae.posterior, vae.prior(x), x)
    >>> "mutual_information" in terms or len(terms) > 0
    True
    """
    n = x.shape[0]
    with torch.no_grad():
        q = posterior(x)
        z = q.sample()
        try:
            kl = kl_divergence(q, prior)
        except NotImplementedError:
            kl = q.log_prob(z) - prior.log_prob(z)
        log_q_marginal = []
        for start in range(0, n, chunk_size):
            zc = z[start : start + chunk_size]
            log_q = q.log_prob(zc.unsqueeze(1))  # (chunk, N): every draw under every component
            log_q_marginal.append(logsumexp(log_q, 1) - math.log(n))
        return _surgery_terms(kl, q.log_prob(z), torch.cat(log_q_marginal))


def hierarchical_surgery(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    aux_sites: Sequence[str],
    prior,
    inner_samples: int = 10,
    max_rows: int = 50_000,
    plate: str = "data",
    draws: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    r"""ELBO surgery when q(z | x) is a mixture over auxiliary layers h.

    As :func:`aggregate_posterior_terms`, with every density q(z_n | x_m)
    replaced by the plug-in q^_S(z_n | x_m) of
    :func:`~inference.hierarchical.plug_in_log_marginal` (the estimator of
    L_marg): one draw z_n ~ q(z | x_n) per datapoint, all N x N pairs, in
    chunks. The plug-in is unbiased for each density, so the terms carry the
    small bias of its log; raise S to shrink it. ``draws`` (site -> (N, ...))
    replaces the draws z_n ~ q(z | x_n), for tests.
    """
    aux = set(aux_sites)
    n = x.shape[0]
    with torch.no_grad():
        nesting = guess_max_plate_nesting(model, guide, (x,), {})
        if draws is None:
            draw = latent_values(trace_guide(guide, (x,), {}, Layout(1, nesting, plate)))
            draws = {name: v[0] for name, v in draw.items() if name not in aux}  # (N, ...)
        log_q = torch.empty(n, n)  # [draw n, component m]
        rows = max(1, max_rows // (inner_samples * n))
        for start in range(0, n, rows):
            idx = torch.arange(start, min(start + rows, n))
            c = len(idx)
            # pairs (n in idx, m in all): x_m repeated for each draw in the chunk
            x_pairs = x.repeat(c, *([1] * (x.dim() - 1)))
            fixed = {
                name: v[idx].repeat_interleave(n, 0).expand(inner_samples, c * n, *v.shape[1:])
                for name, v in draws.items()
            }
            layout = Layout(inner_samples, nesting, plate)
            log_q[idx] = plug_in_log_marginal(
                model, guide, (x_pairs,), {}, layout, values=fixed, aux=aux,
                inner_samples=inner_samples,
            ).reshape(c, n)  # fmt: skip
        own = log_q.diagonal()
        log_prior = prior.log_prob(next(iter(draws.values())))
        return _surgery_terms(own - log_prior, own, logsumexp(log_q, 1) - math.log(n))
