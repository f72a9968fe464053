r"""Restricted Boltzmann machine with binary visible and hidden units.

Energy and free energy (Smolensky 1986; Hinton 2002)::

    E(v, h) = -v^T W h - b_v^T v - b_h^T h,          W: (n_visible, n_hidden)
    F(v)    = -b_v^T v - sum_j softplus(b_h_j + (v^T W)_j)
    p(v, h) = exp(-E(v, h)) / Z,   p(v) = exp(-F(v)) / Z
    p(h_j = 1 | v) = sigmoid(b_h_j + (v^T W)_j),   p(v_i = 1 | h) = sigmoid(b_v_i + (W h)_i)

As a Pyro pair, ``model(v)`` samples h from a uniform Bernoulli base and adds
``pyro.factor`` terms so that its log joint is exactly -E(v, h) (the
unnormalised log density; Z is handled by ``inference.partition``), and
``guide(v)`` is the exact posterior p(h | v). With that guide every log weight
is log sum_h exp(-E(v, h)) = -F(v): the ELBO equals log p~(v) exactly. Any
other guide leaves the gap KL(q(h) || p(h | v)) >= 0.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.nn import functional as F

from .vae import data_plate


def sample_bernoulli(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary draws with P(1) = ``probs``, in the dtype of ``probs``.

    One uniform per entry compared in place: the same distribution as
    ``torch.bernoulli`` at about a third of its cost on CPU, where the
    sampling would otherwise cost more than the matrix products of a Gibbs step.
    """
    u = torch.rand(probs.shape, dtype=probs.dtype, device=probs.device, generator=generator)
    return u.lt_(probs)


# 23 random mantissa bits under the exponent of 1.0 make a float in [1, 2) (int32 tensors, so
# that no Python number is converted on every call).
_MANTISSA = torch.tensor(0x007FFFFF, dtype=torch.int32)
_ONE = torch.tensor(0x3F800000, dtype=torch.int32)


class BernoulliStream:
    """Binary draws like :func:`sample_bernoulli`, from a seeded SFC64 bit stream of their own.

    Each draw compares P(1) with a uniform on the grid {k / 2^23}, made from 23
    random bits placed in the mantissa of a float in [1, 2): P(draw = 1)
    differs from the requested probability by less than 2^-23 (``torch.rand``
    has the same kind of grid, 2^-24), draws are exactly 0 where P(1) = 0 and
    exactly 1 where P(1) = 1. numpy's SFC64 gives raw 64-bit words about three
    times faster than torch's CPU generator gives floats, which in an RBM's
    Gibbs step costs as much as a matrix product. The stream is independent
    of torch's global generator; :attr:`state` and :meth:`set_state`
    checkpoint it exactly.

    Parameters
    ----------
    seed : int or sequence of int
        Entropy for numpy's ``SeedSequence``; equal seeds give equal draws.
    """

    def __init__(self, seed: int | tuple[int, ...]) -> None:
        self._bits = np.random.SFC64(np.random.SeedSequence(seed))

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """0/1 draws with P(1) = ``probs`` (CPU), in the dtype of ``probs``."""
        n = probs.numel()
        words = self._bits.random_raw((n + 1) // 2).view(np.int32)[:n]
        u = torch.from_numpy(words).view(probs.shape)
        u = u.bitwise_and_(_MANTISSA).bitwise_or_(_ONE).view(torch.float32).sub_(1.0)
        return u.lt_(probs) if probs.dtype == torch.float32 else (u < probs).to(probs.dtype)

    @property
    def state(self) -> list[int]:
        """The generator's state as plain integers (checkpoint-safe)."""
        return [int(word) for word in self._bits.state["state"]["state"]]

    def set_state(self, words: list[int]) -> None:
        state = self._bits.state
        state["state"]["state"] = np.array(words, dtype=np.uint64)
        state["has_uint32"], state["uinteger"] = 0, 0
        self._bits.state = state


class RBM(PyroModule):
    """Binary RBM with parameters ``W`` (n_visible, n_hidden), ``b_v``, ``b_h``.

    Parameters
    ----------
    n_visible, n_hidden : int
        Layer sizes.
    init_scale : float
        Standard deviation of the initial weights (Hinton 2010 suggests 0.01).
    """

    def __init__(self, n_visible: int, n_hidden: int, *, init_scale: float = 0.01) -> None:
        super().__init__()
        if n_visible < 1 or n_hidden < 1:
            raise ValueError(f"an RBM needs positive layer sizes, got {n_visible}, {n_hidden}")
        self.n_visible, self.n_hidden = int(n_visible), int(n_hidden)
        self.W = torch.nn.Parameter(init_scale * torch.randn(self.n_visible, self.n_hidden))
        self.b_v = torch.nn.Parameter(torch.zeros(self.n_visible))
        self.b_h = torch.nn.Parameter(torch.zeros(self.n_hidden))

    def check_visible(self, v: torch.Tensor) -> None:
        """Raise ValueError unless ``v`` is binary with ``n_visible`` columns."""
        if v.shape[-1] != self.n_visible:
            raise ValueError(f"the RBM has {self.n_visible} visible units, data has {v.shape[-1]}")
        if not torch.all((v == 0) | (v == 1)):
            raise ValueError("RBM visible units are binary: data must be 0/1")

    def energy(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """E(v, h), batched over leading dims."""
        return -((v @ self.W) * h).sum(-1) - v @ self.b_v - h @ self.b_h

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = -log sum_h exp(-E(v, h))."""
        return -(v @ self.b_v) - F.softplus(v @ self.W + self.b_h).sum(-1)

    def hidden_logits(self, v: torch.Tensor) -> torch.Tensor:
        """Logits of p(h_j = 1 | v)."""
        return v @ self.W + self.b_h

    def visible_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of p(v_i = 1 | h)."""
        return h @ self.W.T + self.b_v

    @torch.no_grad()
    def gibbs(self, v: torch.Tensor, steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` rounds of block Gibbs sampling h ~ p(h|v), v ~ p(v|h); returns (v, h)."""
        h = sample_bernoulli(torch.sigmoid(self.hidden_logits(v)))
        for _ in range(steps):
            v = sample_bernoulli(torch.sigmoid(self.visible_logits(h)))
            h = sample_bernoulli(torch.sigmoid(self.hidden_logits(v)))
        return v, h

    def model(self, v: torch.Tensor, *, num_data: int | None = None) -> None:
        with data_plate(v, num_data):
            uniform = dist.Bernoulli(probs=torch.full_like(self.b_h, 0.5)).to_event(1)
            h = pyro.sample("h", uniform)
            # The uniform base contributes -n_hidden log 2; the factor restores exactly -E(v, h).
            pyro.factor("joint", -self.energy(v, h) + self.n_hidden * math.log(2.0))

    def guide(self, v: torch.Tensor, *, num_data: int | None = None) -> None:
        with data_plate(v, num_data):
            pyro.sample("h", dist.Bernoulli(logits=self.hidden_logits(v)).to_event(1))
