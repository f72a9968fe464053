r"""From a Pyro model/guide pair to per-particle log densities: the one place that scores a model.

For a model p(x, z) and guide q(z | x), with z_k ~ q(z | x),

    log w_k = log p(x, z_k) - log q(z_k | x),    k = 1..K,

per datapoint along the data plate. Particles are vectorised with an outer
plate (:data:`PARTICLE_PLATE`) to the left of every plate of the model and
guide; a :class:`Layout` records where the particle and data dimensions sit
in each site's batch shape and reduces every log density to (K, N), or (K,)
for a model without a data plate. Every estimator in elbolab (bounds,
objectives, the hierarchical terms, the amortisation split) scores a model
against a guide through :func:`trace_guide`, :func:`trace_model` and
:func:`log_density` here.

Plate scales (minibatch subsampling, ``poutine.scale``) are *not* applied to
log weights: they are per datapoint. Objectives multiply per-datapoint bounds
by the scale afterwards, never inside a logsumexp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .inspection import (
    PairError,
    check_guide_density,
    is_auxiliary,
    is_enumerated,
    is_point_mass,
    refuse_joint_log_mean,
)

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["log_importance_weights", "elbo_decomposition"]

PARTICLE_PLATE = "_elbolab_particles"


def sample_sites(trace) -> Iterable[dict]:
    """The scored sample sites of a trace (no plate subsample sites, no deterministic ones)."""
    for site in trace.nodes.values():
        if (
            site["type"] == "sample"
            and not site_is_subsample(site)
            and not site["infer"].get("_deterministic")
        ):
            yield site


def dry_run(model: Callable, guide: Callable, args, kwargs) -> tuple[int, dict]:
    """How many vectorised plates the model and guide nest, and the minibatch the guide draws.

    One run of the guide and the replayed model (:func:`dry_traces`). The
    subsample indices (see :func:`subsample_values`) are those the next
    guide run would draw: replaying them into every chunk of particles keeps
    one minibatch per call.
    """
    guide_trace, model_trace = dry_traces(model, guide, args, kwargs)
    return plate_nesting(guide_trace, model_trace), subsample_values(guide_trace)


def dry_traces(model: Callable, guide: Callable, args, kwargs) -> tuple:
    """Traces of one run of the guide and of the model replayed from it, without particles.

    Like Pyro's ELBO's first step, and it leaves the random state as it found
    it, so that calling it (or not) never changes the draws that follow.
    """
    with poutine.block(), torch.random.fork_rng(devices=[]):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        replayed = _replayed(model, replay_values(guide_trace))
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def plate_nesting(*traces) -> int:
    """How many batch dims the sites of ``traces`` nest: their vectorised plates, and more.

    A model may carry a batch in its sample shapes without a plate (Pyro's
    eight-schools MCMC example draws ``eta`` of batch shape (8,) outside any
    plate): the particle plate must sit to the left of those dims too.
    """
    dims = [
        -frame.dim
        for trace in traces
        for site in sample_sites(trace)
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    batch = [len(site["fn"].batch_shape) for trace in traces for site in sample_sites(trace)]
    return max(dims + batch, default=0)


def guess_max_plate_nesting(model: Callable, guide: Callable, args, kwargs) -> int:
    """How many vectorised plates the model and guide nest (see :func:`dry_run`)."""
    return dry_run(model, guide, args, kwargs)[0]


def top_latent(guide: Callable, *args, **kwargs) -> str:
    """The guide's latent site to report on: ``"z"`` by convention, else its only latent site."""
    with poutine.block(), torch.random.fork_rng(devices=[]), torch.no_grad():
        names = list(latent_values(poutine.trace(guide).get_trace(*args, **kwargs)))
    if "z" in names or len(names) == 1:
        return "z" if "z" in names else names[0]
    raise ValueError(
        f"the guide samples {', '.join(names) or 'no site'}: name its top latent site 'z' "
        "(elbolab's convention) so that it can be compared"
    )


def latent_values(guide_trace) -> dict[str, torch.Tensor]:
    """Values of the guide's scored sample sites: every one is a latent of the model."""
    return {s["name"]: s["value"] for s in sample_sites(guide_trace)}


def subsample_values(trace) -> dict[str, torch.Tensor]:
    """The subsample indices each subsampled plate drew, by plate name."""
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site_is_subsample(site)
    }


def replay_values(guide_trace) -> dict[str, torch.Tensor]:
    """Everything the model must share with the guide: latent values and subsample indices."""
    return {**subsample_values(guide_trace), **latent_values(guide_trace)}


class _Replay(Messenger):
    """Set the sample sites named in ``values`` to them (latent sites stay latent).

    Pyro's ``poutine.replay`` does the same from a trace but also replaces
    each site's ``infer`` dict with the recorded one; here a site keeps its
    own (an autoguide's ``is_auxiliary`` flag, for instance).
    """

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg: dict) -> None:
        if not msg["is_observed"] and msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]
            msg["done"] = True


def _replayed(fn: Callable, values: dict[str, torch.Tensor]) -> Callable:
    """``fn`` with the sample sites named in ``values`` set to them, as Pyro's ELBOs replay.

    Replay (not ``poutine.condition``): the sites stay latent, and plate
    subsample sites are replayed too, so that a model that subsamples with
    ``pyro.plate(..., subsample_size=B)`` scores the same minibatch as the guide.
    """

    def replayed(*args, **kwargs):
        with _Replay(values):
            return fn(*args, **kwargs)

    return replayed


def masked(site: dict, log_prob: torch.Tensor) -> torch.Tensor:
    """A site's log density with ``poutine.mask``'s mask applied: masked entries count 0."""
    mask = site["mask"]
    if mask is False:
        return torch.zeros_like(log_prob)
    if isinstance(mask, torch.Tensor):
        return torch.where(mask, log_prob, torch.zeros_like(log_prob))
    return log_prob


@dataclass
class Layout:
    """Where the particle and data dimensions sit in every site's batch shape."""

    num_particles: int
    max_plate_nesting: int
    plate: str | None
    plate_dim: int | None = None  # negative batch dim of the data plate, once found
    plate_size: int | None = None  # None until found (a plate without a size: from a site)
    vectorised: bool = True  # False: no particle plate, one particle per pass
    scaled: bool = False  # each site's log density times its scale (joint weights only)
    enumerate: bool = False  # the model's enumerated sites summed out (see trace_model)

    @property
    def found(self) -> dict:
        """What a pass learnt of the pair, for the layouts of later passes to start from."""
        return {"vectorised": self.vectorised, "enumerate": self.enumerate}

    @property
    def rank(self) -> int:
        return self.max_plate_nesting + 1

    @property
    def shape(self) -> tuple[int, ...]:
        if self.plate_dim is None:
            return (self.num_particles,)
        return (self.num_particles, self.plate_size)

    def find_plate(self, *traces) -> None:
        """Record the data plate's dim and (subsample) size, if any site lies in it."""
        if self.plate is None:
            return
        for trace in traces:
            for site in sample_sites(trace):
                for frame in site["cond_indep_stack"]:
                    if frame.name == self.plate:
                        if frame.dim is None:
                            raise PairError(
                                f"plate {self.plate!r} is sequential; per-datapoint weights "
                                "need a vectorised plate"
                            )
                        size = frame.size if frame.size is not None and frame.size > 0 else None
                        batch = site["fn"].batch_shape
                        if size is None and len(batch) >= -frame.dim:
                            # pyro.plate("data") without a size: Pyro infers it, and so do we
                            size = batch[frame.dim]
                        self.plate_dim, self.plate_size = frame.dim, size
                        return

    def reduce(self, site: dict, log_prob: torch.Tensor) -> torch.Tensor:
        """Sum a site's log density over every batch dim but particles (and data plate)."""
        if self.scaled and site["scale"] is not None:
            log_prob = log_prob * site["scale"]
        log_prob = masked(site, log_prob)
        if log_prob.dim() > self.rank:
            raise PairError(
                f"site {site['name']!r} has batch shape {tuple(log_prob.shape)} with more dims "
                f"than its {self.max_plate_nesting} plate(s)"
            )
        log_prob = log_prob.reshape((1,) * (self.rank - log_prob.dim()) + log_prob.shape)
        if self.plate_dim is None:  # (sum over an empty tuple of dims would sum them all)
            summed = log_prob.sum(tuple(range(1, self.rank))) if self.rank > 1 else log_prob
            return summed.expand(self.shape)
        if not any(f.name == self.plate for f in site["cond_indep_stack"]):
            outside = f"site {site['name']!r} lies outside plate {self.plate!r}"
            raise PairError(
                f"{outside}: per-datapoint log weights need every sample site inside it (pass "
                "plate=None for joint weights)",
                command=f"{outside} (a global latent, or a plate of another name): the elbolab "
                "command measures per-datapoint bounds over minibatches, and a global latent's "
                "evidence is joint over the whole data set; put every site in pyro.plate("
                f"{self.plate!r}), or use the Python API with plate=None on the full data",
            )
        keep = self.rank + self.plate_dim
        if self.plate_size is None:
            self.plate_size = log_prob.shape[keep]
        others = tuple(d for d in range(1, self.rank) if d != keep)
        if others:
            log_prob = log_prob.sum(others, keepdim=True)
        return log_prob.reshape(log_prob.shape[0], log_prob.shape[keep]).expand(self.shape)

    def expand_factor(self, factor: torch.Tensor, value: torch.Tensor, event_dim: int):
        """Reshape a (K, N) or (K,) factor to broadcast against a site value."""
        shape = [1] * value.dim()
        batch_start = value.dim() - event_dim - self.rank
        shape[batch_start] = self.num_particles
        if self.plate_dim is not None:
            shape[value.dim() - event_dim + self.plate_dim] = self.plate_size
        return factor.reshape(shape)


@dataclass
class WeightedSample:
    """Per-particle log densities of one vectorised draw from the guide."""

    log_p: torch.Tensor  # (K, N) or (K,)
    log_q: torch.Tensor
    layout: Layout
    guide_trace: object  # the last particle's, where they were evaluated one at a time
    model_trace: object
    guide_traces: list | None = None  # one per particle, where they were evaluated one at a time
    model_traces: list | None = None

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_p - self.log_q

    def guide_log_density(self, only) -> torch.Tensor:
        """log q of the guide sites named in ``only``, (K, N), without plate scales."""
        layout = dataclasses.replace(self.layout, scaled=False)
        if self.guide_traces is None:
            return log_density(self.guide_trace, layout, only=only)
        layout.num_particles = 1
        return torch.cat([log_density(t, layout, only=only) for t in self.guide_traces])

    def scale(self) -> float | torch.Tensor:
        """The one scale (e.g. N/B from subsampling) shared by every scored site."""
        scales = {
            float(s["scale"]) if not isinstance(s["scale"], torch.Tensor) else s["scale"].item()
            for t in (self.guide_trace, self.model_trace)
            for s in sample_sites(t)
        }
        if len(scales) > 1:
            raise PairError(
                f"sites carry different scales {sorted(scales)}; a per-datapoint bound needs "
                "one scale for the whole model and guide"
            )
        return scales.pop() if scales else 1.0


def trace_guide(guide: Callable, args, kwargs, layout: Layout, *, values=None):
    """Trace the guide under the particle plate; its sites replayed from ``values`` when given."""
    guided = guide if values is None else _replayed(guide, values)
    with _particles(layout):
        trace = _get_trace(guided, args, kwargs, layout)
    if layout.plate_dim is None:
        layout.find_plate(trace)
    return trace


def trace_model(model: Callable, args, kwargs, layout: Layout, *, values, free=()):
    """Trace the model under the particle plate with its sites replayed from ``values``.

    ``values`` (see :func:`replay_values`) holds the latent values and the
    plates' subsample indices. Sites named in ``free`` are sampled from the
    model instead (for example auxiliary sites drawn from a reverse model).
    With ``layout.enumerate`` the model's sites marked for parallel
    enumeration (``config_enumerate``) that the guide does not sample are
    enumerated, as ``TraceEnum_ELBO`` does, to the left of the particle plate
    (:func:`enumerated_log_density` sums them out). Any other latent site
    missing from ``values`` is an error (:class:`Enumerated` where it is
    marked for enumeration: the caller may trace again with it enumerated).
    """
    fn = _replayed(model, values)
    if layout.enumerate:
        fn = poutine.enum(fn, first_available_dim=-layout.rank - 1)
    with _particles(layout), _StopAtEnumerated(values, free, active=not layout.enumerate):
        trace = _get_trace(fn, args, kwargs, layout)
    if layout.plate_dim is None:
        layout.find_plate(trace)
    for site in sample_sites(trace):
        if site["is_observed"] or site["name"] in values or site["name"] in free:
            continue
        if site["infer"].get("_enumerate_dim") is not None:
            continue
        raise PairError(_unsampled(site, site["infer"].get("enumerate")))
    return trace


class Enumerated(PairError):
    """A model site marked for parallel enumeration that the guide does not sample."""


class _StopAtEnumerated(Messenger):
    """Raise :class:`Enumerated` at a site to enumerate, before it draws a value.

    So that finding out costs no random numbers: the draws that follow are
    those of a run that knew, compiled or not.
    """

    def __init__(self, values, free, *, active: bool) -> None:
        super().__init__()
        self.values, self.free, self.active = values, free, active

    def _pyro_sample(self, msg: dict) -> None:
        if (
            self.active
            and not msg["done"]
            and is_enumerated(msg, self.values)
            and msg["name"] not in self.free
        ):
            what = f"model site {msg['name']!r} is enumerated (config_enumerate)"
            raise Enumerated(
                f"{what} and this estimator does not sum enumerated sites out; sample it in the "
                "guide, or use the ELBO and IWAE bounds or AIS, which sum it out exactly",
                command=f"{what}, and this command does not sum enumerated sites out yet; "
                "elbolab evaluate does (ELBO, IWAE-k, --ais)",
            )


def _unsampled(site: dict, how) -> str:
    name = site["name"]
    if how is not None:
        return (
            f"model site {name!r} is marked for {how!r} enumeration: elbolab sums out sites "
            "marked for parallel enumeration only (config_enumerate's default); mark it "
            "'parallel', or sample it in the guide"
        )
    return (
        f"model site {name!r} is latent but the guide does not sample it; every latent of the "
        "model needs a draw from the guide, an enumeration (config_enumerate, discrete sites) "
        "or a condition (poutine.condition)"
    )


def enumerated_log_density(trace, layout: Layout, *, only=None) -> torch.Tensor:
    """log p of an enumerated model trace, the enumerated sites summed out, as ``layout.shape``.

    Each site's log density is packed with the symbols Pyro gives its plates
    and enumeration dims, and Pyro's tensor message passing
    (:func:`pyro.ops.contract.contract_to_tensor`, the contraction
    ``TraceEnum_ELBO`` uses) sums out every enumerated dim with the plates
    nested right: a site inside a plate is multiplied out over it before an
    enumerated variable outside it is summed. The particle plate and the data
    plate are kept. Plate scales apply to a per-datapoint result, never inside
    the sum (joint weights of a subsampled plate are refused). ``only`` (names)
    restricts the product to those sites and the enumerated ones: their
    marginal, the other sites left out.
    """
    from pyro.ops import packed
    from pyro.ops.contract import contract_to_tensor

    trace.symbolize_dims()
    tree: dict = {}
    sum_dims = set()
    for site in sample_sites(trace):
        enumerated = site["infer"].get("_enumerate_dim") is not None
        if only is not None and site["name"] not in only and not enumerated:
            continue
        if layout.plate is not None and not any(
            f.name == layout.plate for f in site["cond_indep_stack"]
        ):
            layout.reduce(site, site["fn"].log_prob(site["value"]))  # raises, naming the site
        if layout.scaled and float(site["scale"]) != 1.0:
            raise PairError(
                f"site {site['name']!r} carries scale {float(site['scale']):g} (subsampling) in "
                "a model with enumerated sites: with plate=None the scale would enter the sum "
                "over them; use the full data, or per-datapoint weights (plate='data')"
            )
        log_prob = masked(site, site["fn"].log_prob(site["value"]))
        dims = site["infer"]["_dim_to_symbol"]
        ordinal = frozenset(
            trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )
        tree.setdefault(ordinal, []).append(packed.pack(log_prob, dims))
        if enumerated:
            sum_dims.add(site["infer"]["_enumerate_symbol"])
    keep = {PARTICLE_PLATE, layout.plate} & set(trace.plate_to_symbol)
    present = set().union(*(t._pyro_dims for terms in tree.values() for t in terms))
    # a kept plate no term varies along (nothing depends on the particles) is broadcast below
    target = frozenset(trace.plate_to_symbol[name] for name in keep) & present
    result = contract_to_tensor(OrderedDict(tree), sum_dims, target_ordinal=target)
    result = packed.unpack(result, trace.symbol_to_dim)
    result = result.reshape((1,) * (layout.rank - result.dim()) + result.shape)
    if layout.plate_dim is None:
        return result.reshape(result.shape[0], -1).sum(1).expand(layout.shape)
    if layout.plate_size is None:
        layout.plate_size = result.shape[layout.rank + layout.plate_dim]
    return result.reshape(result.shape[0], -1).expand(layout.shape)


def model_log_density(trace, layout: Layout, *, only=None) -> torch.Tensor:
    """log p of a model trace (of the sites ``only``), any enumerated sites summed out."""
    if layout.enumerate:
        return enumerated_log_density(trace, layout, only=only)
    return log_density(trace, layout, only=only)


class NotBroadcastable(PairError):
    """The pair failed under the particle plate, having run without it (the dry run)."""

    detail = ""  # where it failed and how, for the warning of the one-at-a-time path


def _get_trace(fn: Callable, args, kwargs, layout: Layout):
    """``fn``'s trace; a failure of the user's code under the particle plate is named as such.

    Every estimator runs the pair once without particles first (its dry
    run), so code that fails only with them does not broadcast over a
    leading dimension, as code written for one sample (``torch.cat([xs, ys],
    dim=1)``, ``z.view(x.shape)``) does not.
    """
    traced = poutine.trace(fn)
    try:
        return traced.get_trace(*args, **kwargs)
    except PairError as err:
        # Pyro's trace re-raises an error with the trace's shapes appended: ours as it was
        original = err.__cause__ if isinstance(err.__cause__, PairError) else err
        raise original from None
    except Exception as err:
        if not layout.vectorised:
            raise
        first = (str(err).splitlines() or [""])[0][:200]
        sampled = [n for n, s in traced.msngr.trace.nodes.items() if s["type"] == "sample"]
        where = f"after site {sampled[-1]!r}" if sampled else "before its first site"
        detail = f"it fails {where}: {type(err).__name__}: {first}"
        refusal = NotBroadcastable(
            f"the model/guide pair does not broadcast over a leading particle dimension "
            f"({detail}), and this estimator draws its particles or chains in one vectorised "
            "pass; write the networks to broadcast over leading dims (e.g. torch.cat(..., "
            "dim=-1), z.reshape(*z.shape[:-1], ...)); the ELBO and IWAE bounds and objectives "
            "evaluate such a pair one particle at a time"
        )
        refusal.detail = detail
        raise refusal from err


def _particles(layout: Layout):
    if not layout.vectorised:
        return contextlib.nullcontext()
    return pyro.plate(PARTICLE_PLATE, layout.num_particles, dim=-layout.rank)


def log_density(trace, layout: Layout, *, only=None, exclude=()) -> torch.Tensor:
    """Sum of the sample sites' log densities, reduced to ``layout.shape``.

    ``only`` (names) restricts the sum to those sites; ``exclude`` leaves some out.
    """
    terms = [
        site_log_density(s, layout)
        for s in sample_sites(trace)
        if (only is None or s["name"] in only) and s["name"] not in exclude
    ]
    return sum(terms[1:], terms[0]) if terms else torch.zeros(layout.shape)


_SCORED = "elbolab_log_density"  # a site's key for its reduced log density, with the layout


def site_log_density(site: dict, layout: Layout) -> torch.Tensor:
    """A sample site's log density reduced to ``layout.shape``, computed once per trace and layout.

    The value is kept in the site, so that what scores a trace again (the
    ELBO decomposition after the weights) does not evaluate the
    distribution a second time.
    """
    kept = site.get(_SCORED)
    if kept is not None and kept[0] is layout and kept[1] is site["value"]:
        return kept[2]
    value = layout.reduce(site, site["fn"].log_prob(site["value"]))
    site[_SCORED] = (layout, site["value"], value)
    return value


def weighted_sample(
    model: Callable,
    guide: Callable,
    args,
    kwargs,
    layout: Layout,
    *,
    values: dict[str, torch.Tensor] | None = None,
    draw: Messenger | None = None,
) -> WeightedSample:
    """Draw K particles from the guide in one vectorised pass and score them under the model.

    With ``values`` (latents and subsample indices), the guide's sites are
    replayed from them instead of sampled. ``draw``, a messenger entered
    around the guide's particle plate, may draw the latents itself.

    A pair that cannot run with an extra leading particle dimension (a
    network written for one sample: ``torch.cat([xs, ys], dim=1)`` where
    ``ys`` carries particles) is evaluated one particle at a time, as Pyro's
    ``Trace_ELBO`` does without ``vectorize_particles``: ``layout.vectorised``
    is then False (for the caller's later calls) and a warning says so.
    The weights are those of the same draws; the traces kept are the last
    particle's.
    """
    if not layout.vectorised:
        return _looped_sample(model, guide, args, kwargs, layout, values=values, draw=draw)
    try:
        return _one_pass(model, guide, args, kwargs, layout, values=values, draw=draw)
    except NotBroadcastable as err:
        detail = err.detail
    layout.vectorised = False
    try:
        sample = _looped_sample(model, guide, args, kwargs, layout, values=values, draw=draw)
    except Exception:
        layout.vectorised = True
        raise
    warnings.warn(
        f"the model/guide pair does not broadcast over a leading particle dimension ({detail}): "
        "its particles are evaluated one at a time (slower, the same estimates)",
        RuntimeWarning,
        stacklevel=2,
    )
    return sample


def _one_pass(model, guide, args, kwargs, layout: Layout, *, values=None, draw=None):
    with draw or contextlib.nullcontext():
        guide_trace = trace_guide(guide, args, kwargs, layout, values=values)
    check_guide_density(guide_trace, guide, args, kwargs)
    replay = replay_values(guide_trace)
    if not layout.enumerate:
        try:
            model_trace = trace_model(model, args, kwargs, layout, values=replay)
        except Enumerated:
            layout.enumerate = True  # and for the caller's later calls
    if layout.enumerate:
        model_trace = trace_model(model, args, kwargs, layout, values=replay)
    return WeightedSample(
        model_log_density(model_trace, layout),
        log_density(guide_trace, layout),
        layout,
        guide_trace,
        model_trace,
    )


def _looped_sample(model, guide, args, kwargs, layout: Layout, *, values=None, draw=None):
    """K passes of one particle each, without the particle plate; (K, N) log densities."""
    log_p, log_q, traces, model_traces, sample = [], [], [], [], None
    for _ in range(layout.num_particles):
        single = Layout(1, layout.max_plate_nesting, layout.plate, vectorised=False,
                        scaled=layout.scaled, enumerate=layout.enumerate)  # fmt: skip
        sample = _one_pass(model, guide, args, kwargs, single, values=values, draw=draw)
        layout.enumerate = single.enumerate
        replayed = set(values or ()) & set(latent_values(sample.guide_trace))
        if replayed:
            raise PairError(
                f"guide site {sorted(replayed)[0]!r}: the pair does not broadcast over a leading "
                "particle dimension, and this estimator replays vectorised draws into it; "
                "write the networks to broadcast over leading dims (e.g. torch.cat(..., dim=-1))"
            )
        log_p.append(sample.log_p)
        log_q.append(sample.log_q)
        traces.append(sample.guide_trace)
        model_traces.append(sample.model_trace)
        values = {**subsample_values(sample.guide_trace), **(values or {})}  # one minibatch
    layout.plate_dim, layout.plate_size = sample.layout.plate_dim, sample.layout.plate_size
    return WeightedSample(torch.cat(log_p), torch.cat(log_q), layout, sample.guide_trace,
                          sample.model_trace, traces, model_traces)  # fmt: skip


def log_importance_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int,
    chunk_size: int | None = None,
    plate: str | None = "data",
    max_plate_nesting: int | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""Log importance weights ``log p(x, z_k) - log q(z_k | x)`` for any model/guide pair.

    Particles are vectorised with an outer plate to the left of every plate
    of the model and guide, and drawn in chunks of ``chunk_size`` so that
    memory stays bounded for large K. Gradients are not tracked.

    Parameters
    ----------
    model, guide : callable
        A Pyro model and guide taking ``*args, **kwargs``. Every latent site of
        the model must be sampled by the guide.
    *args, **kwargs
        Passed to both.
    num_particles : int
        K, the number of draws from the guide.
    chunk_size : int, optional
        Particles per vectorised pass (default: all K at once).
    plate : str or None
        Name of the data plate. Log densities are summed over every other
        batch dimension.
    max_plate_nesting : int, optional
        The model's and guide's vectorised plates, when the caller knows it
        (:func:`guess_max_plate_nesting`): with all K particles in one pass
        the dry run that finds it is skipped (it costs a pass of its own,
        which at K = 1 doubles the work). The draws are the same, so are the
        weights (to float rounding where a replayed subsample is indexed).

    Returns
    -------
    torch.Tensor
        Shape (K, N) when the model's sites lie in a plate named ``plate``
        (N = its subsample size), shape (K,) when there is no such plate.
        Plate scales are not applied. Impossible draws give ``-inf``, never NaN.

    References
    ----------
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders, ICLR.

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
    >>> from inference import log_importance_weights
    >>> log_w = log_importance_weights(model, guide, x, num_particles=1000)
    >>> log_w.shape                                   # (K, N): particles, datapoints
    torch.Size([1000, 3])
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    chunk_size = num_particles if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with torch.no_grad():
        if max_plate_nesting is not None and chunk_size >= num_particles:
            # One pass: the guide draws the minibatch the dry run would have replayed.
            nesting, minibatch = max_plate_nesting, None
        else:
            nesting, minibatch = dry_run(model, guide, args, kwargs)
        chunks, found = [], {}
        for start in range(0, num_particles, chunk_size):
            size = min(chunk_size, num_particles - start)
            layout = Layout(size, nesting, plate, **found)
            sample = weighted_sample(model, guide, args, kwargs, layout, values=minibatch)
            if plate is None:
                refuse_joint_log_mean(sample.guide_trace, sample.model_trace, "log weights")
            found = layout.found
            assert sample.log_w.shape[0] == size
            chunks.append(sample.log_w)
    return torch.cat(chunks, 0)


def elbo_decomposition(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 100,
    plate: str | None = "data",
    max_plate_nesting: int | None = None,
    **kwargs,
) -> dict[str, torch.Tensor]:
    r"""Split the ELBO into reconstruction and KL terms, per datapoint.

    ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z)), with KL = CE - H where
    H = -E_q[log q] is the guide's entropy and CE = -E_q[log p(z)] the cross
    entropy. KL and H are analytic where torch knows them for a site's pair
    of distributions, Monte Carlo over ``num_particles`` draws otherwise.

    Returns
    -------
    dict
        ``reconstruction``, ``kl``, ``entropy``, ``cross_entropy``, ``elbo``,
        each (N,) (or scalar without a data plate), and ``kl_analytic`` (bool).

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
    >>> from inference import elbo_decomposition
    >>> parts = elbo_decomposition(model, guide, x, num_particles=100)
    >>> sorted(parts)[:4]
    ['cross_entropy', 'elbo', 'entropy', 'kl']
    """
    with torch.no_grad():
        nesting = max_plate_nesting
        if nesting is None:
            nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        layout = Layout(num_particles, nesting, plate)
        sample = weighted_sample(model, guide, args, kwargs, layout)
        if sample.guide_traces is None:
            parts = [_decompose(sample.guide_trace, sample.model_trace, layout)]
        else:  # evaluated one particle at a time: each particle's traces
            single = dataclasses.replace(layout, num_particles=1)
            pairs = zip(sample.guide_traces, sample.model_traces, strict=True)
            parts = [_decompose(g, m, single) for g, m in pairs]
        recon, kl, entropy = (torch.cat([p[i] for p in parts]).mean(0) for i in range(3))
        analytic = all(p[3] for p in parts)
    return {
        "reconstruction": recon,
        "kl": kl,
        "entropy": entropy,
        "cross_entropy": kl + entropy,
        "elbo": recon - kl,
        "kl_analytic": analytic,
    }


def _decompose(guide_trace, model_trace, layout: Layout) -> tuple:
    """Per-particle reconstruction, KL and entropy terms, (K, N) each, and whether KL is analytic.

    With enumerated sites the prior of the guide's latents is their marginal,
    sum_c p(c) p(z | c) (the enumerated sites summed out of the latent sites
    alone), and log p(x | z) = log p(x, z) - log p(z); the KL is then Monte Carlo.
    """
    guide_sites = {s["name"]: s for s in sample_sites(guide_trace)}
    zeros = torch.zeros(layout.shape)
    log_q = log_density(guide_trace, layout)
    # Latents carried by auxiliary draws (autoguides): log q(z) = log q(u) + the Deltas'
    # log |du/dz|, and no per-site analytic KL or entropy means anything.
    transforms = any(is_auxiliary(s) or is_point_mass(s["fn"]) for s in guide_sites.values())
    entropy = -log_q if transforms else zeros
    for q_site in () if transforms else guide_sites.values():
        try:
            entropy = entropy + layout.reduce(q_site, q_site["fn"].entropy())
        except NotImplementedError:
            entropy = entropy - site_log_density(q_site, layout)
    if transforms or layout.enumerate:  # Monte Carlo, against the latents' (marginal) prior
        prior = model_log_density(model_trace, layout, only=set(guide_sites))
        return model_log_density(model_trace, layout) - prior, log_q - prior, entropy, False
    # Conditioned latent sites are marked observed in the model trace: tell them by name.
    recon = kl = zeros
    analytic = True
    for site in sample_sites(model_trace):
        log_p = site_log_density(site, layout)
        if site["name"] not in guide_sites:
            recon = recon + log_p
            continue
        q_site = guide_sites[site["name"]]
        try:
            kl = kl + layout.reduce(q_site, kl_divergence(q_site["fn"], site["fn"]))
        except NotImplementedError:
            analytic = False
            kl = kl + site_log_density(q_site, layout) - log_p
    return recon, kl, entropy, analytic
