"""Bounds of one model over a whole data set: batches of datapoints, particles in chunks.

Also perplexity, the per-word form in which document models report log p(x).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from ppl_models.text import log_multinomial_coefficient

from . import distributed
from .bounds import Bound, elbo_bound, iwae_bound, summary
from .distributed import World
from .tracing import elbo_decomposition, log_importance_weights


def _prefixed(parts: dict, prefix: str) -> dict:
    return {k.split("/", 1)[1]: v for k, v in parts.items() if k.startswith(prefix + "/")}


def evaluate_bounds(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *,
    ks: Sequence[int],
    batch_size: int = 100,
    max_rows: int = 2_000,
    decomposition_particles: int = 100,
    statistics: Mapping[str, Callable[[torch.Tensor], object]] | None = None,
    seed: int | None = None,
    world: World | None = None,
    progress: bool = True,
) -> dict:
    """ELBO, IWAE-k for every k in ``ks`` and the ELBO decomposition over a data set.

    For each batch of datapoints, max(ks) particles are drawn (in chunks of
    about ``max_rows / batch_size`` so that memory stays bounded), the IWAE-k
    estimates use disjoint groups of k of them, and the ELBO uses all of them.

    ``statistics`` maps names to functions of a batch's (K, B) log weights
    that return one value per datapoint (for example the PSIS k-hat).

    With a ``seed`` each batch draws its particles from a seed of its own
    (``seed`` and the batch's number), and the batches are shared among the
    processes of a torchrun job (``world``, default: this process's): the
    numbers depend on ``seed`` and ``batch_size``, not on the number of
    processes. Without one the particles come from the global random state.

    Returns
    -------
    dict
        ``"elbo"`` and ``"iwae"`` (a dict k -> :class:`Bound`) with per-datapoint
        values, ``"decomposition"`` and ``"statistics"`` (per-datapoint tensors).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    k_max = ks[-1]
    chunk = max(1, max_rows // batch_size)

    def batch(xb: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        log_w = log_importance_weights(model, guide, xb, num_particles=k_max, chunk_size=chunk)
        out = {
            f"statistics/{name}": torch.as_tensor(fn(log_w)).reshape(-1)
            for name, fn in (statistics or {}).items()
        }
        elbo = elbo_bound(log_w)
        out["elbo"], out["elbo_se"] = elbo.value, elbo.stderr
        for k in ks:
            bound = iwae_bound(log_w, k=k)
            out[f"iwae{k}"], out[f"iwae{k}_se"] = bound.value, bound.stderr
        parts_dec = elbo_decomposition(
            model, guide, xb, num_particles=min(decomposition_particles, k_max)
        )
        for name, value in parts_dec.items():
            if name != "kl_analytic":
                out[f"decomposition/{name}"] = value
        out["kl_analytic"] = torch.tensor([parts_dec["kl_analytic"]])
        return out

    results = distributed.map_batches(
        data, batch_size, batch, world=world,
        seed=None if seed is None else (seed, distributed.STREAM_IWAE),
        desc=f"IWAE-{k_max}", progress=progress,
    )  # fmt: skip
    parts = {name: [r[name] for r in results] for name in results[0]}
    cat = {name: torch.cat(values) for name, values in parts.items()}
    return {
        "elbo": Bound(cat["elbo"], cat["elbo_se"]),
        "iwae": {k: Bound(cat[f"iwae{k}"], cat[f"iwae{k}_se"]) for k in ks},
        "decomposition": _prefixed(cat, "decomposition"),
        "statistics": _prefixed(cat, "statistics"),
        "kl_analytic": bool(cat["kl_analytic"].all()),
    }


def perplexity(entry: Mapping, counts: torch.Tensor) -> dict:
    """Per-word perplexity from a split-average of log p(x) over documents ``counts``.

    ``entry`` is a report entry (``mean`` of log p(bag) per document, its
    ``stderr`` and ``error``). Perplexity is defined from the probability of
    the words in their order, log p(bag) - log(N_d! / prod_w x_w!) (NVDM,
    ProdLDA): exp(-sum_d (log p(x_d) - log C(x_d)) / sum_d N_d). A lower bound
    on log p(x) gives an upper bound on perplexity; the standard error is
    carried over by the delta method.
    """
    n = counts.shape[0]
    coefficient = float(log_multinomial_coefficient(counts.double()).sum()) / n
    words = float(counts.sum()) / n
    value = math.exp(-(entry["mean"] - coefficient) / words)
    return summary(value, value * entry["stderr"] / words, entry["error"])


def unigram_perplexity(counts: torch.Tensor, word_counts: torch.Tensor) -> float:
    """Perplexity of ``counts`` under the training word frequencies (add-one), no latent."""
    log_p = torch.log((word_counts.double() + 1) / (word_counts.double() + 1).sum())
    return math.exp(-float((counts.double() * log_p).sum() / counts.sum()))
