"""Bound-gap reports. For now: aggregate-posterior activity of the latent units.

An active unit u has Cov_x(E_q[z_u | x]) > 0.01 (Burda, Grosse &
Salakhutdinov 2016, section 5.2): the encoder's mean of that latent changes
with the datapoint, so the decoder can use it.
"""

from __future__ import annotations

from collections.abc import Callable

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
