r"""Training objectives that work on any model/guide pair.

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

Guide sites that are not reparameterised (discrete draws: ``Categorical``,
``OneHotCategorical``, ``Bernoulli``) get score-function terms, each
particle's with a leave-one-out baseline: for the ELBO the mean log weight
of the other particles, for the IWAE bound VIMCO's (Mnih & Rezende 2016).

With ``plate=None`` the weights are joint over everything the model scores.
Under subsampling (a plate scale N/B) the ELBO then scales each site's log
density, which keeps it unbiased for the full-data ELBO; the IWAE bound of a
minibatch is no such estimate and is refused.

References
----------
Mnih & Rezende (2016), Variational inference for Monte Carlo objectives, ICML.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .bounds import logsumexp
from .inspection import PairError, non_reparameterised_sites, refuse_joint_log_mean
from .tracing import (
    Layout,
    dry_traces,
    guess_max_plate_nesting,
    latent_values,
    log_density,
    plate_nesting,
    subsample_values,
    trace_guide,
    weighted_sample,
)

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["make_objective"]

OBJECTIVES = ("elbo", "meanfield", "iwae", "dreg", "trace-elbo", "trace-enum-elbo")


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a factor known only later."""

    @staticmethod
    def forward(ctx, value, holder):
        ctx.holder = holder
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.holder["factor"], None


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
    joint_log_mean = True  # the bound takes a log-mean of weights (refused on joint minibatches)

    def __init__(self, *, num_particles: int = 1, plate: str | None = "data") -> None:
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        self.num_particles = int(num_particles)
        self.plate = plate
        self._nesting: int | None = None
        self._found: dict = {}  # what the first call learnt of the pair (Layout.found)

    def _layout(self, model, guide, args, kwargs) -> Layout:
        if self._nesting is None:
            self._nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        scaled = self.plate is None and not self.joint_log_mean
        return Layout(self.num_particles, self._nesting, self.plate, scaled=scaled, **self._found)

    def _sample(self, model, guide, args, kwargs, layout: Layout, **options):
        sample = weighted_sample(model, guide, args, kwargs, layout, **options)
        self._found = layout.found
        if self.plate is None and self.joint_log_mean:
            refuse_joint_log_mean(sample.guide_trace, sample.model_trace,
                                  f"{self.name.upper()} objective's weights")  # fmt: skip
        return sample

    def _scale(self, sample) -> float | torch.Tensor:
        return 1.0 if sample.layout.scaled else sample.scale()

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """Per-datapoint bound from (K, N) log weights."""
        raise NotImplementedError

    def score_signal(self, log_w: torch.Tensor) -> torch.Tensor:
        """Each particle's learning signal less its baseline, (K, N), for score terms."""
        raise NotImplementedError

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """Minus the bound, summed over datapoints and multiplied by the plate scale."""
        layout = self._layout(model, guide, args, kwargs)
        sample = self._sample(model, guide, args, kwargs, layout)
        bound = self.bound(sample.log_w)
        discrete = non_reparameterised_sites(sample.guide_trace)
        if discrete:
            # sum_k signal_k * grad log q(z_k) for the draws that carry no path gradient
            log_q = sample.guide_log_density(set(discrete))
            surrogate = (self.score_signal(sample.log_w.detach()) * log_q).sum(0)
            bound = bound + (surrogate - surrogate.detach())
        return -self._scale(sample) * bound.sum()

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        # Not under no_grad: the reparameterisation check must see trainable inputs.
        return float(self.differentiable_loss(model, guide, *args, **kwargs).detach())

    def __call__(self, model, guide, *args, **kwargs):
        return self.differentiable_loss(model, guide, *args, **kwargs)


def _leave_one_out_mean(log_w: torch.Tensor) -> torch.Tensor:
    """mean_{j != k} log w_j for each k (K >= 2), along dim 0."""
    k = log_w.shape[0]
    return (log_w.sum(0, keepdim=True) - log_w) / (k - 1)


class ELBO(LogWeightObjective):
    r"""Negative ELBO, mean_k log w_k, reparameterised; equals Pyro's ``Trace_ELBO``.

    The gradient is that of Trace_ELBO with vectorised particles for
    reparameterisable guides, without its per-site bookkeeping.
    """

    name = "elbo"
    joint_log_mean = False

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        return log_w.mean(0)

    def score_signal(self, log_w: torch.Tensor) -> torch.Tensor:
        k = log_w.shape[0]
        baseline = _leave_one_out_mean(log_w) if k > 1 else torch.zeros_like(log_w)
        return (log_w - baseline) / k


class IWAE(LogWeightObjective):
    r"""Negative IWAE bound, logsumexp_k log w_k - log K, per datapoint then scaled.

    References
    ----------
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders, ICLR.
    """

    name = "iwae"

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        return logsumexp(log_w, 0) - math.log(log_w.shape[0])

    def score_signal(self, log_w: torch.Tensor) -> torch.Tensor:
        r"""VIMCO: L - L_{-k}, with log w_k replaced by the mean of the others' in L_{-k}.

        L_{-k} = log (1/K) [sum_{j != k} w_j + exp(mean_{j != k} log w_j)], which does
        not depend on z_k, so the estimator stays unbiased (Mnih & Rezende 2016, eq. 9).
        """
        k = log_w.shape[0]
        bound = self.bound(log_w)
        if k == 1:
            return bound.expand_as(log_w)
        eye = torch.eye(k, dtype=torch.bool, device=log_w.device).reshape(
            (k, k) + (1,) * (log_w.dim() - 1)
        )
        swapped = torch.where(eye, _leave_one_out_mean(log_w).unsqueeze(1), log_w.unsqueeze(0))
        return bound - (logsumexp(swapped, 1) - math.log(k))


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

    def __init__(self, *, num_particles: int = 1, plate: str | None = "data") -> None:
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
            sample = self._sample(model, guide, args, kwargs, layout, draw=draw)
            factors = draw.factors
        else:
            first = trace_guide(guide, args, kwargs, layout)
            drawn, subsamples = latent_values(first), subsample_values(first)
            factors = {name: {} for name in drawn}
            scaled = {name: _ScaleGrad.apply(v, factors[name]) for name, v in drawn.items()}
            sample = self._sample(model, guide, args, kwargs, layout,
                                  values={**subsamples, **scaled})  # fmt: skip
        discrete = non_reparameterised_sites(sample.guide_trace)
        if discrete or not layout.vectorised:
            why = (
                f"guide site {discrete[0]!r} is not reparameterised"
                if discrete
                else "the pair does not broadcast over a leading particle dimension"
            )
            raise PairError(
                f"{why}: DReG's gradient needs reparameterised draws in one vectorised pass; "
                "use the 'iwae' objective (score-function terms with VIMCO's baselines)"
            )
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
        return -self._scale(sample) * (bound.detach() + surrogate - surrogate.detach()).sum()


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


def make_objective(name: str, *, num_particles: int = 1, plate: str | None = "data"):
    """The training objective called ``name``.

    Parameters
    ----------
    name : {"elbo", "meanfield", "iwae", "dreg", "trace-elbo", "trace-enum-elbo"}
        ``elbo``: reparameterised ELBO (same value and gradient as Pyro's
        Trace_ELBO for reparameterisable guides, faster); ``meanfield``: Pyro's
        TraceMeanField_ELBO (analytic KL where available); ``iwae``: the IWAE
        bound; ``dreg``: IWAE with doubly reparameterised guide gradients;
        ``trace-elbo``: Pyro's Trace_ELBO itself; ``trace-enum-elbo``: Pyro's
        TraceEnum_ELBO, which sums discrete guide sites marked
        ``infer={"enumerate": "parallel"}`` exactly (no score-function
        variance where their support is small) and the model's enumerated sites.
    num_particles : int
        K, particles per datapoint.
    plate : str or None
        The data plate; None for a model with global latents (joint weights:
        the ELBO scales each site by its plate's N/B, the IWAE objectives need
        the full data). Pyro's own ELBOs need no plate.

    Returns
    -------
    object
        With ``loss`` and ``differentiable_loss(model, guide, *args, **kwargs)``.

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
    >>> from pyro.infer import SVI
    >>> from inference import make_objective
    >>> loss = make_objective("iwae", num_particles=5)   # Pyro's loss interface
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    >>> bool(torch.isfinite(torch.tensor(svi.step(x))))
    True
    """
    if name == "elbo":
        return ELBO(num_particles=num_particles, plate=plate)
    if name == "iwae":
        return IWAE(num_particles=num_particles, plate=plate)
    if name == "dreg":
        return DReG(num_particles=num_particles, plate=plate)
    if name == "meanfield":
        return _PyroELBO(TraceMeanField_ELBO, name, num_particles=num_particles)
    if name == "trace-elbo":
        return _PyroELBO(Trace_ELBO, name, num_particles=num_particles)
    if name == "trace-enum-elbo":
        return _PyroELBO(TraceEnum_ELBO, name, num_particles=num_particles)
    raise ValueError(f"unknown objective {name!r}; choose from {OBJECTIVES}")
