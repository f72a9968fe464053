r"""What a model/guide pair is made of, judged once, and what elbolab can estimate from it.

Every estimator and objective first runs the guide and the replayed model
once without particles (:func:`inference.tracing.dry_traces`). The sites of
those traces say what can be computed:

- a guide site is a **density** (log q is a log density), an **auxiliary**
  draw (``infer={"is_auxiliary": True}``, as Pyro's autoguides draw their
  unconstrained variables), a **transform** of auxiliary draws (a ``Delta``
  whose value is computed from them and whose ``log_density`` carries the
  Jacobian: the guide still has a density) or a **point mass** (a ``Delta``
  that stands alone, as :class:`~pyro.infer.autoguide.AutoDelta` draws: no
  density, so no importance weight and no bound);
- a guide site is **reparameterised** or not, judged on the distribution
  actually sampled, through every wrapper (``Independent``, ``Masked``,
  ``Expanded``, ``OneHotCategorical``'s inner ``Categorical``);
- under **subsampling** (a plate scale N/B), a per-datapoint bound times the
  scale is unbiased for the full data, and so is the joint ELBO with each
  site's scale; a log-mean of joint weights (IWAE, AIS) of a minibatch is
  not (the log of a mean does not commute with the minibatch average), so
  it is refused unless the full data are used.

Every refusal is a :class:`PairError` that names the site and says what to do.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from pyro.infer.inspect import get_model_relations
from torch.distributions import Distribution


class PairError(ValueError):
    """A model/guide pair (or a use of it) from which elbolab cannot give a right number.

    ``command`` is the advice for a user of the ``elbolab`` command where it
    differs from the library's (which names Python arguments).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro.infer.autoguide import AutoDelta
    >>> from inference import PairError, log_importance_weights
    >>> def model(x):
    ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    >>> try:
    ...     log_importance_weights(model, AutoDelta(model), torch.zeros(3), num_particles=2,
    ...                            plate=None)
    ... except PairError as err:
    ...     print("refused")
    refused
    """

    def __init__(self, message: str, *, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command

    def for_command(self) -> str:
        return self.command or str(self)


def inner_distributions(fn: Distribution) -> Iterable[Distribution]:
    """``fn`` and every distribution it wraps (base_dist, OneHotCategorical's Categorical, ...)."""
    seen, stack = set(), [fn]
    while stack:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        yield d
        stack.extend(v for v in vars(d).values() if isinstance(v, Distribution))


def base_distribution(fn: Distribution) -> Distribution:
    """The distribution that ``Independent``, ``Masked``, ``Expanded``... wrap, innermost."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def is_point_mass(fn: Distribution) -> bool:
    return isinstance(base_distribution(fn), dist.Delta)


def has_trainable_inputs(fn: Distribution) -> bool:
    """Whether any tensor the distribution (or one it wraps) holds requires a gradient."""
    return any(
        isinstance(v, torch.Tensor) and v.requires_grad
        for d in inner_distributions(fn)
        for v in vars(d).values()
    )


def is_reparameterised(site: dict) -> bool:
    """Whether the draw at a guide site moves with the parameters along a differentiable path.

    A distribution without ``rsample`` whose inputs need no gradient (a
    fixed corruption of the data) needs no score-function term: its
    sampling distribution does not move with the parameters.
    """
    fn = site["fn"]
    return bool(fn.has_rsample) or not has_trainable_inputs(fn)


def non_reparameterised_sites(guide_trace) -> list[str]:
    from .tracing import sample_sites

    return [s["name"] for s in sample_sites(guide_trace) if not is_reparameterised(s)]


def is_auxiliary(site: dict) -> bool:
    return bool(site["infer"].get("is_auxiliary"))


def is_enumerated(site: dict, sampled) -> bool:
    """A model site to sum out: marked for parallel enumeration, not among ``sampled``."""
    return (
        not site["is_observed"]
        and site["infer"].get("enumerate") == "parallel"
        and site["name"] not in sampled
    )


_TRANSFORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _transforms(guide: Callable, args, kwargs, auxiliary: set[str]) -> dict[str, bool]:
    """For each point-mass site of ``guide``, whether its value is computed from an auxiliary draw.

    Pyro's provenance tracking (:func:`pyro.infer.inspect.get_model_relations`)
    follows every tensor operation from the draws to each site's density.
    Kept per guide object: its structure does not change between calls.
    """
    try:
        kept = _TRANSFORMS.get(guide)
    except TypeError:  # not weakly referable (a bound method is remade each time: its function is)
        kept = None
    if kept is not None:
        return kept
    relations = get_model_relations(guide, tuple(args), dict(kwargs))
    result = {
        name: any(up in auxiliary for up in relations["sample_sample"].get(name, ()))
        for name, kind in relations["sample_dist"].items()
        if kind == "Delta"
    }
    try:
        _TRANSFORMS[guide] = result
    except TypeError:
        pass
    return result


def check_guide_density(guide_trace, guide: Callable | None = None, args=(), kwargs=None) -> None:
    """Refuse a guide with a point mass among its draws, so that no bound is claimed from it.

    A ``Delta`` site (Pyro's ``AutoDelta``, a MAP guide, alone or beside a
    density in an ``AutoGuideList``) puts all its mass on one point: log q is
    not a log density and log p(x, z*) - log q is no importance weight. A
    ``Delta`` whose value is computed from auxiliary draws (Pyro's
    ``AutoNormal`` and ``AutoContinuous`` guides) is a change of variables:
    its ``log_density`` carries the Jacobian and the guide has a density.
    Where a guide has both, which point masses are transforms is found by
    tracking provenance (``guide`` is then needed).
    """
    from .tracing import sample_sites

    sites = list(sample_sites(guide_trace))
    masses = [s for s in sites if is_point_mass(s["fn"]) and not is_auxiliary(s)]
    if not masses:
        return
    transformed = {}
    auxiliary = {s["name"] for s in sites if is_auxiliary(s)}
    if guide is not None and auxiliary:
        transformed = _transforms(guide, args, kwargs or {}, auxiliary)
    for site in masses:
        if not transformed.get(site["name"], False):
            raise PairError(
                f"guide site {site['name']!r} is a point mass (Delta, as AutoDelta draws): it "
                "has no density, so log p(x, z) - log q(z | x) is no importance weight and gives "
                "no bound on log p(x); give it a density (e.g. AutoNormal for that site), or "
                "fix it in the model (poutine.condition) and evaluate the rest"
            )


def scaled_sites(*traces) -> dict[str, float]:
    """Sites whose log density carries a scale other than 1 (a subsampled plate's N/B), by name."""
    from .tracing import sample_sites

    out = {}
    for trace in traces:
        for site in sample_sites(trace):
            scale = site["scale"]
            scale = float(scale) if not isinstance(scale, torch.Tensor) else float(scale.max())
            if scale != 1.0:
                out[site["name"]] = scale
    return out


def subsampled_plates(*traces) -> dict[str, tuple[int, int]]:
    """Plates that draw a minibatch: name -> (subsample size, full size)."""
    out = {}
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            for frame in site["cond_indep_stack"]:
                full = getattr(frame, "full_size", None)
                if full is not None and full > 0 and 0 < frame.size < full:
                    out[frame.name] = (frame.size, full)
    return out


def refuse_joint_log_mean(guide_trace, model_trace, what: str) -> None:
    """Refuse ``what`` (a log-mean of joint weights) where a site's log density is scaled.

    With ``plate=None`` the weights are joint over every datapoint the model
    scores. Under subsampling those are a minibatch's: IWAE and AIS of one
    minibatch bound log p(minibatch), and their plate-scaled average is no
    bound on log p(D).
    """
    scaled = scaled_sites(guide_trace, model_trace)
    if not scaled:
        return
    name, scale = next(iter(scaled.items()))
    plates = subsampled_plates(guide_trace, model_trace)
    why = (
        "plate {!r} subsamples {} of {} datapoints".format(p, *plates[p])
        if (p := next(iter(plates), None)) is not None
        else "poutine.scale"
    )
    raise PairError(
        f"site {name!r} carries scale {scale:g} ({why}): with plate=None the {what} are joint "
        "over one minibatch, and neither their log-mean (IWAE, AIS) nor their unscaled mean is "
        "a bound on log p(D); evaluate on the full data (no subsample_size), or train with the "
        "'elbo' objective and plate=None, whose plate-scaled estimate is unbiased for the "
        "full-data ELBO"
    )


def check_per_datapoint(model: Callable, guide: Callable, x, *, plate: str = "data") -> None:
    """Refuse, for the ``elbolab`` command, a pair with a site outside the data plate.

    The command measures per-datapoint bounds over minibatches: every site
    must lie in ``pyro.plate(plate, ...)``, as Pyro's examples write a VAE.
    A model without that plate (its batch in the sample shapes, a global
    latent) would give joint weights over a minibatch, which are no
    per-datapoint numbers.
    """
    from .tracing import dry_traces, sample_sites

    traces = dry_traces(model, guide, (x,), {})
    for trace in traces:
        for site in sample_sites(trace):
            if not any(f.name == plate for f in site["cond_indep_stack"]):
                where = [f.name for f in site["cond_indep_stack"] if f.vectorized]
                place = f"plate {where[0]!r}" if where else "no plate"
                raise PairError(
                    f"site {site['name']!r} lies in {place}, not in pyro.plate({plate!r}): the "
                    "elbolab command measures per-datapoint bounds over minibatches, so every "
                    f"site of the model and guide must lie in pyro.plate({plate!r}, x.shape[0]) "
                    "(a global latent's evidence is joint over the data set: use the Python "
                    "API with plate=None on the full data)"
                )


@dataclass(frozen=True)
class SiteReport:
    """One sample site of a pair, as the estimators see it."""

    name: str
    side: str  # "guide" or "model"
    role: str  # density, auxiliary, transform, point mass, observed, enumerated, latent
    reparameterised: bool | None  # guide sites only
    support: str
    plates: tuple[str, ...]  # "name[size]", "name[B of N]", "name[inferred]", "name(sequential)"
    in_data_plate: bool


def inspect_pair(model: Callable, guide: Callable, *args, plate: str | None = "data", **kwargs):
    """Every sample site of the model and guide: its role, reparameterisation, support and plates.

    The same judgements the estimators make at their dry run, as a table to
    read before trusting a number: which guide sites are densities, point
    masses, auxiliary draws or transforms of them; which draws carry no path
    gradient (they get score-function terms); which model sites the guide
    samples, which are enumerated and which are observed; which lie outside
    ``plate`` (global: per-datapoint weights do not exist for them).

    Returns
    -------
    list of SiteReport
        Guide sites first, then the model's, in the order they were sampled.

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
    >>> from inference import inspect_pair
    >>> [(r.name, r.role) for r in inspect_pair(model, guide, x)][:2]
    [('z', ...), ...]
    """
    from .tracing import dry_traces, sample_sites

    guide_trace, model_trace = dry_traces(model, guide, args, kwargs)
    guide_sites = {s["name"]: s for s in sample_sites(guide_trace)}
    auxiliary = {n for n, s in guide_sites.items() if is_auxiliary(s)}
    transformed = _transforms(guide, args, kwargs, auxiliary) if auxiliary else {}
    reports = []
    for side, trace in (("guide", guide_trace), ("model", model_trace)):
        for site in sample_sites(trace):
            name, fn = site["name"], site["fn"]
            if side == "guide":
                if is_auxiliary(site):
                    role = "auxiliary"
                elif is_point_mass(fn):
                    role = "transform" if transformed.get(name) else "point mass"
                else:
                    role = "density"
                reparameterised = is_reparameterised(site)
            else:
                reparameterised = None
                if site["is_observed"] and name not in guide_sites:
                    role = "observed"
                elif name in guide_sites:
                    role = "latent"
                elif is_enumerated(site, guide_sites):
                    role = "enumerated"
                else:
                    role = "not sampled by the guide"
            reports.append(SiteReport(
                name, side, role, reparameterised, str(_support(fn)),
                tuple(_describe_frame(f) for f in site["cond_indep_stack"]),
                plate is not None and any(f.name == plate for f in site["cond_indep_stack"]),
            ))  # fmt: skip
    return reports


def _support(fn: Distribution):
    support = fn.support
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return support


def _describe_frame(frame) -> str:
    if not frame.vectorized or frame.dim is None:
        return f"{frame.name}(sequential)"
    full = getattr(frame, "full_size", None)
    if frame.size is None or frame.size < 0:
        return f"{frame.name}[inferred]"
    if full is not None and 0 < frame.size < full:
        return f"{frame.name}[{frame.size} of {full}]"
    return f"{frame.name}[{frame.size}]"


def format_inspection(reports: list[SiteReport]) -> str:
    """The inspection as a table, one site a row."""
    rows = [("side", "site", "role", "reparam.", "support", "plates")]
    for r in reports:
        rep = "" if r.reparameterised is None else ("yes" if r.reparameterised else "NO")
        rows.append((r.side, r.name, r.role, rep, r.support, ", ".join(r.plates) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


__all__ = [
    "PairError",
    "SiteReport",
    "format_inspection",
    "inspect_pair",
    "base_distribution",
    "check_per_datapoint",
    "check_guide_density",
    "has_trainable_inputs",
    "inner_distributions",
    "is_auxiliary",
    "is_enumerated",
    "is_point_mass",
    "is_reparameterised",
    "non_reparameterised_sites",
    "refuse_joint_log_mean",
    "scaled_sites",
    "subsampled_plates",
]
