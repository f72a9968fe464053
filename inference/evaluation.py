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

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["evaluate_bounds"]


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

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...         pyro.sample("x", dist.Normal(z, 0.5), obs=x)
    >>> def guide(x):
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Normal(0.8 * x, 0.6))
    >>> x = torch.tensor([-1.0, 0.3, 2.0])
    >>> from inference import evaluate_bounds
    >>> result = evaluate_bounds(model, guide, x, ks=(1, 10, 100), progress=False)
    >>> sorted(result["iwae"]), result["elbo"].value.shape
    ([1, 10, 100], torch.Size([3]))
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    k_max = ks[-1]
    chunk = max(1, max_rows // batch_size)
    if compile is None:
        compile = worth_compiling(k_max, data.shape[0], batch_size, chunk)
    if compile:
        from .compiled import warm_up

        warm_up()  # inductor's probing of the CPU, while the first chunk is recorded
    weights = _ChunkedWeights(model, guide, chunk, compile=compile)
    decomposition: list[_Recorded] = []  # made on the first batch, once the chunk is recorded

    def decompose(xb: torch.Tensor) -> dict:
        return elbo_decomposition(
            model, guide, xb, num_particles=min(decomposition_particles, k_max),
            max_plate_nesting=weights.nesting,
        )  # fmt: skip

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
        if not decomposition:  # compiled where the chunk is: the same batches, the same model
            decomposition.append(_Recorded(decompose, "the ELBO decomposition",
                                           compile=weights.compiled is not None))  # fmt: skip
        parts_dec = decomposition[0](xb)
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


class _Recorded:
    """``fn(x)``, a dict of tensors (and flags) drawing random numbers, compiled on its first x.

    The first call runs ``fn`` eagerly and returns that result, records the
    same call with its random draws (``make_fx``; the part that depends on
    ``x`` and the weights alone is computed once per ``x``) and compiles it;
    the compiled function draws from torch's generator as eager code does,
    so it must give the eager result to float rounding, which the first call
    checks. Later calls with ``x`` of the first one's shape run compiled;
    another shape, a failed capture or a mismatch (a warning) run eagerly.
    Non-tensor entries (flags) are those of the first call.
    """

    def __init__(self, fn: Callable[[torch.Tensor], dict], what: str, *, compile: bool,
                 skip: Callable[[], str | None] | None = None) -> None:  # fmt: skip
        self.fn, self.what, self.pending, self.skip = fn, what, compile, skip
        self.compiled: Callable | None = None
        self.shape: torch.Size | None = None
        self.flags: dict = {}
        self.names: list[str] = []
        self.fallback: str | None = None

    def __call__(self, x: torch.Tensor) -> dict:
        if self.pending:
            return self._capture(x)
        if self.compiled is None or x.shape != self.shape:
            return self.fn(x)
        return {**dict(zip(self.names, self.compiled(x), strict=True)), **self.flags}

    def _capture(self, x: torch.Tensor) -> dict:
        from .compiled import Captured, why_not

        self.pending = False
        state = torch.get_rng_state()
        want = self.fn(x)
        why = self.skip() if self.skip is not None else None
        if why is not None:  # the eager call found a pair the recording would not serve
            self._give_up(why)
            return want
        self.names = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
        self.flags = {k: v for k, v in want.items() if k not in self.names}

        def tensors(xb: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.fn(xb)
            return tuple(out[k] for k in self.names)

        try:
            captured = Captured(tensors, [x], random=True, fixed=(0,))
            compiled = captured.function(list(range(len(self.names))))
            after = torch.get_rng_state()
            torch.set_rng_state(state)
            got = compiled(x)
        except Exception as err:  # any failure of capture or compilation: stay eager
            self._give_up(why_not(err))
            return want
        torch.set_rng_state(after)
        if all(_close(want[k], g) for k, g in zip(self.names, got, strict=True)):
            self.compiled, self.shape = compiled, x.shape
        else:
            self._give_up(f"the compiled {self.what} differs from the eager one")
        return want

    def _give_up(self, why: str) -> None:
        self.fallback = why
        warnings.warn(f"evaluating eagerly: {self.what} could not be compiled ({why})",
                      RuntimeWarning, stacklevel=5)  # fmt: skip


def _close(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal to float rounding, relative to the largest value (and infinite in the same places)."""
    scale = max(float(want.abs().max()) if want.numel() else 1.0, 1.0)
    return torch.equal(torch.isfinite(want), torch.isfinite(got)) and bool(
        ((want - got).abs() <= TOLERANCE * scale).all()
    )


class _ChunkedWeights:
    """:func:`log_importance_weights` in chunks of particles, compiled for long evaluations.

    The chunk (``chunk`` particles on a batch of the first batch's shape) is
    a :class:`_Recorded` function; a model that subsamples its data plate is
    evaluated eagerly (each compiled chunk would draw a minibatch of its
    own), and so is a batch of another shape (a last, smaller batch).
    """

    def __init__(self, model: Callable, guide: Callable, chunk: int, *, compile: bool) -> None:
        self.model, self.guide, self.chunk = model, guide, chunk
        self.pending = compile
        self.recorded: _Recorded | None = None
        self.nesting: int | None = None
        self.fallback: str | None = None
        self.found: dict = {}  # Layout flags the first chunk learnt

    @property
    def compiled(self) -> Callable | None:
        return self.recorded.compiled if self.recorded is not None else None

    def __call__(self, x: torch.Tensor, num_particles: int) -> torch.Tensor:
        chunks = []
        if self.pending and num_particles >= self.chunk:
            first = self._capture(x)  # the first chunk, drawn eagerly: the check
            chunks += [] if first is None else [first]
        done = sum(c.shape[0] for c in chunks)
        if self.compiled is None or x.shape != self.recorded.shape:
            if num_particles > done:
                chunks.append(log_importance_weights(
                    self.model, self.guide, x, num_particles=num_particles - done,
                    chunk_size=self.chunk))  # fmt: skip
            return torch.cat(chunks, 0)
        # each chunk copied into one tensor made first: kept chunks, small blocks among each
        # call's large temporaries, would keep the C heap from reusing the freed space
        log_w = None
        for start in range(0, num_particles, self.chunk):
            size = min(self.chunk, num_particles - start)
            if start < done:
                part = chunks[0]
            elif size == self.chunk:
                part = self.recorded(x)["log_w"]
            else:
                part = log_importance_weights(self.model, self.guide, x, num_particles=size,
                                              max_plate_nesting=self.nesting)  # fmt: skip
            if log_w is None:
                log_w = part.new_empty((num_particles, *part.shape[1:]))
            log_w[start : start + size] = part
        return log_w

    def _not_vectorised(self) -> str | None:
        if self.found.get("vectorised", True):
            return None
        return "the pair does not broadcast over particles: they run one at a time"

    def _chunk(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        layout = Layout(self.chunk, self.nesting, "data", **self.found)
        with torch.no_grad():
            log_w = weighted_sample(self.model, self.guide, (x,), {}, layout).log_w
        # what the first chunk learnt (enumerated sites, particles one at a time) the next know
        self.found = layout.found
        return {"log_w": log_w}

    def _capture(self, x: torch.Tensor) -> torch.Tensor | None:
        """Record and compile the chunk on ``x``; returns a first chunk, drawn eagerly.

        None where the guide subsamples: the eager path draws one minibatch for
        all the batch's particles.
        """
        self.pending = False
        trace, model_trace = dry_traces(self.model, self.guide, (x,), {})
        self.nesting = plate_nesting(trace, model_trace)
        subsamples = any(
            site_is_subsample(site)
            and (site["fn"].subsample_size or site["fn"].size) < site["fn"].size
            for site in trace.nodes.values()
        )
        self.recorded = _Recorded(self._chunk, "the chunk", compile=not subsamples,
                                  skip=self._not_vectorised)  # fmt: skip
        if subsamples:
            self.fallback = "the guide subsamples its data plate"
            warnings.warn(f"evaluating eagerly: the chunk could not be compiled ({self.fallback})",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
            return None
        state = torch.get_rng_state()
        first = self.recorded(x)["log_w"]
        self.fallback = self.recorded.fallback
        if self.recorded.compiled is None:  # eager after all: draw as an eager run draws
            torch.set_rng_state(state)
            return None
        return first


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
