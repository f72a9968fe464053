"""Figures (the only module that imports matplotlib). Every function writes one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .runs import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return Path(path)


def plot_iwae_ladder(report: dict, path: Path) -> Path:
    """IWAE-k against k (log axis) with error bars, the ELBO and any exact log p(x)."""
    from .evaluate import iwae_ladder

    ks, means, errs = iwae_ladder(report)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(ks, means, yerr=errs, marker="o", capsize=3, label="IWAE-k")
    elbo = report["elbo"]
    ax.axhline(elbo["mean"], color="C1", ls="--", label=f"ELBO {elbo['mean']:.2f}")
    if "exact_log_px" in report:
        ax.axhline(report["exact_log_px"], color="k", ls=":", label="exact log p(x)")
    ax.set_xscale("log")
    ax.set_xlabel("k (importance samples)")
    ax.set_ylabel("nats per datapoint")
    ax.set_title(f"Bounds on log p(x), {report['split']} split")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _image_side(x_dim: int) -> int | None:
    side = math.isqrt(x_dim)
    return side if side * side == x_dim else None


def plot_images(rows: list[tuple[str, torch.Tensor]], path: Path) -> Path:
    """A grid of images: one labelled row per (label, (n, x_dim) tensor)."""
    side = _image_side(rows[0][1].shape[1])
    if side is None:
        raise ValueError(f"cannot show {rows[0][1].shape[1]}-dim data as square images")
    n = max(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.8, len(rows) * 0.9), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < images.shape[0]:
                ax.imshow(
                    images[j].reshape(side, side).cpu().numpy(), cmap="gray_r", vmin=0, vmax=1
                )
        axes[i][0].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    return _save(fig, path)


def plot_training(metrics: list[dict], path: Path) -> Path:
    """Training bound and held-out ELBO per epoch."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    epochs = [m["epoch"] for m in metrics]
    ax.plot(epochs, [m["train_bound"] for m in metrics], label="training objective")
    for key in metrics[0]:
        if key.endswith("_elbo"):
            ax.plot(epochs, [m[key] for m in metrics], label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)
