r"""VAE whose encoder has several stochastic layers, with a learned reverse model.

Encoder (L stochastic layers; the last is the top latent z)::

    q(h_1 | x) q(h_2 | h_1) ... q(z | h_{L-1})          sites "h1", ..., "h{L-1}", "z"

Generative model with an auxiliary reverse model (Ranganath, Tran & Blei
2016; Maaloe et al. 2016)::

    z ~ N(0, I),  x | z ~ p(x | z),
    h_{L-1} ~ r(h_{L-1} | z, x),  ...,  h_1 ~ r(h_1 | h_2, x)

The reverse sites are sampled in ``model``, so that Trace_ELBO on the pair is

    L_aux = E_q[log p(x, z) + log r(h | z, x) - log q(z | h) - log q(h | x)]
          = L_marg - E_q(z|x) KL(q(h | z, x) || r(h | z, x))  <=  log p(x).

Every importance-weighted bound built on these sites (IWAE with the extended
target p(x, z) r(h | z, x)) is a bound on log p(x) too, since r integrates to
one over h.

The denoising criterion (Im, Ahn, Memisevic & Bengio 2017) is the same
structure with a fixed, parameter-free first layer: h_1 = x~ drawn from a
corruption p(x~ | x), then q(z | x~). ``corruption`` is ``"salt-pepper:P"``
(each pixel replaced by a fair coin with probability P; binary data),
``"dropout:P"`` (each pixel set to 0 with probability P; binary data),
``"gaussian:S"`` (x~ = x + N(0, S^2)), or, for word counts, word dropout
(:mod:`ppl_models.text`): ``"word-dropout:P"`` (each token replaced by
``<unk>`` with probability P) or ``"word-dropout-freq:A"`` (a token of word w
replaced with probability A / (c(w) + A), c(w) the word's training count).
Its reverse model r(x~ | z, x) is the same family with learned
probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from .nets import mlp
from .text import WordDropout, keep_logits
from .vae import _MIN_SCALE, LatentDecoderModel, data_plate, default_layout

TEXT_CORRUPTIONS = ("word-dropout", "word-dropout-freq")
CORRUPTIONS = ("salt-pepper", "dropout", "gaussian", *TEXT_CORRUPTIONS)


def parse_corruption(spec: str | None) -> tuple[str, float] | None:
    """``"salt-pepper:0.1"`` -> ("salt-pepper", 0.1); ValueError naming the problem."""
    if spec is None:
        return None
    kind, _, value = spec.partition(":")
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption {spec!r}: kind must be one of {', '.join(CORRUPTIONS)}")
    try:
        level = float(value)
    except ValueError:
        raise ValueError(f"corruption {spec!r}: expected KIND:NUMBER, e.g. {kind}:0.1") from None
    if kind == "gaussian" and not level > 0:
        raise ValueError(f"corruption {spec!r}: the Gaussian scale must be > 0")
    if kind == "word-dropout-freq" and not 0 < level < float("inf"):
        raise ValueError(f"corruption {spec!r}: alpha must be finite and > 0")
    if kind not in ("gaussian", "word-dropout-freq") and not 0 < level < 1:
        raise ValueError(f"corruption {spec!r}: the probability must lie in (0, 1)")
    return kind, level


class _GaussianLayer(nn.Module):
    """A diagonal-Normal conditional: input -> MLP -> (loc, scale)."""

    def __init__(self, sizes: Sequence[int], out_dim: int, activation: str) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = mlp([*sizes, 2 * out_dim], activation=activation)

    def forward(self, inputs: torch.Tensor) -> dist.Distribution:
        loc, raw = self.net(inputs).split(self.out_dim, dim=-1)
        return dist.Normal(loc, F.softplus(raw) + _MIN_SCALE).to_event(1)


class _BernoulliLayer(nn.Module):
    """A factorised Bernoulli conditional: input -> MLP -> logits."""

    def __init__(self, sizes: Sequence[int], out_dim: int, activation: str) -> None:
        super().__init__()
        self.net = mlp([*sizes, out_dim], activation=activation)

    def forward(self, inputs: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=self.net(inputs)).to_event(1)


class _WordKeepLayer(nn.Module):
    """r(x~ | above, x) for word dropout: input -> MLP -> each word's keeping logit."""

    def __init__(self, sizes: Sequence[int], out_dim: int, activation: str) -> None:
        super().__init__()
        self.net = mlp([*sizes, out_dim], activation=activation)

    def forward(self, inputs: torch.Tensor, counts: torch.Tensor) -> dist.Distribution:
        return WordDropout(counts, self.net(inputs))


class HierarchicalVAE(LatentDecoderModel):
    """VAE with an L-layer stochastic encoder and a learned reverse model r(h | z, x).

    Parameters
    ----------
    x_dim : int
        Data dimension.
    layers : int
        L, stochastic layers of the encoder (1 is the plain VAE; with a
        corruption, the corruption counts as the first layer).
    hidden : sequence of int, optional
        Hidden widths of every conditional's MLP (default as :class:`VAE`).
    z_dim : int, optional
        Size of z (default as :class:`VAE`).
    h_dims : sequence of int, optional
        Sizes of h_1 .. h_{L-1} (default: all ``2 * z_dim``); with a
        corruption, h_1 has ``x_dim`` units and is not listed.
    activation, likelihood
        As for :class:`VAE`.
    corruption : str, optional
        Fixed first layer for the denoising criterion (see module docs).
    word_counts : torch.Tensor, optional
        Each vocabulary word's count in the training corpus, for
        ``word-dropout-freq`` (kept as a buffer, so the checkpoint has it).
    """

    def __init__(
        self,
        x_dim: int,
        *,
        layers: int = 2,
        hidden: Sequence[int] | None = None,
        z_dim: int | None = None,
        h_dims: Sequence[int] | None = None,
        activation: str = "tanh",
        likelihood: str = "bernoulli",
        corruption: str | None = None,
        word_counts: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.corruption = parse_corruption(corruption)
        if self.corruption and layers < 2:
            raise ValueError("a corruption is the first of at least 2 stochastic layers")
        kind = self.corruption[0] if self.corruption else None
        self.word_dropout = kind in TEXT_CORRUPTIONS
        if (likelihood == "multinomial") != self.word_dropout and kind is not None:
            needs = "word counts" if self.word_dropout else "images, not word counts"
            raise ValueError(f"{kind} corruption needs {needs}")
        if kind in ("salt-pepper", "dropout") and likelihood != "bernoulli":
            raise ValueError(f"{kind} corruption needs binary data")
        if self.word_dropout:
            if word_counts is None and kind == "word-dropout-freq":
                raise ValueError("word-dropout-freq needs the training corpus's word_counts")
            counts = torch.ones(x_dim) if word_counts is None else torch.as_tensor(word_counts)
            if counts.shape != (x_dim,):
                raise ValueError(f"word_counts needs shape ({x_dim},), got {tuple(counts.shape)}")
            logits = keep_logits(kind, self.corruption[1], counts.float())
            self.register_buffer("word_keep_logits", logits)
        default_hidden, default_z = default_layout(x_dim, likelihood)
        self.x_dim, self.layers = int(x_dim), int(layers)
        self.hidden = tuple(hidden) if hidden is not None else default_hidden
        self.z_dim = int(z_dim) if z_dim is not None else default_z
        self.build_decoder(x_dim=self.x_dim, hidden=self.hidden, z_dim=self.z_dim,
                           activation=activation, likelihood=likelihood)  # fmt: skip
        learned = layers - 1 - (1 if self.corruption else 0)
        dims = list(h_dims) if h_dims is not None else [2 * self.z_dim] * learned
        if len(dims) != learned:
            raise ValueError(f"h_dims needs {learned} sizes for {layers} layers, got {dims}")
        self.h_dims = ([self.x_dim] if self.corruption else []) + dims
        self.h_names = [f"h{i + 1}" for i in range(len(self.h_dims))]
        inputs = [self.x_dim, *self.h_dims]
        outputs = [*self.h_dims, self.z_dim]
        self.encoder = nn.ModuleList(
            _GaussianLayer([n_in, *self.hidden], n_out, activation)
            for i, (n_in, n_out) in enumerate(zip(inputs, outputs, strict=True))
            if not (self.corruption and i == 0)
        )
        # r(h_l | h_{l+1}, x) with h_L = z, one per auxiliary layer.
        reverse = []
        for i, size in enumerate(self.h_dims):
            above = self.h_dims[i + 1] if i + 1 < len(self.h_dims) else self.z_dim
            first = self.corruption is not None and i == 0
            if first and self.word_dropout:
                layer = _WordKeepLayer
            elif first and self.corruption[0] != "gaussian":
                layer = _BernoulliLayer
            else:
                layer = _GaussianLayer
            reverse.append(layer([above + self.x_dim, *self.hidden], size, activation))
        self.reverse = nn.ModuleList(reverse)

    def corruption_dist(self, x: torch.Tensor) -> dist.Distribution:
        """The fixed p(x~ | x) of the denoising criterion."""
        kind, level = self.corruption
        if self.word_dropout:
            return WordDropout(x, self.word_keep_logits)
        if kind == "gaussian":
            return dist.Normal(x, torch.full_like(x, level)).to_event(1)
        if kind == "salt-pepper":
            return dist.Bernoulli(probs=(1 - level) * x + level / 2).to_event(1)
        return dist.Bernoulli(probs=(1 - level) * x).to_event(1)

    def encoder_dist(self, layer: int, inputs: torch.Tensor, x: torch.Tensor):
        """q of encoder layer ``layer`` (0-based; the last is z) given the layer below."""
        if self.corruption and layer == 0:
            return self.corruption_dist(x)
        if layer == 0 or (self.corruption and layer == 1):  # x, or the corrupted x~
            inputs = self.encoder_input(inputs)
        return self.encoder[layer - (1 if self.corruption else 0)](inputs)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> torch.Tensor:
        with data_plate(x, num_data):
            inputs = x
            for layer, name in enumerate([*self.h_names, "z"]):
                inputs = pyro.sample(name, self.encoder_dist(layer, inputs, x))
            return inputs

    def reverse_dist(self, level: int, above: torch.Tensor, x: torch.Tensor):
        """r(h_level | h_{level+1} (or z), x), for ``level`` counted from 0."""
        expanded = x.expand(above.shape[:-1] + x.shape[-1:])
        inputs = torch.cat([above, self.encoder_input(expanded)], dim=-1)
        if level == 0 and self.word_dropout:
            return self.reverse[level](inputs, x)  # the documents unexpanded: see WordDropout
        return self.reverse[level](inputs)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.likelihood_dist(z, x), obs=x)
            above = z
            for level in reversed(range(len(self.h_names))):
                above = pyro.sample(self.h_names[level], self.reverse_dist(level, above, x))

    def decoder_model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        """p(z) p(x | z) without the reverse model: the same log p(x), and no h to integrate."""
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.likelihood_dist(z, x), obs=x)

    def posterior_guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        """z ~ :meth:`posterior` (x) alone: a normalised density over z, to start AIS from."""
        with data_plate(x, num_data):
            pyro.sample("z", self.posterior(x))

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | h) at h = the means of the layers below (q(z | x) itself is a mixture)."""
        inputs = x
        for layer in range(len(self.h_names)):
            inputs = self.encoder_dist(layer, inputs, x).mean
        return self.encoder_dist(len(self.h_names), inputs, x)
