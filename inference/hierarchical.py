r"""Bounds for encoders with several stochastic layers: L_aux, L_h, L_marg and their chain.

Encoder q(h | x) q(z | h) (h: the auxiliary sites, z: every other guide site),
model p(x, z) with a reverse model r(h | z, x) sampled in the model. With
q(z | x) = E_{q(h|x)} q(z | h) the guide's marginal,

    L_marg = E_q(z|x)[log p(x, z) - log q(z | x)]
           = log p(x) - KL(q(z | x) || p(z | x)),
    L_h    = E_q(h,z|x)[log p(x, z) - log q(z | h)]  = L_marg - I_q(z; h | x),
    L_aux  = E_q[log p(x, z) + log r(h | z, x) - log q(z | h) - log q(h | x)]
           = L_marg - E_q(z|x) KL(q(h | z, x) || r(h | z, x)),

so log p(x) >= L_marg >= L_aux and L_marg >= L_h. L_marg needs the density of
the mixture q(z | x); :func:`plug_in_log_marginal` estimates it.

References
----------
Ranganath, Tran & Blei (2016), Hierarchical Variational Models, ICML.
Maaloe, Sonderby, Sonderby & Winther (2016), Auxiliary Deep Generative Models, ICML.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .bounds import Bound, elbo_bound, iwae_bound, logsumexp
from .tracing import (
    Layout,
    dry_run,
    latent_values,
    log_density,
    replay_values,
    trace_guide,
    trace_model,
)

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["hierarchical_bounds"]


def plug_in_log_marginal(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    layout: Layout,
    *,
    values: dict[str, torch.Tensor],
    aux: set[str],
    inner_samples: int,
) -> torch.Tensor:
    r"""log q^_S(z | x) = log (1/S) sum_s q(z | h_s) q(h_s | x) / r(h_s | z, x), h_s ~ r(h | z, x).

    An importance estimate of the guide's marginal density: unbiased for
    q(z | x), so E[log q^_S] <= log q(z | x), and its log is biased low by an
    amount that shrinks as S grows.

    ``values`` holds the top latents z for ``layout.num_particles`` = S x c
    particles, laid out s-major (S inner draws for each of c outer particles);
    the auxiliary sites ``aux`` are drawn from the model's reverse model.

    Returns
    -------
    torch.Tensor
        Shape (c, N) (c outer particles), or (c,) without a data plate.
    """
    r_trace = trace_model(model, args, kwargs, layout, values=values, free=aux)
    log_r = log_density(r_trace, layout, only=aux)
    h = {name: r_trace.nodes[name]["value"] for name in aux}
    q_trace = trace_guide(guide, args, kwargs, layout, values={**values, **h})
    terms = log_density(q_trace, layout) - log_r
    terms = terms.reshape(inner_samples, -1, *terms.shape[1:])
    return logsumexp(terms, 0) - math.log(inner_samples)


def hierarchical_log_densities(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    aux_sites: Sequence[str],
    num_particles: int,
    inner_samples: Sequence[int] = (1, 10, 100, 1000),
    plate: str = "data",
    max_rows: int = 5_000,
    minibatch: dict[str, torch.Tensor] | None = None,
    **kwargs,
) -> dict[str, torch.Tensor]:
    r"""Per-particle terms of the hierarchical bounds, each of shape (K, N).

    With (h, z) ~ q(h | x) q(z | h) (h: the ``aux_sites``; z: every other
    guide site) and a model p(x, z) r(h | z, x) whose ``aux_sites`` are drawn
    from the reverse model r:

    - ``log_w_aux`` = log p(x, z) + log r(h | z, x) - log q(z | h) - log q(h | x)
    - ``log_w_h`` = log p(x, z) - log q(z | h)
    - ``log_w_marg[S]`` = log p(x, z) - log q^_S(z | x) with the plug-in of
      :func:`plug_in_log_marginal`, which overestimates L_marg by a bias that
      shrinks as S grows.

    Particles, and the inner draws, run in chunks of about ``max_rows`` rows
    (particles x N, and S x particles x N), all on one minibatch when the
    pair subsamples: ``minibatch`` (subsample indices by plate), or the one
    the guide draws first.
    """
    aux = set(aux_sites)
    args = (x,)
    n = x.shape[0]
    out: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        nesting, drawn = dry_run(model, guide, args, kwargs)
        minibatch = drawn if minibatch is None else minibatch
        for start in range(0, num_particles, max(1, max_rows // n)):
            size = min(max(1, max_rows // n), num_particles - start)
            chunk = _hierarchical_chunk(
                model, guide, args, kwargs, Layout(size, nesting, plate), aux, inner_samples,
                max_rows, minibatch,
            )  # fmt: skip
            for name, value in chunk.items():
                out.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in out.items()}


def _hierarchical_chunk(
    model, guide, args, kwargs, layout, aux, inner_samples, max_rows, minibatch
):
    """The terms of :func:`hierarchical_log_densities` for one chunk of particles."""
    num_particles, nesting, plate = layout.num_particles, layout.max_plate_nesting, layout.plate
    out: dict[str, torch.Tensor] = {}
    guide_trace = trace_guide(guide, args, kwargs, layout, values=minibatch)
    values = latent_values(guide_trace)
    missing = aux - set(values)
    if missing:
        raise ValueError(f"aux_sites {sorted(missing)} are not sampled by the guide")
    top = {name: v for name, v in values.items() if name not in aux}
    model_trace = trace_model(model, args, kwargs, layout, values=replay_values(guide_trace))
    log_p = log_density(model_trace, layout, exclude=aux)
    log_r = log_density(model_trace, layout, only=aux)
    log_q_top = log_density(guide_trace, layout, exclude=aux)
    log_q_aux = log_density(guide_trace, layout, only=aux)
    out["log_w_aux"] = log_p + log_r - log_q_top - log_q_aux
    out["log_w_h"] = log_p - log_q_top
    n = args[0].shape[0]
    for s in inner_samples:
        chunk = max(1, max_rows // (s * n))
        log_q_hat = []
        for start in range(0, num_particles, chunk):
            c = min(chunk, num_particles - start)
            fixed = {
                name: v[start : start + c].repeat(s, *([1] * (v.dim() - 1)))
                for name, v in top.items()
            }
            fixed.update(minibatch)
            inner = Layout(s * c, nesting, plate)
            log_q_hat.append(
                plug_in_log_marginal(
                    model, guide, args, kwargs, inner, values=fixed, aux=aux, inner_samples=s
                )
            )
        out[f"log_w_marg[{s}]"] = log_p - torch.cat(log_q_hat)
    return out


def hierarchical_bounds(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    aux_sites: Sequence[str],
    num_particles: int,
    inner_samples: Sequence[int] = (1, 10, 100, 1000),
    marg_particles: int | None = None,
    statistics: dict[str, Callable[[torch.Tensor], object]] | None = None,
    **kwargs,
) -> dict:
    r"""The measurable chain log p(x) >= L_marg >= L_aux and L_marg >= L_h, per datapoint.

    Returns a dict of :class:`~inference.bounds.Bound` (per datapoint, with
    Monte Carlo standard errors): ``log_px`` (IWAE over ``num_particles``
    with the extended target p(x, z) r(h | z, x)), ``l_aux``, ``l_h``, and for
    each S in ``inner_samples``: ``l_marg[S]``, ``mutual_information[S]`` =
    l_marg - l_h = I_q(z; h | x) and ``reverse_slack[S]`` = l_marg - l_aux =
    E KL(q(h | z, x) || r(h | z, x)). Differences are formed per particle, so
    their standard errors are those of paired differences. L_marg uses the
    first ``marg_particles`` particles (default all): its inner estimate costs
    S times more per particle. ``statistics`` maps names to functions of the
    (K, N) log weights (for example the PSIS k-hat), returned under
    ``"statistics"``.

    Examples
    --------
    >>> import torch
    >>> from ppl_models import build_model
    >>> from inference import hierarchical_bounds
    >>> hvae = build_model("hvae", x_dim=8, hidden=[16], z_dim=2, layers=2)
    >>> x = torch.bernoulli(torch.full((4, 8), 0.5))
    >>> b = hierarchical_bounds(hvae.model, hvae.guide, x, aux_sites=hvae.h_names,
    ...                         num_particles=20, inner_samples=(1, 5))
    >>> sorted(b["bounds"])[:4]                     # each a Bound per datapoint
    ['l_aux', 'l_h', 'l_marg[1]', 'l_marg[5]']
    """
    marg_particles = marg_particles or num_particles
    minibatch = dry_run(model, guide, (x,), kwargs)[1]  # one for every term
    terms = hierarchical_log_densities(
        model, guide, x, aux_sites=aux_sites, num_particles=num_particles,
        inner_samples=(), minibatch=minibatch, **kwargs,
    )  # fmt: skip
    if inner_samples:
        marg = hierarchical_log_densities(
            model, guide, x, aux_sites=aux_sites, num_particles=marg_particles,
            inner_samples=inner_samples, minibatch=minibatch, **kwargs,
        )  # fmt: skip
    out: dict[str, Bound] = {
        "log_px": iwae_bound(terms["log_w_aux"]),
        "l_aux": elbo_bound(terms["log_w_aux"]),
        "l_h": elbo_bound(terms["log_w_h"]),
    }
    for s in inner_samples:
        log_w_marg = marg[f"log_w_marg[{s}]"]
        out[f"l_marg[{s}]"] = elbo_bound(log_w_marg)
        out[f"mutual_information[{s}]"] = elbo_bound(log_w_marg - marg["log_w_h"])
        out[f"reverse_slack[{s}]"] = elbo_bound(log_w_marg - marg["log_w_aux"])
    stats = {name: fn(terms["log_w_aux"]) for name, fn in (statistics or {}).items()}
    return {"bounds": out, "statistics": stats}
