"""Model factories for ``elbolab train --model``, written as Pyro's examples write them.

``m2``: ss_vae_M2 without labels (a one-hot class y in the guide, networks on
``torch.cat(..., dim=1)``, a data plate without a size): elbolab trains and
evaluates it, one particle at a time; ``enumerated``: a site summed out in
its weights. The others are refused in one line.
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class M2(nn.Module):
    def __init__(self, x_dim, z_dim=3, classes=4, hidden=32):
        super().__init__()
        self.z_dim, self.classes = z_dim, classes
        self.encoder_y = nn.Sequential(
            nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, classes)
        )
        self.encoder_z = nn.Sequential(
            nn.Linear(x_dim + classes, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim + classes, hidden), nn.Softplus(), nn.Linear(hidden, x_dim)
        )

    def model(self, xs):
        pyro.module("ss_vae", self)
        batch = xs.size(0)
        with pyro.plate("data"):
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(batch, self.z_dim), 1.0).to_event(1))
            ys = pyro.sample(
                "y", dist.OneHotCategorical(xs.new_ones(batch, self.classes) / self.classes)
            )
            logits = self.decoder(torch.cat([zs, ys], dim=1))
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=xs)

    def guide(self, xs):
        with pyro.plate("data"):
            alpha = torch.softmax(self.encoder_y(xs), dim=-1)
            ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            out = self.encoder_z(torch.cat([xs, ys], dim=1))
            pyro.sample(
                "z",
                dist.Normal(
                    out[..., : self.z_dim], nn.functional.softplus(out[..., self.z_dim :]) + 1e-3
                ).to_event(1),
            )


class Base(nn.Module):
    def __init__(self, x_dim, z_dim=2):
        super().__init__()
        self.z_dim = z_dim
        self.enc = nn.Linear(x_dim, z_dim)
        self.dec = nn.Linear(z_dim, x_dim)

    def likelihood(self, z, xs, scale=1.0):
        pyro.sample(
            "x", dist.Bernoulli(logits=self.dec(z) * scale, validate_args=False).to_event(1), obs=xs
        )


class MapEncoder(Base):
    """An amortised MAP guide: z = enc(x), a point mass."""

    def model(self, xs):
        pyro.module("m", self)
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(xs.new_zeros(xs.shape[0], self.z_dim), 1.0).to_event(1)
            )
            self.likelihood(z, xs)

    def guide(self, xs):
        with pyro.plate("data", xs.shape[0]):
            pyro.sample("z", dist.Delta(self.enc(xs)).to_event(1))


class GlobalScale(Base):
    """A global temperature on the decoder's logits, outside the data plate."""

    def model(self, xs):
        pyro.module("m", self)
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(xs.new_zeros(xs.shape[0], self.z_dim), 1.0).to_event(1)
            )
            self.likelihood(z, xs, s.unsqueeze(-1).unsqueeze(-1) if s.dim() else s)

    def guide(self, xs):
        pyro.sample("s", dist.LogNormal(0.0, 0.1))
        with pyro.plate("data", xs.shape[0]):
            pyro.sample("z", dist.Normal(self.enc(xs), 1.0).to_event(1))


class Enumerated(Base):
    """A mixture of two decoders' offsets, its component enumerated."""

    def model(self, xs):
        pyro.module("m", self)
        with pyro.plate("data", xs.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
            z = pyro.sample(
                "z", dist.Normal(xs.new_zeros(xs.shape[0], self.z_dim), 1.0).to_event(1)
            )
            self.likelihood(z, xs, 1.0 + c.unsqueeze(-1))

    def guide(self, xs):
        with pyro.plate("data", xs.shape[0]):
            pyro.sample("z", dist.Normal(self.enc(xs), 1.0).to_event(1))


class NoPlate(Base):
    """The batch carried by the sample shapes (``.to_event(2)``), no data plate."""

    def model(self, xs):
        pyro.module("m", self)
        z = pyro.sample("z", dist.Normal(xs.new_zeros(xs.shape[0], self.z_dim), 1.0).to_event(2))
        logits = self.dec(z)
        pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(2), obs=xs)

    def guide(self, xs):
        pyro.sample("z", dist.Normal(self.enc(xs), 1.0).to_event(2))


def no_plate(x_dim):
    return NoPlate(x_dim)


def map_encoder(x_dim):
    return MapEncoder(x_dim)


def global_scale(x_dim):
    return GlobalScale(x_dim)


def enumerated(x_dim):
    return Enumerated(x_dim)


def m2(x_dim):
    return M2(x_dim)


class PositiveLatent(nn.Module):
    """z > 0 (LogNormal prior), the guide drawing log z as an auxiliary site, as AutoNormal does.

    AIS moves the auxiliary draw: HMC on R^d, the Jacobian carried by the Delta's log_density.
    """

    def __init__(self, x_dim, z_dim=2):
        super().__init__()
        self.z_dim = z_dim
        self.enc = nn.Linear(x_dim, 2 * z_dim)
        self.dec = nn.Linear(z_dim, x_dim)

    def model(self, xs):
        pyro.module("m", self)
        with pyro.plate("data", xs.shape[0]):
            prior = dist.LogNormal(xs.new_zeros(xs.shape[0], self.z_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            logits = self.dec(z.log())
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=xs)

    def guide(self, xs):
        with pyro.plate("data", xs.shape[0]):
            out = self.enc(xs)
            loc, scale = out[..., : self.z_dim], nn.functional.softplus(out[..., self.z_dim :])
            u = pyro.sample("z_unconstrained", dist.Normal(loc, scale + 0.05).to_event(1),
                            infer={"is_auxiliary": True})  # fmt: skip
            # q(z) = q(u) |du/dz| = q(u) / z: the Delta carries log |du/dz| = -sum(u)
            pyro.sample("z", dist.Delta(u.exp(), log_density=-u.sum(-1), event_dim=1))


def positive_latent(x_dim):
    return PositiveLatent(x_dim)
