r"""Annealed importance sampling with HMC transitions, and the BDMC sandwich, for any Pyro pair.

AIS (Neal 2001) anneals from the guide q(z | x) (or the prior) to the
posterior through

    f_beta(z) = q(z | x)^(1 - beta) p(x, z)^beta,    0 = beta_0 < ... < beta_T = 1,

with z_0 ~ q and, at each temperature, the weight update
log w += (beta_t - beta_{t-1}) [log p(x, z) - log q(z | x)] followed by an HMC
transition that leaves f_{beta_t} invariant. E[w] = p(x) for each chain, so
log of the mean over chains is a stochastic *lower* bound on log p(x)
(Jensen), tight as the path gets fine. With one temperature it is importance
sampling with the guide. The latents must be continuous; a latent whose
support is not the real line is moved as u = T^-1(z), T = biject_to(support),
the log-Jacobian added to target and start alike (as Pyro's HMC does), so the
weights are unchanged. Discrete sites the model marks for enumeration
(``config_enumerate``) are summed out of the target exactly, as Pyro's HMC
does. For an encoder with auxiliary layers the state is
every guide latent and the target the extended p(x, z) r(h | z, x), whose
marginal is the same p(x).

BDMC (Grosse, Ghahramani & Adams 2015): on data simulated from the model,
(z, x) ~ p, z is an exact posterior sample, so AIS run backwards from it
(beta from 1 to 0) has weights with mean 1 / p(x): minus its log is a
stochastic *upper* bound. The gap between the two bounds the error of both;
its shrinking with more temperatures is the evidence that AIS has converged
for the model (Wu, Burda, Salakhutdinov & Grosse 2017).

The step size of the leapfrog integrator is adapted per datapoint during
the run (times 1.02 when the chains' mean acceptance rate exceeds the target,
else times 0.98), as Wu et al. (2017) do.

The adaptive schedule (``schedule="adaptive"``) places the temperatures in
a pilot run, each step the largest that keeps the conditional ESS of the
weights (Zhou, Johansen & Aston 2016) at a target for every datapoint, and
learns a step size for each temperature there (shrinking as fast as the
posterior narrows); the estimate then comes from fresh chains along those
temperatures and step sizes, fixed in advance, so that E[w] = p(x) holds
exactly. BDMC's reverse run goes back along the same temperatures.

A model that does not broadcast over a leading chain dimension (``X @ w``
with a batched w; Pyro's NUTS runs one chain and never needs it) is
evaluated one chain at a time, with a warning: the same algorithm, slower.

References
----------
Neal (2001), Annealed importance sampling, Statistics and Computing.
Grosse, Ghahramani & Adams (2015), Sandwiching the marginal likelihood using
bidirectional Monte Carlo, arXiv:1511.02543.
Wu, Burda, Salakhutdinov & Grosse (2017), On the quantitative analysis of
decoder-based generative models, ICLR.
Zhou, Johansen & Aston (2016), Toward automatic model comparison: an adaptive
sequential Monte Carlo approach, Journal of Computational and Graphical Statistics.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from torch.distributions import biject_to, constraints
from tqdm.auto import tqdm

from . import distributed
from .bounds import Bound, iwae_bound, log_mean_weight_stderr, logsumexp
from .distributed import World
from .inspection import (
    PairError,
    check_guide_density,
    is_enumerated,
    is_point_mass,
    refuse_joint_log_mean,
)
from .tracing import (
    Layout,
    NotBroadcastable,
    dry_traces,
    log_density,
    model_log_density,
    plate_nesting,
    replay_values,
    sample_sites,
    subsample_values,
    trace_guide,
    trace_model,
)

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["annealed_log_marginal", "ais_over_data", "bdmc", "bdmc_joint", "AISEstimate"]

SCHEDULES = ("sigmoid", "linear", "adaptive")
INITIALS = ("guide", "prior")
TARGET_CESS = 0.999  # the adaptive schedule's conditional ESS per temperature step
MAX_TEMPERATURES = 10_000  # the adaptive schedule's default cap
MIN_ACCEPTANCE = 0.05  # below it, AIS warns that its chains did not move
COMPILE_MIN_EVALUATIONS = 5000  # temperatures x leapfrog steps (see worth_compiling)


def temperature_schedule(
    num_temperatures: int, schedule: str = "sigmoid", *, delta: float = 4.0
) -> torch.Tensor:
    """``num_temperatures + 1`` inverse temperatures from 0 to 1 (float64), increasing.

    ``sigmoid`` (Grosse, Maddison & Salakhutdinov 2013): sigma(delta (2t/T - 1)),
    rescaled to [0, 1], denser at both ends; ``linear``: evenly spaced. The
    ``adaptive`` schedule is placed during a run (:func:`adaptive_schedule`).
    """
    if schedule == "adaptive":
        raise ValueError("the adaptive schedule is placed by a run: see adaptive_schedule")
    if schedule not in SCHEDULES:
        raise ValueError(f"AIS schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if num_temperatures < 1:
        raise ValueError(f"num_temperatures must be >= 1, got {num_temperatures}")
    t = torch.linspace(0.0, 1.0, num_temperatures + 1, dtype=torch.float64)
    if schedule == "linear" or num_temperatures == 1:
        return t
    s = torch.sigmoid(delta * (2 * t - 1))
    return (s - s[0]) / (s[-1] - s[0])


def conditional_ess(log_w: torch.Tensor, log_ratio: torch.Tensor, delta: float) -> torch.Tensor:
    r"""Conditional ESS fraction of the weight update by ``delta`` (Zhou, Johansen & Aston 2016).

    With normalised weights W_i (from ``log_w``, chains first) and increments
    v_i = exp(delta r_i): (sum_i W_i v_i)^2 / sum_i W_i v_i^2, in (0, 1],
    per datapoint (the dims after the first).
    """
    log_W = log_w - logsumexp(log_w, 0)
    step = delta * log_ratio
    return (2 * logsumexp(log_W + step, 0) - logsumexp(log_W + 2 * step, 0)).exp()


def next_temperature(beta: float, log_w: torch.Tensor, log_ratio: torch.Tensor,
                     target: float = TARGET_CESS) -> float:  # fmt: skip
    """The largest beta' in (beta, 1] whose update keeps each datapoint's conditional ESS >= target.

    Found by bisection; the same beta' for every datapoint (the one the
    hardest of them allows), so the chains stay vectorised.
    """
    log_w, log_ratio = log_w.double(), log_ratio.double()
    log_ratio = torch.where(torch.isfinite(log_ratio), log_ratio, torch.full_like(log_ratio, -1e30))

    def worst(delta: float) -> float:
        return float(conditional_ess(log_w, log_ratio, delta).min())

    room = 1.0 - beta
    if worst(room) >= target:
        return 1.0
    lo, hi = 0.0, room
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if worst(mid) >= target else (lo, mid)
    return beta + max(lo, 1e-12 * room)


@dataclass(frozen=True)
class Adaptive:
    """An adaptive schedule: each step keeps the conditional ESS at ``target``, at most ``cap``."""

    target: float = TARGET_CESS
    cap: int = MAX_TEMPERATURES

    def __post_init__(self):
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"the adaptive schedule's target ESS must lie in (0, 1), got "
                             f"{self.target}")  # fmt: skip
        if self.cap < 1:
            raise ValueError(f"the adaptive schedule's cap must be >= 1, got {self.cap}")


@dataclass(frozen=True)
class AISEstimate(Bound):
    """Per-datapoint log p(x) estimate with its delta-method error, and how the run went.

    ``value``/``stderr`` as :class:`~inference.bounds.Bound` (shape (N,));
    ``log_weights`` (chains, N); ``acceptance`` the mean HMC acceptance rate
    per datapoint; ``step_size`` the final leapfrog step size per datapoint;
    ``compiled`` whether the model's evaluation ran compiled; ``betas`` the
    inverse temperatures it ran through (placed by a pilot run for the
    adaptive schedule) and ``step_sizes`` the step size at each, where they
    were fixed in advance (the adaptive schedule's pilot learnt them).

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
    >>> from inference import AISEstimate, annealed_log_marginal
    >>> ais = annealed_log_marginal(model, guide, x, num_chains=8, num_temperatures=20)
    >>> isinstance(ais, AISEstimate), ais.acceptance.shape[-1]
    (True, 3)
    """

    log_weights: torch.Tensor | None = None
    acceptance: torch.Tensor | None = None
    step_size: torch.Tensor | None = None
    compiled: bool = False
    betas: torch.Tensor | None = None
    step_sizes: torch.Tensor | None = None

    @property
    def num_temperatures(self) -> int | None:
        return None if self.betas is None else len(self.betas) - 1


@dataclass
class _State:
    """The chains at one point z: log p(x, z) and log f_0(z) (chains, N), and their gradients.

    Any f_beta on the path follows without evaluating the model again:
    log f_beta = log f_0 + beta (log p - log f_0), and so does its gradient.
    ``log_p`` and ``log_0`` are None where only the gradients were computed.
    """

    values: dict[str, torch.Tensor]
    log_p: torch.Tensor | None
    log_0: torch.Tensor | None
    grad_p: dict[str, torch.Tensor]
    grad_0: dict[str, torch.Tensor]

    @property
    def log_ratio(self) -> torch.Tensor:
        """log p(x, z) - log f_0(z): the log weight update per unit of beta."""
        return self.log_p - self.log_0

    def log_f(self, beta: float) -> torch.Tensor:
        return self.log_0 + beta * (self.log_p - self.log_0)

    def grad(self, beta: float) -> dict[str, torch.Tensor]:
        return {n: g + beta * (self.grad_p[n] - g) for n, g in self.grad_0.items()}


class _Path:
    """The annealing path of one model/guide pair on fixed data, vectorised over chains.

    Evaluations of the model go through :meth:`evaluate`, eagerly (Pyro
    traces of the model and guide, autograd) or, after :meth:`compile`,
    through the same computation recorded once and compiled.
    """

    def __init__(self, model, guide, args, kwargs, layout: Layout, minibatch, initial: str):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.layout, self.minibatch, self.initial = layout, minibatch, initial
        self.compiled: dict[str, Callable] | None = None
        self.shapes: list[torch.Size] | None = None
        self.fallback: str | None = None
        self.compile_seconds = 0.0
        self.transforms = False  # the chains move auxiliary draws (see start)
        self.bijections: dict = {}  # site -> biject_to(support), where it is not the real line
        self.enumerated: set[str] = set()  # model sites summed out of the target
        self.latents: dict = {}  # the model's latent sites (dry run), enumerated ones aside
        self.looped = False  # the model is evaluated one chain at a time (see start)
        self.single: Layout | None = None  # the layout of one chain, then
        self.natural: dict[str, torch.Size] = {}  # each site's shape in one chain's trace

    def start(self) -> dict[str, torch.Tensor]:
        """Draws from the initial distribution (guide or prior), with their sites checked.

        A model that does not broadcast over a leading chain dimension (as
        Pyro's NUTS, which runs one chain, does not need) is evaluated one
        chain at a time, with a warning: the same algorithm, slower.
        """
        try:
            values = self._start(self.layout)
            with torch.no_grad():
                self.log_parts(values)  # the model's evaluation broadcasts over the chains
        except NotBroadcastable as err:
            detail = err.detail
        else:
            return values
        self.looped = True
        self.single = Layout(1, self.layout.max_plate_nesting, self.layout.plate,
                             vectorised=False, enumerate=self.layout.enumerate)  # fmt: skip
        draws = [self._start(self.single) for _ in range(self.layout.num_particles)]
        self.layout.plate_dim = self.single.plate_dim
        self.layout.plate_size = self.single.plate_size
        self.natural = {name: site["value"].shape for name, site in self.sites.items()}
        values = {
            name: torch.cat(
                [_expand_chains(d[name], site["fn"].event_dim, self.single) for d in draws]
            )  # fmt: skip
            for name, site in self.sites.items()
        }
        self.sites = {name: {**site, "value": values[name]} for name, site in self.sites.items()}
        warnings.warn(
            f"AIS: the model does not broadcast over a leading chain dimension ({detail}): its "
            "chains are evaluated one at a time (slower, the same algorithm)",
            RuntimeWarning,
            stacklevel=3,
        )
        return values

    def _start(self, layout: Layout) -> dict[str, torch.Tensor]:
        """Draws from the initial distribution under ``layout``; the sites kept in ``self.sites``.

        From a guide whose latents are transforms of auxiliary draws (Pyro's
        ``AutoNormal``, ``AutoDiagonalNormal``, ``AutoMultivariateNormal``:
        each latent a ``Delta`` at T(u) carrying log |det dT^-1/dz|), the
        chains move the auxiliary u: the target is p(x, T(u)) |det dT/du|,
        so the weights p/q are those of the latents, and u lives on R^d.
        """
        if self.initial == "guide":
            trace = trace_guide(self.guide, self.args, self.kwargs, layout, values=self.minibatch)
            check_guide_density(trace, self.guide, self.args, self.kwargs)
            sites = [s for s in sample_sites(trace) if not is_point_mass(s["fn"])]
            self.transforms = len(sites) < len(list(sample_sites(trace)))
        else:  # drawn from the prior with every site, enumerated ones too; those are summed
            unenumerated = dataclasses.replace(layout, enumerate=False)
            trace = trace_model(self.model, self.args, self.kwargs, unenumerated,
                                values=self.minibatch, free=_all_sites)  # fmt: skip
            layout.plate_dim, layout.plate_size = unenumerated.plate_dim, unenumerated.plate_size
            sites = [s for s in sample_sites(trace)
                     if not s["is_observed"] and s["name"] not in self.enumerated]  # fmt: skip
            self.transforms = False
        self.sites = {s["name"]: s for s in sites}
        self.bijections = {}
        for site in self.sites.values():
            support = site["fn"].support
            base = support
            while isinstance(base, constraints.independent):
                base = base.base_constraint
            if base is constraints.real:
                continue
            if support.is_discrete:
                raise PairError(
                    f"AIS with HMC needs continuous latents; site {site['name']!r} is discrete "
                    f"({base}): HMC cannot move it (sum it out of the model with "
                    "config_enumerate for the bounds, or condition on it)"
                )
            self.bijections[site["name"]] = biject_to(support)
        return {n: self.unconstrained(n, s["value"].detach()) for n, s in self.sites.items()}

    def unconstrained(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """u = T^-1(z) for a site whose support is not the real line (T = biject_to(support))."""
        transform = self.bijections.get(name)
        return value if transform is None else transform.inv(value)

    def constrained(self, values: dict) -> tuple[dict, torch.Tensor | float]:
        """z = T(u) for every site, and log |det dT/du| summed per chain and datapoint.

        The chains move u on R^d, as Pyro's HMC does (``biject_to`` of each
        support); the Jacobian enters the target and the initial density
        alike, so it cancels in the weights p/q and shapes only the moves.
        """
        if not self.bijections:
            return values, 0.0
        out, jacobian = dict(values), 0.0
        for name, transform in self.bijections.items():
            u = values[name]
            z = out[name] = transform(u)
            site = self.sites[name]
            ldj = sum_rightmost(transform.log_abs_det_jacobian(u, z),
                                site["fn"].event_dim - transform.codomain.event_dim)  # fmt: skip
            jacobian = jacobian + self.layout.reduce(site, ldj)
        return out, jacobian

    def log_parts(self, values) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x, z) and log f_0(z), each (chains, N), both with log |det dz/du|."""
        values, jacobian = self.constrained(values)
        # a leapfrog step may leave a support's numerical range (exp overflows): its log
        # density is then not finite and the proposal rejected, not a validation error
        with pyro.validation_enabled(False):
            if self.looped:
                parts = [
                    self._log_parts(
                        {n: v[i].reshape(self.natural[n]) for n, v in values.items()}, self.single
                    )  # fmt: skip
                    for i in range(self.layout.num_particles)
                ]
                log_p, log_0 = (torch.cat(part) for part in zip(*parts, strict=True))
            else:
                log_p, log_0 = self._log_parts(values, self.layout)
        return log_p + jacobian, log_0 + jacobian

    def _log_parts(self, values, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        replay = {**self.minibatch, **values}
        if self.transforms:
            guide_trace = trace_guide(self.guide, self.args, self.kwargs, layout, values=replay)
            model_trace = trace_model(self.model, self.args, self.kwargs, layout,
                                      values=replay_values(guide_trace))  # fmt: skip
            jacobian = log_density(guide_trace, layout, exclude=set(values))
            return (model_log_density(model_trace, layout) - jacobian,
                    log_density(guide_trace, layout, only=set(values)))  # fmt: skip
        model_trace = trace_model(self.model, self.args, self.kwargs, layout, values=replay)
        log_p = model_log_density(model_trace, layout)
        if self.initial == "prior":  # the latents' prior, enumerated sites summed out of it
            return log_p, model_log_density(model_trace, layout, only=set(values))
        guide_trace = trace_guide(self.guide, self.args, self.kwargs, layout, values=replay)
        return log_p, log_density(guide_trace, layout)

    def evaluate(self, values: dict[str, torch.Tensor], *, value: bool = True) -> _State:
        """The state at ``values``; without ``value`` the log densities may be left out."""
        if self.compiled is not None and [v.shape for v in values.values()] == self.shapes:
            tensors = [v.detach() for v in values.values()]
            if value:
                log_p, log_0, *grads = self.compiled["value"](*tensors)
            else:
                log_p, log_0, grads = None, None, self.compiled["grad"](*tensors)
            n = len(tensors)
            return _State(values, log_p, log_0, dict(zip(values, grads[:n], strict=True)),
                          dict(zip(values, grads[n:], strict=True)))  # fmt: skip
        return self._evaluate(values)

    def _evaluate(self, values: dict[str, torch.Tensor]) -> _State:
        leaves = {k: v.detach().requires_grad_(True) for k, v in values.items()}
        inputs = list(leaves.values())
        if not inputs:  # a model without latents: its evidence is its likelihood, exactly
            log_p, log_0 = self.log_parts(leaves)
            return _State(values, log_p.detach(), torch.as_tensor(log_0).expand_as(log_p), {}, {})
        with torch.enable_grad():
            log_p, log_0 = self.log_parts(leaves)
            grad_p = torch.autograd.grad(log_p.sum(), inputs, retain_graph=True, allow_unused=True)
            grad_0 = torch.autograd.grad(log_0.sum(), inputs, allow_unused=True)

        def dense(grads):
            return {
                n: torch.zeros_like(v) if g is None else g
                for (n, v), g in zip(leaves.items(), grads, strict=True)
            }

        return _State(values, log_p.detach(), log_0.detach(), dense(grad_p), dense(grad_0))

    def _flat(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = self._evaluate(dict(zip(self.sites, tensors, strict=True)))
        return (state.log_p, state.log_0, *state.grad_p.values(), *state.grad_0.values())

    def compile(self, values: dict[str, torch.Tensor], *, backend: str = "inductor") -> None:
        """Record :meth:`evaluate` at these shapes and compile it (checked against eager here).

        The guide's networks on the fixed data are computed once; the
        gradient-only evaluation (every leapfrog step but the last) skips the
        log densities. A model that cannot be recorded, or that differs from
        the eager evaluation beyond float rounding, stays eager (``fallback``
        says why).
        """
        from .compiled import Captured, _mismatch, why_not

        if self.looped:
            self.fallback = "the model is evaluated one chain at a time"
            warnings.warn(f"AIS runs eagerly: {self.fallback}", RuntimeWarning, stacklevel=3)
            return
        tic = time.perf_counter()
        tensors = [v.detach() for v in values.values()]
        try:
            captured = Captured(self._flat, tensors)
            every = list(range(2 + 2 * len(tensors)))
            compiled = {
                "value": captured.function(every, backend=backend),
                "grad": captured.function(every[2:], backend=backend),
            }
            got = compiled["value"](*tensors)
            grads = compiled["grad"](*tensors)
        except Exception as err:  # any failure of capture or compilation: stay eager
            self.fallback = why_not(err)
        else:
            want = self._flat(*tensors)
            self.fallback = _mismatch(
                want[0].sum() + want[1].sum(), got[0].sum() + got[1].sum(),
                list(want[2:]) * 2, [*got[2:], *grads],
            ) or (None if torch.equal(torch.isfinite(want[0]), torch.isfinite(got[0]))
                  else "the compiled log density is not finite where the eager one is")  # fmt: skip
            if self.fallback is None:
                self.compiled, self.shapes = compiled, [t.shape for t in tensors]
        self.compile_seconds = time.perf_counter() - tic
        if self.fallback is not None:
            warnings.warn(f"AIS runs eagerly: its evaluation could not be compiled "
                          f"({self.fallback})", RuntimeWarning, stacklevel=3)  # fmt: skip

    def per_point(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a (site-shaped) tensor over its event dims and other plates: (chains, N)."""
        site = self.sites[name]
        event_dim = site["fn"].event_dim
        summed = tensor.sum(tuple(range(-event_dim, 0))) if event_dim else tensor
        return self.layout.reduce(site, summed)

    def broadcast(self, name: str, factor: torch.Tensor) -> torch.Tensor:
        """A (chains, N) factor shaped to multiply site ``name``'s value."""
        site = self.sites[name]
        factor = factor.expand(self.layout.shape)
        return self.layout.expand_factor(factor, site["value"], site["fn"].event_dim)

    def select(self, keep: torch.Tensor, new: _State, old: _State) -> _State:
        """Per chain and datapoint, ``new`` where ``keep`` (chains, N) holds, else ``old``."""

        def pick(a: dict, b: dict) -> dict:
            return {n: torch.where(self.broadcast(n, keep), a[n], b[n]) for n in a}

        return _State(
            pick(new.values, old.values),
            torch.where(keep, new.log_p, old.log_p),
            torch.where(keep, new.log_0, old.log_0),
            pick(new.grad_p, old.grad_p),
            pick(new.grad_0, old.grad_0),
        )


class _AllSites:
    """Stands for "every site" in ``trace_model(free=...)``: the prior draws them all."""

    def __contains__(self, name) -> bool:
        return True


_all_sites = _AllSites()


def hmc_step(path: _Path, state: _State, beta: float, step_size: torch.Tensor,
             leapfrog_steps: int) -> tuple[_State, torch.Tensor]:  # fmt: skip
    """One HMC transition leaving f_beta invariant, independently per chain and datapoint.

    ``state`` is ``path.evaluate(values)``; ``step_size`` has shape (N,) (or
    broadcasts to (chains, N)). Returns the state after the transition and
    the acceptance probabilities (chains, N). The model is evaluated once
    per leapfrog step, the last time with its log density (for the
    acceptance test), the others for the gradient alone.
    """
    eps = {name: path.broadcast(name, step_size) for name in state.values}
    momentum = {name: torch.randn_like(v) for name, v in state.values.items()}
    kinetic0 = sum(path.per_point(n, 0.5 * p.pow(2)) for n, p in momentum.items())
    grad = state.grad(beta)
    z = dict(state.values)
    p = {n: momentum[n] + 0.5 * eps[n] * grad[n] for n in z}
    for step in range(leapfrog_steps):
        last = step + 1 == leapfrog_steps
        z = {n: z[n] + eps[n] * p[n] for n in z}
        end = path.evaluate(z, value=last)
        grad = end.grad(beta)
        p = {n: p[n] + (0.5 if last else 1.0) * eps[n] * grad[n] for n in z}
    kinetic1 = sum(path.per_point(n, 0.5 * q.pow(2)) for n, q in p.items())
    log_accept = (end.log_f(beta) - kinetic1) - (state.log_f(beta) - kinetic0)
    log_accept = torch.where(torch.isnan(log_accept), torch.full_like(log_accept, -math.inf),
                             log_accept)  # fmt: skip
    accept_prob = log_accept.clamp(max=0.0).exp()
    accept = torch.rand_like(accept_prob) < accept_prob
    return path.select(accept, end, state), accept_prob


def worth_compiling(num_temperatures: int, leapfrog_steps: int) -> bool:
    """Whether an AIS run compiles its evaluation by default: a run of many evaluations.

    Compiling costs seconds (more on a machine's first run); a run of at
    least :data:`COMPILE_MIN_EVALUATIONS` evaluations of the model per chain
    (1000 temperatures of 10 leapfrog steps: 10,000) saves more than that on
    networks like the MNIST VAE's. The rule depends on the settings alone,
    so the same settings give the same numbers on every machine.
    """
    return num_temperatures * leapfrog_steps >= COMPILE_MIN_EVALUATIONS


def _anneal(path: _Path, values, betas, *, step_size, leapfrog_steps, target_accept, progress,
            desc, compile: bool, fast: bool = False):  # fmt: skip
    """Run the chains along ``betas``; log weights, values, acceptance, step sizes, betas, steps.

    ``betas`` is a tensor of inverse temperatures (either direction) or an
    :class:`Adaptive` schedule, placed as the run goes (from 0 to 1): each
    next beta the largest whose weight update keeps the conditional ESS of
    every datapoint at the target. ``step_size`` is a number, adapted per
    datapoint after each transition (times 1.02 or 0.98, or with ``fast``
    times exp(2 (rate - target)) up to 1.02, which follows a posterior that
    narrows by orders of magnitude), or a (len(betas), N) tensor of the step size at
    each beta, used as it is. The last value returned is that tensor, the
    step sizes this run used (each beta's entry the one of its transition).
    """
    adaptive = betas if isinstance(betas, Adaptive) else None
    betas = [0.0] if adaptive is not None else betas.tolist()
    n = path.layout.plate_size or 1
    fixed = step_size if torch.is_tensor(step_size) else None
    step = torch.full((n,), float(step_size if fixed is None else 0.0),
                      dtype=torch.get_default_dtype())  # fmt: skip
    used = [step]
    log_w = torch.zeros(path.layout.shape, dtype=torch.float64)
    accepted = torch.zeros(n, dtype=torch.float64)
    if (
        compile
        and path.compiled is None
        and path.fallback is None
        and (adaptive is not None or len(betas) > 2)
    ):
        path.compile(values)
    state = path.evaluate(values)
    transitions, t, capped = 0, 0, False
    bar = tqdm(total=None if adaptive else len(betas) - 1, desc=desc, disable=not progress,
               leave=False)  # fmt: skip
    while True:
        if adaptive is not None and betas[-1] < 1.0:
            capped = len(betas) == adaptive.cap
            betas.append(1.0 if capped else next_temperature(betas[-1], log_w, state.log_ratio,
                                                             adaptive.target))  # fmt: skip
        t += 1
        if t >= len(betas):
            break
        log_w += (betas[t] - betas[t - 1]) * state.log_ratio.double()
        bar.update(1)
        if adaptive is not None:
            bar.set_postfix(beta=f"{betas[t]:.3g}", refresh=False)
        if t + 1 == len(betas) and (adaptive is None or betas[t] >= 1.0):
            break  # a last transition would not change any weight
        if fixed is not None:
            step = fixed[t].to(step.dtype)
        used.append(step)
        state, prob = hmc_step(path, state, betas[t], step, leapfrog_steps)
        rate = prob.reshape(prob.shape[0], -1).mean(0)
        if fixed is None and fast:
            # down as fast as the posterior narrows, up no faster than the slow rule
            step = step * torch.exp(2.0 * (rate - target_accept)).clamp(max=1.02).to(step.dtype)
        elif fixed is None:
            step = step * torch.where(rate > target_accept, 1.02, 0.98).to(step.dtype)
        accepted += rate.double()
        transitions += 1
    bar.close()
    if capped:
        warnings.warn(
            f"AIS: the adaptive schedule reached its cap of {adaptive.cap} temperatures at "
            f"beta = {betas[-2]:.3g} and jumped to 1 from there; raise the cap (num_temperatures)",
            RuntimeWarning,
            stacklevel=3,
        )
    acceptance = accepted / max(transitions, 1)
    used.append(used[-1])  # the last beta has no transition: its neighbour's, for a reverse run
    steps = torch.stack(used)[: len(betas)]
    return (log_w, state.values, acceptance, step, torch.tensor(betas, dtype=torch.float64),
            steps)  # fmt: skip


def annealing_pair(model) -> tuple[Callable, Callable]:
    """The model/guide pair of a trained elbolab model that AIS anneals.

    ``model.model`` and ``model.guide``, unless the encoder's first layer is a
    discrete corruption (binary or word dropout): HMC cannot move a discrete
    h, so AIS then anneals z alone, from ``posterior(x)`` (q(z | h at its
    mean), any normalised density will do) to p(z | x) of the model without
    its reverse r(h | z, x), whose log p(x) is the same.
    """
    corruption = getattr(model, "corruption", None)
    if corruption and corruption[0] != "gaussian":
        return model.decoder_model, model.posterior_guide
    return model.model, model.guide


def annealed_log_marginal(
    model: Callable,
    guide: Callable | None,
    *args,
    num_chains: int,
    num_temperatures: int | None = None,
    leapfrog_steps: int = 10,
    schedule: str = "sigmoid",
    plate: str | None = "data",
    initial: str = "guide",
    step_size: float = 0.1,
    target_accept: float = 0.65,
    progress: bool = False,
    compile: bool | None = None,
    betas: torch.Tensor | None = None,
    target_ess: float = TARGET_CESS,
    step_sizes: torch.Tensor | None = None,
    **kwargs,
) -> AISEstimate:
    r"""AIS estimate of log p(x) per datapoint, a stochastic lower bound, with its error.

    Parameters
    ----------
    model, guide : callable
        A Pyro pair taking ``*args, **kwargs``; the latents continuous (any
        support: the chains move in unconstrained space, through
        ``biject_to(support)`` as Pyro's HMC does) or enumerated and, with
        ``plate``, inside the data plate. ``guide`` may be None with
        ``initial="prior"``.
    num_chains : int
        Independent annealing runs per datapoint.
    num_temperatures : int
        T, the steps from beta = 0 to 1 (T = 1 is importance sampling); for
        the adaptive schedule the most it may place (default 10,000).
    leapfrog_steps : int
        Leapfrog steps per HMC transition.
    schedule : {"sigmoid", "linear", "adaptive"}
        Spacing of the inverse temperatures (:func:`temperature_schedule`).
        ``adaptive`` places them in a pilot run, each step the largest that
        keeps every datapoint's conditional ESS at ``target_ess`` (as
        adaptive-tempered SMC does), then runs fresh chains along them, so
        that the weights stay unbiased; ``betas`` of the estimate says how
        many it used.
    plate : str or None
        The data plate (None: one joint estimate, the model's evidence).
    initial : {"guide", "prior"}
        The distribution at beta = 0.
    step_size, target_accept : float
        Initial leapfrog step size, adapted per datapoint toward the target
        acceptance rate.
    compile : bool or None
        Record the model's evaluation once and compile it (inductor), or
        not; by default a run of many evaluations compiles
        (:func:`worth_compiling`). The same estimate to float rounding; a
        model that cannot be compiled runs eagerly, with a warning.
    betas : tensor, optional
        The inverse temperatures themselves (from 0 to 1), instead of a
        schedule: a BDMC run reuses the ones an adaptive run placed.
    target_ess : float
        The adaptive schedule's conditional ESS per step, in (0, 1). Its
        pilot run also learns a step size per temperature (adapting fast,
        see :func:`_anneal`), which the estimate's run then uses unchanged.
    step_sizes : tensor, optional
        With ``betas``: the leapfrog step size at each beta, (len(betas), N),
        used as it is (a BDMC run reuses those an adaptive run learnt).

    Returns
    -------
    AISEstimate
        ``value`` and ``stderr`` (delta method over chains) of shape (N,), the
        log weights, acceptance rates, final step sizes and the betas.

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
    >>> from inference import annealed_log_marginal
    >>> ais = annealed_log_marginal(model, guide, x, num_chains=8, num_temperatures=50)
    >>> ais.value.shape                               # log p(x_n), a stochastic lower bound
    torch.Size([3])
    >>> exact = dist.Normal(0.0, 1.25 ** 0.5).log_prob(x)
    >>> bool(((ais.value - exact).abs() < 0.5).all())
    True
    """
    if initial not in INITIALS:
        raise ValueError(f"initial must be one of {', '.join(INITIALS)}, got {initial!r}")
    if num_chains < 1 or leapfrog_steps < 1:
        raise ValueError("AIS needs num_chains >= 1 and leapfrog_steps >= 1")
    settings = dict(leapfrog_steps=leapfrog_steps, target_accept=target_accept,
                    progress=progress)  # fmt: skip
    path = _make_path(model, guide, args, kwargs, num_chains, plate, initial)
    if betas is None and schedule == "adaptive":
        # the pilot places the betas and learns each one's step size; the estimate's run
        # follows both as they are, so that nothing in it adapts to its own chains
        adaptive = Adaptive(target_ess, num_temperatures or MAX_TEMPERATURES)
        *_, betas, step_sizes = _anneal(path, path.start(), adaptive, desc="AIS schedule",
                                        compile=bool(compile), step_size=step_size, fast=True,
                                        **settings)  # fmt: skip
    elif betas is None:
        if num_temperatures is None:
            raise ValueError(f"the {schedule} schedule needs num_temperatures")
        betas = temperature_schedule(num_temperatures, schedule)
    betas = _checked_betas(betas)
    temperatures = len(betas) - 1
    if compile is None:
        compile = worth_compiling(temperatures, leapfrog_steps)
    if step_sizes is not None:
        step_sizes = torch.as_tensor(step_sizes, dtype=torch.get_default_dtype())
        if step_sizes.shape[0] != len(betas):
            raise ValueError(f"step_sizes has {step_sizes.shape[0]} rows for {len(betas)} betas")
    log_w, _, acceptance, step, _, _ = _anneal(
        path, path.start(), betas, desc=f"AIS-{temperatures}", compile=compile,
        step_size=step_size if step_sizes is None else step_sizes, **settings,
    )  # fmt: skip
    bound = iwae_bound(log_w)
    moved = float(acceptance.mean())
    if temperatures > 1 and moved < MIN_ACCEPTANCE:
        warnings.warn(
            f"AIS: HMC accepted {moved:.1%} of its proposals: the chains barely moved, and the "
            "estimate is little more than importance sampling from the initial distribution; "
            "try a smaller step size or more leapfrog steps",
            RuntimeWarning,
            stacklevel=2,
        )
    return AISEstimate(bound.value, bound.stderr, log_w, acceptance, step,
                       compiled=path.compiled is not None, betas=betas,
                       step_sizes=step_sizes)  # fmt: skip


def _checked_betas(betas) -> torch.Tensor:
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if (
        betas.dim() != 1
        or len(betas) < 2
        or betas[0] != 0
        or betas[-1] != 1
        or (betas.diff() <= 0).any()
    ):
        raise ValueError("betas must increase from 0 to 1 (at least two of them)")
    return betas


def _no_guide(*args, **kwargs) -> None:
    """The guide of a run from the prior that was given none: it samples nothing."""


def _make_path(model, guide, args, kwargs, num_chains, plate, initial) -> _Path:
    if guide is None:
        if initial != "prior":
            raise ValueError("AIS without a guide starts from the prior: pass initial='prior'")
        guide = _no_guide
    guide_trace, model_trace = dry_traces(model, guide, args, kwargs)
    if plate is None:
        refuse_joint_log_mean(guide_trace, model_trace, "AIS weights")
    nesting, minibatch = plate_nesting(guide_trace, model_trace), subsample_values(guide_trace)
    # discrete sites the model marks for enumeration: summed out of the target exactly, as
    # Pyro's HMC does, so that the chains move the continuous latents alone
    enumerated = {s["name"] for s in sample_sites(model_trace) if is_enumerated(s, guide_trace)}
    layout = Layout(num_chains, nesting, plate, enumerate=bool(enumerated))
    path = _Path(model, guide, args, kwargs, layout, minibatch, initial)
    path.enumerated = enumerated
    path.latents = {s["name"]: s for s in sample_sites(model_trace)
                    if not s["is_observed"] and s["name"] not in enumerated}  # fmt: skip
    return path


def simulate(model: Callable, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, dict]:
    """Draw (z, x) from the model, shaped like the data ``x`` (its first argument).

    Every observed site is sampled (``poutine.uncondition``); latents the
    model draws after its observation (an auxiliary reverse model
    r(h | z, x)) are drawn again given the simulated x, so that all latents
    form an exact sample of the (extended) posterior of the simulated data.

    Returns
    -------
    x_sim : torch.Tensor
        The simulated data.
    latents : dict
        Site -> value, an exact posterior sample for ``x_sim``.
    """
    with torch.no_grad():
        trace = poutine.trace(poutine.uncondition(model)).get_trace(x, **kwargs)
        sites = list(sample_sites(trace))
        observed = [i for i, s in enumerate(sites) if s["infer"].get("was_observed")]
        if not observed:
            raise ValueError("the model observes no site: there is no x to simulate")
        x_sim = sites[observed[0]]["value"]
        before = {s["name"]: s["value"] for s in sites[: observed[0]] if not s["is_observed"]}
        after = [s["name"] for s in sites[observed[0] + 1 :] if not s["is_observed"]]
        if after:
            redraw = poutine.trace(poutine.condition(model, data=before)).get_trace(x_sim, **kwargs)
            before.update({name: redraw.nodes[name]["value"] for name in after})
    return x_sim, before


def _expand_chains(value: torch.Tensor, event_dim: int, layout: Layout) -> torch.Tensor:
    """A value without the chain dim, shaped (chains, ...) as a site under the chain plate."""
    batch = value.dim() - event_dim
    missing = layout.rank - 1 - batch
    value = value.reshape((1,) * (1 + missing) + value.shape)
    return value.expand(layout.num_particles, *value.shape[1:]).clone()


def simulate_observations(model: Callable, *args, **kwargs) -> tuple[dict, dict]:
    """Every observed site drawn from the model at the same arguments, and the latents with them.

    The latents are an exact sample of the posterior given the simulated
    observations (the model run with ``poutine.uncondition``).
    """
    with torch.no_grad():
        trace = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
    sites = list(sample_sites(trace))
    observed = {s["name"]: s["value"] for s in sites if s["infer"].get("was_observed")}
    if not observed:
        raise ValueError("the model observes no site: there is no data to simulate")
    latents = {s["name"]: s["value"] for s in sites if s["name"] not in observed}
    return observed, latents


def bdmc(
    model: Callable,
    guide: Callable | None,
    x: torch.Tensor,
    *,
    num_points: int,
    num_chains: int,
    num_temperatures: int | None = None,
    leapfrog_steps: int = 10,
    schedule: str = "sigmoid",
    initial: str = "guide",
    step_size: float = 0.1,
    target_accept: float = 0.65,
    progress: bool = False,
    plate: str = "data",
    compile: bool | None = None,
    betas: torch.Tensor | None = None,
    target_ess: float = TARGET_CESS,
    **kwargs,
) -> dict:
    r"""Bidirectional Monte Carlo on ``num_points`` datapoints simulated from the model.

    ``x`` only gives the data's shape (its first ``num_points`` rows). Forward
    AIS gives a stochastic lower bound and reverse AIS, started at the exact
    posterior sample of each simulated datapoint, a stochastic upper bound on
    its log p(x); both with delta-method errors over chains. The settings
    are those of :func:`annealed_log_marginal`; the reverse run goes back
    along the forward run's betas (those an adaptive schedule placed too).

    Returns
    -------
    dict
        ``lower`` and ``upper`` (:class:`AISEstimate` / :class:`~inference.bounds.Bound`,
        per datapoint), ``gap`` (upper - lower, per datapoint), ``x`` (the
        simulated data), ``acceptance`` (forward and reverse).

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
    >>> from inference import bdmc
    >>> result = bdmc(model, guide, x, num_points=2, num_chains=4, num_temperatures=20)
    >>> sorted(result)[:2]                           # forward (lower) and reverse (upper) AIS
    [...]
    >>> bool((result["lower"].value <= result["upper"].value + 1.0).all())
    True
    """
    if num_points < 1 or num_points > x.shape[0]:
        raise ValueError(f"num_points must lie in 1..{x.shape[0]}, got {num_points}")
    x_sim, exact = simulate(model, x[:num_points], **kwargs)
    settings = dict(
        num_chains=num_chains, num_temperatures=num_temperatures, leapfrog_steps=leapfrog_steps,
        schedule=schedule, plate=plate, initial=initial, step_size=step_size,
        target_accept=target_accept, progress=progress, compile=compile, betas=betas,
        target_ess=target_ess,
    )  # fmt: skip
    return {**_sandwich(model, guide, (x_sim,), kwargs, exact, settings), "x": x_sim}


def bdmc_joint(model: Callable, guide: Callable | None, *args, **settings) -> dict:
    r"""BDMC on one data set simulated from the model at the same arguments: log p(D) bracketed.

    Every observed site is drawn anew (:func:`simulate_observations`) and the
    model conditioned on the draws (``poutine.condition``); forward AIS from
    ``initial`` and reverse AIS from the latents drawn with the data bracket
    the simulated data's evidence. ``settings`` are those of
    :func:`annealed_log_marginal` (with ``plate=None``) and the model's
    keyword arguments. The guide sees the arguments as given.

    Returns
    -------
    dict
        ``lower``, ``upper``, ``gap`` (scalars as one-element tensors),
        ``observed`` (the simulated observations), ``acceptance``.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> def coin(flips):
    ...     p = pyro.sample("p", dist.Beta(2.0, 3.0))
    ...     with pyro.plate("data", len(flips)):
    ...         pyro.sample("flips", dist.Bernoulli(p), obs=flips)
    >>> flips = torch.tensor([1.0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0])
    >>> from inference import bdmc_joint
    >>> result = bdmc_joint(coin, None, flips, num_chains=8, num_temperatures=50,
    ...                     initial="prior")
    >>> result["lower"].value.shape                  # one bracket of log p(D), simulated D
    torch.Size([])
    """
    names = ("num_chains", "num_temperatures", "leapfrog_steps", "schedule", "initial",
             "step_size", "target_accept", "progress", "compile", "betas",
             "target_ess", "step_sizes")  # fmt: skip
    ais = {k: settings.pop(k) for k in names if k in settings}
    observed, exact = simulate_observations(model, *args, **settings)
    conditioned = poutine.condition(model, data=observed)
    result = _sandwich(conditioned, guide, args, settings, exact, {**ais, "plate": None})
    return {**result, "observed": observed}


def _sandwich(model, guide, args, kwargs, exact: dict, settings: dict) -> dict:
    """Forward AIS on the data in ``args``/``kwargs`` and reverse AIS from the latents ``exact``."""
    num_chains = settings["num_chains"]
    path = _make_path(model, guide, args, kwargs, num_chains, settings["plate"],
                      settings.get("initial", "guide"))  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # the forward run's draws stay as they were
        path.start()  # the sites and their shapes
        start = _reverse_start(path, exact)
    hmc = dict(leapfrog_steps=settings.get("leapfrog_steps", 10),
               target_accept=settings.get("target_accept", 0.65),
               progress=settings.get("progress"))  # fmt: skip
    if settings.get("betas") is not None and settings.get("step_sizes") is None:
        # given betas (those an adaptive run placed on other data): a pilot along them learns
        # this data's step size at each, as the adaptive schedule's pilot does
        *_, steps = _anneal(path, path.start(), _checked_betas(settings["betas"]), fast=True,
                            step_size=settings.get("step_size", 0.1), desc="AIS step sizes",
                            compile=False, **hmc)  # fmt: skip
        settings = {**settings, "step_sizes": steps}
    lower = annealed_log_marginal(model, guide, *args, **settings, **kwargs)
    betas = lower.betas
    compile = settings.get("compile")
    if compile is None:
        compile = worth_compiling(len(betas) - 1, hmc["leapfrog_steps"])
    # back along the forward run's betas; with the step sizes an adaptive pilot learnt for
    # them, if it did (otherwise adapted as the forward run adapts its own)
    if lower.step_sizes is None:
        steps = settings.get("step_size", 0.1)
    else:
        steps = lower.step_sizes.flip(0)
    log_w, _, acceptance, _, _, _ = _anneal(path, start, betas.flip(0), step_size=steps,
                                            desc=f"reverse AIS-{len(betas) - 1}",
                                            compile=compile, **hmc)  # fmt: skip
    # mean of the reverse weights estimates 1 / p(x): minus its log is an upper bound
    lse = logsumexp(log_w, 0)
    upper = Bound(-(lse - math.log(num_chains)), log_mean_weight_stderr(log_w, lse=lse))
    return {
        "lower": lower,
        "upper": upper,
        "gap": upper.value - lower.value,
        "acceptance": {"forward": lower.acceptance, "reverse": acceptance},
    }


def _reverse_start(path: _Path, exact: dict) -> dict[str, torch.Tensor]:
    """The exact posterior sample as the chains' state, one copy per chain.

    Each latent as u = T^-1(z) in unconstrained space; from an autoguide the
    auxiliary draw that the guide maps to z (``AutoNormal``: per site;
    ``AutoContinuous`` guides: the unconstrained latents packed in the
    guide's order), checked by running the guide from it.
    """
    if not path.transforms:
        return {
            name: path.unconstrained(
                name, _expand_chains(exact[name], site["fn"].event_dim, path.layout)
            )  # fmt: skip
            for name, site in path.sites.items()
        }
    latents = {name: _expand_chains(exact[name], site["fn"].event_dim, path.layout)
               for name, site in path.latents.items()}  # fmt: skip
    for candidate in (_per_site_auxiliary, _packed_auxiliary):
        values = candidate(path, latents)
        if values is not None and _reproduces(path, values, latents):
            return values
    raise PairError(
        f"reverse AIS cannot start from the exact posterior sample: the guide's auxiliary sites "
        f"{sorted(path.sites)} are not the unconstrained latents of an AutoNormal or of an "
        "AutoContinuous guide; use initial='prior', or a guide that samples the latents"
    )


def _per_site_auxiliary(path: _Path, latents: dict) -> dict | None:
    names = {f"{name}_unconstrained": name for name in latents}
    if set(path.sites) != set(names):
        return None
    return {aux: biject_to(path.latents[name]["fn"].support).inv(latents[name])
            for aux, name in names.items()}  # fmt: skip


def _packed_auxiliary(path: _Path, latents: dict) -> dict | None:
    prototype = getattr(path.guide, "prototype_trace", None)
    if len(path.sites) != 1 or prototype is None:
        return None
    ((aux, site),) = path.sites.items()
    batch = site["value"].shape[:-1]
    parts = []
    for name, proto in prototype.iter_stochastic_nodes():
        if name not in latents:
            return None
        u = biject_to(proto["fn"].support).inv(latents[name])
        parts.append(u.reshape(*batch, -1))
    packed = torch.cat(parts, -1)
    return {aux: packed} if packed.shape == site["value"].shape else None


def _reproduces(path: _Path, values: dict, latents: dict) -> bool:
    """Whether the guide run from auxiliary ``values`` puts its latents at ``latents``."""
    try:
        with torch.no_grad():
            trace = trace_guide(path.guide, path.args, path.kwargs, path.layout,
                                values={**path.minibatch, **values})  # fmt: skip
            return all(
                torch.allclose(
                    *torch.broadcast_tensors(trace.nodes[name]["value"], z), rtol=1e-6, atol=1e-8
                )  # fmt: skip
                for name, z in latents.items()
            )
    except Exception:  # a guide that cannot run from these values: not its auxiliary space
        return False


def bdmc_summary(result: dict) -> dict:
    """Means over datapoints: lower, upper and gap with their Monte Carlo errors."""
    lower, upper = result["lower"].summary(), result["upper"].summary()
    gap_se = math.hypot(lower["stderr"], upper["stderr"])
    return {
        "lower": lower,
        "upper": upper,
        "gap": {"mean": upper["mean"] - lower["mean"], "stderr": gap_se, "error": lower["error"]},
        "acceptance_forward": float(np.mean(result["acceptance"]["forward"].numpy())),
        "acceptance_reverse": float(np.mean(result["acceptance"]["reverse"].numpy())),
    }


def ais_over_data(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *,
    batch_size: int = 100,
    seed: int | None = None,
    world: World | None = None,
    progress: bool = True,
    **settings,
) -> AISEstimate:
    """:func:`annealed_log_marginal` over a data set in batches of datapoints (bounded memory).

    With a ``seed`` each batch has a random stream of its own and the batches
    are shared among the processes of a torchrun job (see
    :func:`inference.distributed.map_units`): the same numbers for any number
    of processes.

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
    >>> from inference import ais_over_data
    >>> ais = ais_over_data(model, guide, x, batch_size=2, num_chains=4, num_temperatures=20,
    ...                     progress=False)
    >>> ais.value.shape
    torch.Size([3])
    """
    one = data.shape[0] <= batch_size  # one batch: its own bar, over the temperatures

    def batch(xb: torch.Tensor, start: int) -> AISEstimate:
        return annealed_log_marginal(model, guide, xb, progress=progress and one, **settings)

    parts = distributed.map_batches(
        data, batch_size, batch, world=world,
        seed=None if seed is None else (seed, distributed.STREAM_AIS),
        desc="AIS", progress=progress,
    )  # fmt: skip
    return AISEstimate(
        torch.cat([p.value for p in parts]),
        torch.cat([p.stderr for p in parts]),
        torch.cat([p.log_weights for p in parts], 1),
        torch.cat([p.acceptance for p in parts]),
        torch.cat([p.step_size for p in parts]),
        compiled=all(p.compiled for p in parts),
        # one schedule for every batch, or (adaptive: each batch its own) the longest
        betas=max((p.betas for p in parts), key=len),
    )
