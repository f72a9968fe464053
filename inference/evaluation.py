"""Bounds of one model over a whole data set: batches of datapoints, particles in chunks.

Also perplexity, the per-word form in which document models report log p(x).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from pyro.poutine.util import site_is_subsample

from ppl_models.text import log_multinomial_coefficient

from . import distributed
from .bounds import Bound, elbo_bound, iwae_bound, summary
from .compiled import TOLERANCE
from .distributed import World
from .tracing import (
    Layout,
    dry_traces,
    elbo_decomposition,
    log_importance_weights,
    plate_nesting,
    weighted_sample,
)


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
    compile: bool | None = None,
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

    With ``compile`` a chunk of particles (a fixed number of them on a batch
    of a fixed shape) is recorded once and compiled (inductor): the same
    draws, the weights to float rounding (checked on the first chunk; a
    model that cannot be compiled is evaluated eagerly, with a warning). By
    default an evaluation of many chunks compiles (:func:`worth_compiling`).

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
    if compile is None:
        compile = worth_compiling(k_max, data.shape[0], batch_size, chunk)
    weights = _ChunkedWeights(model, guide, chunk, compile=compile)

    def batch(xb: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        log_w = weights(xb, k_max)
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
        "compiled": weights.compiled is not None,
    }


COMPILE_MIN_CHUNKS = 2000  # vectorised passes of an evaluation that compiles by default


def worth_compiling(num_particles: int, num_datapoints: int, batch_size: int, chunk: int) -> bool:
    """Whether an evaluation compiles its chunks by default: one of many passes.

    Compiling costs seconds; from :data:`COMPILE_MIN_CHUNKS` passes (IWAE-5000
    on 1000 images in batches of 100: 2500) it saves more than that. The rule
    depends on the settings alone: the same settings, the same numbers.
    """
    passes = -(-num_datapoints // batch_size) * -(-num_particles // chunk)
    return passes >= COMPILE_MIN_CHUNKS


class _ChunkedWeights:
    """:func:`log_importance_weights` in chunks of particles, compiled for long evaluations.

    The chunk (``chunk`` particles on a batch of the first batch's shape) is
    recorded once, random draws included, and compiled; the draws come from
    torch's generator as in eager mode, so the weights are the eager ones to
    float rounding (checked on the first chunk). Another shape (a last,
    smaller batch), a model that subsamples its data plate, or one that
    cannot be recorded is evaluated eagerly.
    """

    def __init__(self, model: Callable, guide: Callable, chunk: int, *, compile: bool) -> None:
        self.model, self.guide, self.chunk = model, guide, chunk
        self.pending = compile
        self.compiled: Callable | None = None
        self.shape: torch.Size | None = None
        self.nesting: int | None = None
        self.fallback: str | None = None

    def __call__(self, x: torch.Tensor, num_particles: int) -> torch.Tensor:
        chunks = []
        if self.pending and num_particles >= self.chunk:
            first = self._capture(x)  # the first chunk, drawn eagerly: the check
            chunks += [] if first is None else [first]
        done = sum(c.shape[0] for c in chunks)
        if self.compiled is None or x.shape != self.shape:
            if num_particles > done:
                chunks.append(log_importance_weights(
                    self.model, self.guide, x, num_particles=num_particles - done,
                    chunk_size=self.chunk))  # fmt: skip
            return torch.cat(chunks, 0)
        for start in range(done, num_particles, self.chunk):
            size = min(self.chunk, num_particles - start)
            if size == self.chunk:
                chunks.append(self.compiled(x)[0])
            else:
                chunks.append(log_importance_weights(
                    self.model, self.guide, x, num_particles=size,
                    max_plate_nesting=self.nesting))  # fmt: skip
        return torch.cat(chunks, 0)

    def _chunk(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        layout = Layout(self.chunk, self.nesting, "data")
        with torch.no_grad():
            return (weighted_sample(self.model, self.guide, (x,), {}, layout).log_w,)

    def _capture(self, x: torch.Tensor) -> torch.Tensor | None:
        """Record and compile the chunk on ``x``; returns a first chunk, drawn eagerly."""
        from .compiled import Captured, why_not

        self.pending = False
        trace, model_trace = dry_traces(self.model, self.guide, (x,), {})
        self.nesting = plate_nesting(trace, model_trace)
        if any(
            site_is_subsample(site)
            and (site["fn"].subsample_size or site["fn"].size) < site["fn"].size
            for site in trace.nodes.values()
        ):  # each chunk would draw a minibatch of its own: the eager path replays one
            self._give_up("the guide subsamples its data plate")
            return None
        state = torch.get_rng_state()
        want = log_importance_weights(self.model, self.guide, x, num_particles=self.chunk,
                                      max_plate_nesting=self.nesting)  # fmt: skip
        try:
            compiled = Captured(lambda xb: self._chunk(xb), [x], random=True).function([0])
            after = torch.get_rng_state()
            torch.set_rng_state(state)
            got = compiled(x)[0]
        except Exception as err:  # any failure of capture or compilation: stay eager
            self._give_up(why_not(err))
            return want
        torch.set_rng_state(after)
        scale = max(float(want.abs().max()) if want.numel() else 1.0, 1.0)
        if not torch.equal(torch.isfinite(want), torch.isfinite(got)) or not bool(
            ((want - got).abs() <= TOLERANCE * scale).all()
        ):
            self._give_up("the compiled weights differ from the eager ones")
        else:
            self.compiled, self.shape = compiled, x.shape
        return want

    def _give_up(self, why: str) -> None:
        self.fallback = why
        warnings.warn(f"evaluating eagerly: the chunk could not be compiled ({why})",
                      RuntimeWarning, stacklevel=4)  # fmt: skip


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
