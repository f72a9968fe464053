r"""Variational autoencoder with one stochastic layer.

Generative model and encoder (Kingma & Welling 2014; Burda et al. 2016)::

    z_n ~ N(0, I)                                   (site "z")
    x_n | z_n ~ Bernoulli(sigmoid(f_theta(z_n)))    (site "x", binary data)
             or N(f_theta(z_n), diag(sigma_theta^2))   (real-valued data)
    q_phi(z_n | x_n) = N(mu_phi(x_n), diag(s_phi(x_n)^2))

for n in the plate ``"data"``. On word counts (``likelihood="multinomial"``)
the same pair is NVDM, a document model: see :mod:`ppl_models.text`.
Passing ``num_data=N`` with a minibatch of B rows makes the plate scale
each datapoint's terms by N/B, so that losses are unbiased estimates of the
full-data objective.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.nn import functional as F

from .nets import mlp
from .text import BagOfWords

LIKELIHOODS = ("bernoulli", "normal", "multinomial")
_MIN_SCALE = 1e-4


class BernoulliLogits(dist.Bernoulli):
    r"""Bernoulli(logits) whose log_prob is ``x * l - softplus(l)``.

    The same normalised density as ``pyro.distributions.Bernoulli``
    (log sigmoid(l) for x = 1, log sigmoid(-l) for x = 0). Without gradients
    it takes two elementwise passes instead of binary_cross_entropy_with_logits'
    many (the likelihood is the most expensive term of an IWAE-5000
    evaluation); with gradients it uses that function, whose backward is fused.
    """

    def __init__(self, logits: torch.Tensor, validate_args=None) -> None:
        super().__init__(logits=logits, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BernoulliLogits, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        if torch.is_grad_enabled() and self.logits.requires_grad:
            logits, value = torch.broadcast_tensors(self.logits, value)
            return -F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        out = F.softplus(self.logits).neg_()
        if torch.broadcast_shapes(value.shape, out.shape) == out.shape:
            return out.addcmul_(value, self.logits)
        return torch.addcmul(out, value, self.logits)


def default_layout(x_dim: int, likelihood: str = "bernoulli") -> tuple[tuple[int, ...], int]:
    """Hidden sizes and latent size: the IWAE paper's 784-200-200-50, scaled to ``x_dim``.

    For 784 inputs this is exactly (200, 200) and 50; for smaller inputs every
    width shrinks in proportion, with floors of 64 hidden units and 8 latents.
    Document models (``"multinomial"``) take (200, 200) and 20 latents
    whatever the vocabulary.
    """
    if likelihood == "multinomial":
        return (200, 200), 20
    s = x_dim / 784
    hidden = max(64, round(200 * s))
    return (hidden, hidden), max(8, round(50 * s))


def data_plate(x: torch.Tensor, num_data: int | None) -> pyro.plate:
    """The ``"data"`` plate over the rows of ``x``, scaled by ``num_data / len(x)``."""
    batch = x.shape[0]
    if num_data is not None and num_data < batch:
        raise ValueError(f"num_data={num_data} is smaller than the batch ({batch} rows)")
    # Explicit subsample indices: the plate scales by N/B without drawing random indices.
    return pyro.plate(
        "data", size=num_data or batch, subsample=torch.arange(batch, device=x.device), dim=-1
    )


class LatentDecoderModel(PyroModule):
    """The generative half shared by elbolab's VAEs: p(z) = N(0, I), p(x | z) from an MLP.

    Subclasses set their encoder and define ``model``, ``guide`` and
    ``posterior(x)`` (q(z | x), or a representative of it).
    """

    def build_decoder(
        self, *, x_dim: int, hidden: Sequence[int], z_dim: int, activation: str, likelihood: str
    ) -> None:
        """Create the decoder (and the Normal likelihood's per-dimension scale).

        The decoder mirrors the encoder's hidden widths; for word counts it
        is NVDM's linear map, logits = R z + b.
        """
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose from {LIKELIHOODS}")
        self.likelihood = likelihood
        widths = [] if likelihood == "multinomial" else list(hidden)[::-1]
        self.decoder = mlp([z_dim, *widths, x_dim], activation=activation)
        if likelihood == "normal":
            self.x_scale_raw = torch.nn.Parameter(torch.zeros(x_dim))

    def init_from_data(self, x: torch.Tensor) -> None:
        """Set the decoder's output bias to the data mean (logit of it for binary data).

        For word counts: the log of each word's frequency in ``x``.
        """
        mean = x.mean(0).to(self.decoder[-1].bias)
        with torch.no_grad():
            if self.likelihood == "multinomial":
                self.decoder[-1].bias.copy_(torch.log((mean + 1e-3) / (mean + 1e-3).sum()))
            elif self.likelihood == "bernoulli":
                p = mean.clamp(1e-3, 1 - 1e-3)
                self.decoder[-1].bias.copy_(torch.log(p) - torch.log1p(-p))
            else:
                self.decoder[-1].bias.copy_(mean)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder's networks see of data ``x``: log(1 + x) for word counts."""
        return torch.log1p(x) if self.likelihood == "multinomial" else x

    def likelihood_dist(self, z: torch.Tensor, x: torch.Tensor | None = None) -> dist.Distribution:
        """p(x | z) with the data dimension as its event.

        For word counts the document length is given: that of ``x`` (one
        word when ``x`` is None, so that the mean is the word distribution).
        """
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            return BernoulliLogits(out).to_event(1)
        if self.likelihood == "multinomial":
            total = x.sum(-1) if x is not None else out.new_ones(())
            return BagOfWords(out, total)
        return dist.Normal(out, F.softplus(self.x_scale_raw) + _MIN_SCALE).to_event(1)

    def prior(self, like: torch.Tensor) -> dist.Distribution:
        """p(z) = N(0, I)."""
        zeros = like.new_zeros(self.z_dim)
        return dist.Normal(zeros, 1.0 + zeros).to_event(1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at the mean of ``posterior(x)``."""
        return self.likelihood_dist(self.posterior(x).mean, x).mean

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Means of p(x | z) for z drawn from the prior."""
        z = self.prior(torch.zeros(1)).sample((num_samples,))
        return self.likelihood_dist(z).mean


class VAE(LatentDecoderModel):
    """VAE with a diagonal-Normal encoder and a Bernoulli or Normal decoder.

    Parameters
    ----------
    x_dim : int
        Data dimension.
    hidden : sequence of int, optional
        Hidden widths of the encoder; the decoder mirrors them. Default:
        :func:`default_layout`.
    z_dim : int, optional
        Latent dimension. Default: :func:`default_layout`.
    activation : str
        Hidden-layer nonlinearity (``"tanh"`` as in Burda et al. 2016).
    likelihood : {"bernoulli", "normal"}
        Observation model; ``"normal"`` learns one scale per data dimension.

    References
    ----------
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders, ICLR.
    """

    def __init__(
        self,
        x_dim: int,
        *,
        hidden: Sequence[int] | None = None,
        z_dim: int | None = None,
        activation: str = "tanh",
        likelihood: str = "bernoulli",
    ) -> None:
        super().__init__()
        default_hidden, default_z = default_layout(x_dim, likelihood)
        self.x_dim = int(x_dim)
        self.hidden = tuple(hidden) if hidden is not None else default_hidden
        self.z_dim = int(z_dim) if z_dim is not None else default_z
        self.build_decoder(x_dim=self.x_dim, hidden=self.hidden, z_dim=self.z_dim,
                           activation=activation, likelihood=likelihood)  # fmt: skip
        self.encoder = mlp([self.x_dim, *self.hidden, 2 * self.z_dim], activation=activation)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """The encoder's q(z | x)."""
        loc, raw = self.encoder(self.encoder_input(x)).split(self.z_dim, dim=-1)
        return dist.Normal(loc, F.softplus(raw) + _MIN_SCALE).to_event(1)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> torch.Tensor:
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior(x))
            return pyro.sample("x", self.likelihood_dist(z, x), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> torch.Tensor:
        with data_plate(x, num_data):
            return pyro.sample("z", self.posterior(x))
