r"""Linear-Gaussian latent variable model: the tractable reference.

Generative model (probabilistic PCA; Tipping & Bishop 1999)::

    z_n ~ N(0, I_d)
    x_n | z_n ~ N(W z_n + mu, sigma^2 I_D)

so that, in closed form,

    p(x) = N(x; mu, W W^T + sigma^2 I),
    p(z | x) = N(z; S W^T (x - mu) / sigma^2, S),   S = (I + W^T W / sigma^2)^{-1}.

With ``guide_type="exact"`` the guide is this posterior, and every bound
(ELBO, IWAE-K) equals log p(x) for every sample. With ``"diagonal"`` it is an
amortised diagonal Normal q(z|x) = N(A x + b, diag(s^2)), whose gap
log p(x) - ELBO = KL(q || p(z|x)) is known in closed form too.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.nn import functional as F

from .vae import data_plate

GUIDE_TYPES = ("exact", "diagonal")


class LinearGaussian(PyroModule):
    """z ~ N(0, I), x | z ~ N(W z + mu, sigma^2 I), with exact marginal and posterior.

    Parameters
    ----------
    x_dim, z_dim : int
        Observed and latent dimensions.
    guide_type : {"exact", "diagonal"}
        Exact posterior, or an amortised diagonal-Normal encoder.
    """

    def __init__(self, x_dim: int, z_dim: int = 2, *, guide_type: str = "exact") -> None:
        super().__init__()
        if guide_type not in GUIDE_TYPES:
            raise ValueError(f"unknown guide_type {guide_type!r}; choose from {GUIDE_TYPES}")
        self.x_dim, self.z_dim, self.guide_type = int(x_dim), int(z_dim), guide_type
        self.weight = torch.nn.Parameter(0.1 * torch.randn(self.x_dim, self.z_dim))
        self.loc = torch.nn.Parameter(torch.zeros(self.x_dim))
        self.scale_raw = torch.nn.Parameter(torch.zeros(()))
        if guide_type == "diagonal":
            self.enc_weight = torch.nn.Parameter(torch.zeros(self.z_dim, self.x_dim))
            self.enc_bias = torch.nn.Parameter(torch.zeros(self.z_dim))
            self.enc_scale_raw = torch.nn.Parameter(torch.zeros(self.z_dim))

    @property
    def scale(self) -> torch.Tensor:
        """Observation noise sigma."""
        return F.softplus(self.scale_raw) + 1e-4

    def set_params(self, *, weight: torch.Tensor, loc: torch.Tensor, scale: float) -> None:
        """Set W, mu and sigma directly (for synthetic data with a known truth)."""
        with torch.no_grad():
            self.weight.copy_(weight)
            self.loc.copy_(loc)
            self.scale_raw.copy_(torch.log(torch.expm1(torch.as_tensor(scale - 1e-4))))

    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(mu, W W^T + sigma^2 I)."""
        eye = torch.eye(self.x_dim, dtype=self.weight.dtype, device=self.weight.device)
        cov = self.weight @ self.weight.T + self.scale**2 * eye
        return dist.MultivariateNormal(self.loc, covariance_matrix=cov)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per row of ``x``."""
        return self.marginal().log_prob(x)

    def exact_posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """p(z | x), batched over the rows of ``x``."""
        eye = torch.eye(self.z_dim, dtype=self.weight.dtype, device=self.weight.device)
        precision = eye + self.weight.T @ self.weight / self.scale**2
        cov = torch.linalg.inv(precision)
        mean = (x - self.loc) @ self.weight @ cov / self.scale**2
        return dist.MultivariateNormal(mean, covariance_matrix=cov)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """The guide's q(z | x)."""
        if self.guide_type == "exact":
            return self.exact_posterior(x)
        loc = x @ self.enc_weight.T + self.enc_bias
        return dist.Normal(loc, F.softplus(self.enc_scale_raw) + 1e-4).to_event(1)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> torch.Tensor:
        with data_plate(x, num_data):
            zeros = x.new_zeros(self.z_dim)
            z = pyro.sample("z", dist.Normal(zeros, 1.0 + zeros).to_event(1))
            obs_loc = z @ self.weight.T + self.loc
            return pyro.sample("x", dist.Normal(obs_loc, self.scale).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> torch.Tensor:
        with data_plate(x, num_data):
            return pyro.sample("z", self.posterior(x))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Draws of x from the model."""
        return self.marginal().sample((num_samples,))
