"""Bound-gap reports. For now: aggregate-posterior activity of the latent units.

An active unit u has Cov_x(E_q[z_u | x]) > 0.01 (Burda, Grosse &
Salakhutdinov 2016, section 5.2): the encoder's mean of that latent changes
with the datapoint, so the decoder can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pyro.infer import Predictive

ACTIVE_THRESHOLD = 0.01


def posterior_means(
    guide: Callable, x: torch.Tensor, *, site: str = "z", num_samples: int = 64, **kwargs
) -> torch.Tensor:
    """Monte Carlo E_q[z | x] per datapoint, shape (N, latent), for any guide."""
    with torch.no_grad():
        draws = Predictive(guide, num_samples=num_samples, parallel=True)(x, **kwargs)
    if site not in draws:
        raise ValueError(f"the guide has no site {site!r}; sites: {', '.join(draws)}")
    return draws[site].mean(0).reshape(x.shape[0], -1)


def active_units(means: torch.Tensor, *, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Number of latent units u with Var_x(E_q[z_u | x]) > ``threshold``.

    ``means`` holds E_q[z | x] per datapoint (rows).
    """
    return int((means.var(0) > threshold).sum())


def hierarchical_log_densities(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    aux_sites: Sequence[str],
    num_particles: int,
    inner_samples: Sequence[int] = (1, 10, 100, 1000),
    plate: str = "data",
    max_rows: int = 200_000,
    **kwargs,
) -> dict[str, torch.Tensor]:
    r"""Per-particle terms of the hierarchical bounds, each of shape (K, N).

    With (h, z) ~ q(h | x) q(z | h) (h: the ``aux_sites``; z: every other
    guide site) and a model p(x, z) r(h | z, x) whose ``aux_sites`` are drawn
    from the reverse model r:

    - ``log_w_aux`` = log p(x, z) + log r(h | z, x) - log q(z | h) - log q(h | x)
    - ``log_w_h`` = log p(x, z) - log q(z | h)
    - ``log_w_marg[S]`` = log p(x, z) - log q^_S(z | x), where
      log q^_S(z | x) = log (1/S) sum_s q(z | h_s) q(h_s | x) / r(h_s | z, x),
      h_s ~ r(h | z, x): an importance estimate of the marginal q(z | x),
      unbiased for q(z | x), so that E[log q^_S] <= log q(z | x) and the
      plug-in overestimates L_marg by a bias that shrinks as S grows.

    The inner draws run in chunks of at most ``max_rows`` (S x particles x N).

    References
    ----------
    Ranganath, Tran & Blei (2016), Hierarchical Variational Models, ICML.
    Maaloe, Sonderby, Sonderby & Winther (2016), Auxiliary Deep Generative Models, ICML.
    """
    from .bounds import (
        Layout,
        guess_max_plate_nesting,
        latent_values,
        log_density,
        logsumexp,
        trace_guide,
        trace_model,
    )

    aux = set(aux_sites)
    args = (x,)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        layout = Layout(num_particles, nesting, plate)
        guide_trace = trace_guide(guide, args, kwargs, layout)
        values = latent_values(guide_trace)
        missing = aux - set(values)
        if missing:
            raise ValueError(f"aux_sites {sorted(missing)} are not sampled by the guide")
        top = {name: v for name, v in values.items() if name not in aux}
        model_trace = trace_model(model, args, kwargs, layout, values=values)
        log_p = log_density(model_trace, layout, exclude=aux)
        log_r = log_density(model_trace, layout, only=aux)
        log_q_top = log_density(guide_trace, layout, exclude=aux)
        log_q_aux = log_density(guide_trace, layout, only=aux)
        out["log_w_aux"] = log_p + log_r - log_q_top - log_q_aux
        out["log_w_h"] = log_p - log_q_top
        n = x.shape[0]
        for s in inner_samples:
            chunk = max(1, max_rows // (s * n))
            log_q_hat = []
            for start in range(0, num_particles, chunk):
                c = min(chunk, num_particles - start)
                # S inner draws for each of c particles, flattened s-major into S * c particles.
                inner = Layout(s * c, nesting, plate)
                fixed = {
                    name: v[start : start + c].repeat(s, *([1] * (v.dim() - 1)))
                    for name, v in top.items()
                }
                r_trace = trace_model(model, args, kwargs, inner, values=fixed, free=aux)
                log_r_s = log_density(r_trace, inner, only=aux)
                h_s = {name: r_trace.nodes[name]["value"] for name in aux}
                q_trace = trace_guide(guide, args, kwargs, inner, values={**fixed, **h_s})
                terms = (log_density(q_trace, inner) - log_r_s).reshape(s, c, -1)
                log_q_hat.append(logsumexp(terms, 0) - math.log(s))
            out[f"log_w_marg[{s}]"] = log_p - torch.cat(log_q_hat)
    return out
