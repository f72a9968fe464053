r"""Training objectives that work on any reparameterisable model/guide pair.

Each objective follows Pyro's ELBO interface (``loss`` and
``differentiable_loss(model, guide, *args, **kwargs)``) and returns the
*negative* bound, summed over the data plate and multiplied by the plate's
scale (N/B under subsampling). The scale multiplies the per-datapoint bound;
it never enters the logsumexp, which is what makes the IWAE objective the
IWAE bound on minibatches too (Pyro's ``RenyiELBO`` puts it inside, which is
wrong for local latents: pyro-ppl issues #2321, #3104).

Value and gradient come from one expression: the returned tensor's value is
the bound, and ``surrogate - surrogate.detach()`` adds the estimator's
gradient without changing the value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .bounds import logsumexp
from .tracing import (
    Layout,
    dry_traces,
    guess_max_plate_nesting,
    latent_values,
    log_density,
    plate_nesting,
    sample_sites,
    subsample_values,
    trace_guide,
    weighted_sample,
)

OBJECTIVES = ("elbo", "meanfield", "iwae", "dreg", "trace-elbo")


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a factor known only later."""

    @staticmethod
    def forward(ctx, value, holder):
        ctx.holder = holder
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.holder["factor"], None


def _has_trainable_inputs(fn) -> bool:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in vars(fn).values())


class LogWeightObjective:
    """Base class: negative bound from vectorised log weights, per datapoint then scaled.

    Parameters
    ----------
    num_particles : int
        K, particles per datapoint.
    plate : str
        Name of the data plate.
    """

    name = "base"

    def __init__(self, *, num_particles: int = 1, plate: str = "data") -> None:
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        self.num_particles = int(num_particles)
        self.plate = plate
        self._nesting: int | None = None

    def _layout(self, model, guide, args, kwargs) -> Layout:
        if self._nesting is None:
            self._nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        return Layout(self.num_particles, self._nesting, self.plate)

    @staticmethod
    def _check_reparam(guide_trace) -> None:
        # Every guide site is a latent, also in a conditioned trace where Pyro marks it observed.
        # A site whose distribution has no trainable parameters (a fixed corruption) needs no
        # score-function term: its sampling distribution does not move with the parameters.
        for site in sample_sites(guide_trace):
            if not site["fn"].has_rsample and _has_trainable_inputs(site["fn"]):
                raise ValueError(
                    f"guide site {site['name']!r} ({type(site['fn']).__name__}) is not "
                    "reparameterisable; use the 'trace-elbo' objective for such guides"
                )

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """Per-datapoint bound from (K, N) log weights."""
        raise NotImplementedError

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """Minus the bound, summed over datapoints and multiplied by the plate scale."""
        layout = self._layout(model, guide, args, kwargs)
        sample = weighted_sample(model, guide, args, kwargs, layout)
        self._check_reparam(sample.guide_trace)
        return -sample.scale() * self.bound(sample.log_w).sum()

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        # Not under no_grad: the reparameterisation check must see trainable inputs.
        return float(self.differentiable_loss(model, guide, *args, **kwargs).detach())

    def __call__(self, model, guide, *args, **kwargs):
        return self.differentiable_loss(model, guide, *args, **kwargs)


class ELBO(LogWeightObjective):
    r"""Negative ELBO, mean_k log w_k, reparameterised; equals Pyro's ``Trace_ELBO``.

    The gradient is that of Trace_ELBO with vectorised particles for
    reparameterisable guides, without its per-site bookkeeping.
    """

    name = "elbo"

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        return log_w.mean(0)


class IWAE(LogWeightObjective):
    r"""Negative IWAE bound, logsumexp_k log w_k - log K, per datapoint then scaled.

    References
    ----------
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders, ICLR.
    """

    name = "iwae"

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        return logsumexp(log_w, 0) - math.log(log_w.shape[0])


class DReG(IWAE):
    r"""IWAE bound with doubly reparameterised gradients for the guide (Tucker et al. 2019).

    Same value as :class:`IWAE`. With wbar_k the normalised weights, the model
    gradient is the IWAE one, sum_k wbar_k grad_theta log w_k, and the guide
    gradient is

        sum_k wbar_k^2 (d log w_k / d z_k) (d z_k / d phi),

    with phi held fixed inside log q (no score-function term). One surrogate
    gives both: the latent values pass through an identity whose backward
    multiplies by wbar_k, and the score term of log q is cancelled by
    subtracting log q evaluated at detached values. This holds for guides with
    several stochastic layers too, since every latent value is scaled once.

    References
    ----------
    Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient
    Estimators for Monte Carlo Objectives, ICLR.
    """

    name = "dreg"

    def __init__(self, *, num_particles: int = 1, plate: str = "data") -> None:
        super().__init__(num_particles=num_particles, plate=plate)
        self._one_latent = False

    def _layout(self, model, guide, args, kwargs) -> Layout:
        if self._nesting is None:  # the dry run also tells how many latent sites the guide has
            guide_trace, model_trace = dry_traces(model, guide, args, kwargs)
            self._nesting = plate_nesting(guide_trace, model_trace)
            self._one_latent = len(latent_values(guide_trace)) == 1
        return super()._layout(model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        layout = self._layout(model, guide, args, kwargs)
        if self._one_latent:
            draw = _DrawScaled()
            sample = weighted_sample(model, guide, args, kwargs, layout, draw=draw)
            factors = draw.factors
        else:
            first = trace_guide(guide, args, kwargs, layout)
            drawn, subsamples = latent_values(first), subsample_values(first)
            factors = {name: {} for name in drawn}
            scaled = {name: _ScaleGrad.apply(v, factors[name]) for name, v in drawn.items()}
            sample = weighted_sample(
                model, guide, args, kwargs, layout, values={**subsamples, **scaled}
            )
        self._check_reparam(sample.guide_trace)
        values = latent_values(sample.guide_trace)
        detached = {**subsample_values(sample.guide_trace),
                    **{name: v.detach() for name, v in values.items()}}  # fmt: skip
        log_q_fixed = log_density(trace_guide(guide, args, kwargs, layout, values=detached), layout)
        log_w = sample.log_w
        wbar = torch.softmax(log_w.detach(), 0)
        # Read in backward, once the weights are known.
        for name, holder in factors.items():
            event_dim = sample.guide_trace.nodes[name]["fn"].event_dim
            holder["factor"] = layout.expand_factor(wbar, values[name], event_dim)
        # log_w holds -log q(z; phi), whose gradient is path + score; adding
        # log q(stop(z); phi), less its value, cancels the score and keeps the value.
        log_w_path = log_w + (log_q_fixed - log_q_fixed.detach())
        bound = self.bound(log_w)
        surrogate = (wbar * log_w_path).sum(0)
        return -sample.scale() * (bound.detach() + surrogate - surrogate.detach()).sum()


class _DrawScaled(Messenger):
    """Draw each latent as Pyro would and pass it through :class:`_ScaleGrad`.

    For a guide with one latent site the guide then runs once, drawing and
    scoring together (drawn first and replayed scaled, its networks ran
    twice, forward and backward). With several, a later site's draw must
    see the earlier latents unscaled and its density the scaled ones, so
    :class:`DReG` replays. Entered outside the particle plate, so the draw
    comes from the site's distribution broadcast over every plate, as
    Pyro's own (the same random numbers).
    """

    def __init__(self) -> None:
        super().__init__()
        self.factors: dict[str, dict] = {}

    def _pyro_sample(self, msg: dict) -> None:
        if msg["done"] or msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        holder = self.factors[msg["name"]] = {}
        msg["value"] = _ScaleGrad.apply(msg["fn"](*msg["args"], **msg["kwargs"]), holder)
        msg["done"] = True


class _PyroELBO:
    """Pyro's own ELBO with vectorised particles, under elbolab's name."""

    def __init__(self, elbo_class, name: str, *, num_particles: int) -> None:
        self.name = name
        self.num_particles = num_particles
        self._elbo = elbo_class(num_particles=num_particles, vectorize_particles=True)

    def loss(self, model, guide, *args, **kwargs) -> float:
        return self._elbo.loss(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return self._elbo.differentiable_loss(model, guide, *args, **kwargs)

    __call__ = differentiable_loss


def make_objective(name: str, *, num_particles: int = 1):
    """The training objective called ``name``.

    Parameters
    ----------
    name : {"elbo", "meanfield", "iwae", "dreg", "trace-elbo"}
        ``elbo``: reparameterised ELBO (same value and gradient as Pyro's
        Trace_ELBO for reparameterisable guides, faster); ``meanfield``: Pyro's
        TraceMeanField_ELBO (analytic KL where available); ``iwae``: the IWAE
        bound; ``dreg``: IWAE with doubly reparameterised guide gradients;
        ``trace-elbo``: Pyro's Trace_ELBO itself (score-function terms for
        guides that cannot be reparameterised).
    num_particles : int
        K, particles per datapoint.

    Returns
    -------
    object
        With ``loss`` and ``differentiable_loss(model, guide, *args, **kwargs)``.
    """
    if name == "elbo":
        return ELBO(num_particles=num_particles)
    if name == "iwae":
        return IWAE(num_particles=num_particles)
    if name == "dreg":
        return DReG(num_particles=num_particles)
    if name == "meanfield":
        return _PyroELBO(TraceMeanField_ELBO, name, num_particles=num_particles)
    if name == "trace-elbo":
        return _PyroELBO(Trace_ELBO, name, num_particles=num_particles)
    raise ValueError(f"unknown objective {name!r}; choose from {OBJECTIVES}")
