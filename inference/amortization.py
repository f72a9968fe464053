r"""The approximation and amortisation gaps (Cremer, Li & Duvenaud 2018).

log p(x) - ELBO(q) = [log p(x) - ELBO(q*)] + [ELBO(q*) - ELBO(q)], where q*
is the best member of the guide's family for each datapoint, found by
optimising local variational parameters started from the encoder's output.

References
----------
Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational
Autoencoders, ICML.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.nn import functional as F

from .bounds import elbo_bound
from .objectives import make_objective
from .tracing import log_importance_weights

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["amortization_split"]


def amortization_split(
    model,
    x: torch.Tensor,
    *,
    log_px: torch.Tensor,
    steps: int = 500,
    lr: float = 0.01,
    num_particles: int = 10,
    eval_particles: int = 1000,
) -> dict[str, torch.Tensor]:
    r"""Split log p(x) - ELBO(q) into approximation and amortisation gaps, per datapoint.

    Cremer, Li & Duvenaud (2018): q* is the best member of the guide's family
    for each datapoint, found by optimising local parameters (location and
    scale of the diagonal Normal q(z | x_n)) from the encoder's output, so

        log p(x) - ELBO(q) = [log p(x) - ELBO(q*)] + [ELBO(q*) - ELBO(q)]
                             (approximation gap)     (amortisation gap).

    The two parts add up to the total gap by construction; each ELBO is
    estimated with ``eval_particles`` draws. ``model`` needs ``model.model``
    and ``posterior(x)`` returning an ``Independent(Normal)`` over site "z".

    For an encoder with several stochastic layers (``encoder_dist`` and
    ``h_names``, as :class:`~ppl_models.HierarchicalVAE`) only the first layer
    q(h_1 | x) sees x; its location and scale are the local parameters, the
    upper conditionals and the reverse model stay shared, and "ELBO" is the
    auxiliary bound L_aux that such a pair's log weights give. A fixed first
    layer (a corruption) has no local parameters: that is an error.

    Returns
    -------
    dict
        Per-datapoint ``elbo_amortized``, ``elbo_optimal``, ``approximation_gap``,
        ``amortization_gap``, ``total_gap`` (tensors of shape (N,)).

    Examples
    --------
    >>> import torch
    >>> from ppl_models import build_model
    >>> from inference import amortization_split, iwae_bound, log_importance_weights
    >>> vae = build_model("vae", x_dim=8, hidden=[16], z_dim=2)
    >>> x = torch.bernoulli(torch.full((3, 8), 0.5))
    >>> log_w = log_importance_weights(vae.model, vae.guide, x, num_particles=200)
    >>> log_px = iwae_bound(log_w).value
    >>> split = amortization_split(vae, x, log_px=log_px, steps=5, eval_particles=50)
    >>> split["total_gap"].shape
    torch.Size([3])
    """
    names = [*getattr(model, "h_names", []), "z"]
    if getattr(model, "corruption", None):
        raise ValueError("a fixed corruption as first layer leaves no local parameters")
    with torch.no_grad():
        q = model.encoder_dist(0, x, x) if len(names) > 1 else model.posterior(x)
        base = getattr(q, "base_dist", q)
        if not isinstance(base, dist.Normal):
            raise ValueError("the amortisation split needs a diagonal-Normal first layer")
        loc = base.loc.clone().requires_grad_(True)
        # softplus^{-1}(scale): the local guide's scale parameterisation
        raw = torch.log(torch.expm1(base.scale.clamp(min=1e-6))).requires_grad_(True)

    def local_guide(x, *, num_data=None):
        with pyro.plate("data", x.shape[0]):
            inputs = pyro.sample(names[0], dist.Normal(loc, F.softplus(raw) + 1e-6).to_event(1))
            for layer, name in enumerate(names[1:], start=1):
                inputs = pyro.sample(name, model.encoder_dist(layer, inputs, x))

    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        objective = make_objective("elbo", num_particles=num_particles)
        optimizer = torch.optim.Adam([loc, raw], lr=lr)
        with pyro.validation_enabled(False):
            for _ in range(steps):
                optimizer.zero_grad()
                objective.differentiable_loss(model.model, local_guide, x).backward()
                optimizer.step()
    finally:
        for p, flag in zip(params, requires, strict=True):
            p.requires_grad_(flag)
    amortized = elbo_bound(
        log_importance_weights(model.model, model.guide, x, num_particles=eval_particles)
    ).value
    optimal = elbo_bound(
        log_importance_weights(model.model, local_guide, x, num_particles=eval_particles)
    ).value
    return {
        "elbo_amortized": amortized,
        "elbo_optimal": optimal,
        "approximation_gap": log_px - optimal,
        "amortization_gap": optimal - amortized,
        "total_gap": log_px - amortized,
    }
