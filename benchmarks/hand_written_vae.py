"""The reference for bench_train_run.py: a VAE trained on binarized MNIST in plain PyTorch.

What a person writes by hand for the job ``elbolab train`` does: the IWAE
paper's 784-200-200-50 tanh VAE, the reparameterised ELBO (K = 1) or IWAE-K
bound as one expression, ``torch.optim.Adam``, shuffled minibatches, the
held-out ELBO after every epoch, the weights saved at the end.

    python benchmarks/hand_written_vae.py --epochs 3 --k 1 --out weights.pt
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class VAE(nn.Module):
    def __init__(self, x_dim=784, hidden=200, z_dim=50):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                     nn.Tanh(), nn.Linear(hidden, 2 * z_dim))  # fmt: skip
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                     nn.Tanh(), nn.Linear(hidden, x_dim))  # fmt: skip

    def bound(self, x, k):
        return hand_written_bound(self.encoder, self.decoder, self.z_dim, x, k)


def hand_written_bound(encoder, decoder, z_dim: int, x: torch.Tensor, k: int) -> torch.Tensor:
    """ELBO (k = 1) or IWAE-k bound per datapoint, one expression in plain torch.

    Also the reference step of bench_train_step.py (with elbolab's VAE's networks).
    """
    loc, raw = encoder(x).split(z_dim, -1)
    scale = F.softplus(raw) + 1e-4
    eps = torch.randn(k, *loc.shape)
    z = loc + scale * eps
    log_q = (-0.5 * eps**2 - scale.log() - HALF_LOG_2PI).sum(-1)
    log_pz = (-0.5 * z**2 - HALF_LOG_2PI).sum(-1)
    logits = decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand(k, -1, -1), reduction="none").sum(
        -1
    )
    return torch.logsumexp(log_pz + log_px - log_q, 0) - math.log(k)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="weights.pt")
    args = parser.parse_args()
    torch.manual_seed(0)
    with np.load(os.environ["ELBOLAB_DATA"]) as data:
        # The .npz holds its arrays column-major: rows made contiguous, so that minibatches are
        # gathered row by row (as elbolab's loader does); otherwise every gather is strided.
        rows = torch.contiguous_format
        train = torch.from_numpy(data["train"]).to(torch.float32, memory_format=rows)
        valid = torch.from_numpy(data["valid"]).to(torch.float32, memory_format=rows)
    vae = VAE()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    n = len(train)
    for epoch in range(args.epochs):
        order = torch.randperm(n)
        for begin in range(0, n, args.batch_size):
            x = train[order[begin : begin + args.batch_size]]
            loss = -vae.bound(x, args.k).sum() * n / len(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            parts = [vae.bound(valid[i : i + 1000], 1).sum() for i in range(0, len(valid), 1000)]
            heldout = float(sum(parts))
        print(f"epoch {epoch + 1}: held-out ELBO {heldout / len(valid):.3f}")
    torch.save(vae.state_dict(), args.out)


if __name__ == "__main__":
    main()
