"""Guides with discrete (non-reparameterised) draws: the gradient against exhaustive enumeration.

ss_vae_M2 draws its class label from a ``OneHotCategorical`` in the guide;
Pyro's tests use ``Categorical`` and ``Bernoulli``. For a small model the
expected ELBO and IWAE-K are finite sums over every K-tuple of draws, so
their gradients are exact (autograd through the sum); the estimators'
gradients, averaged over many independent draws, must agree within their
Monte Carlo error (4.5 standard errors per coordinate).
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference.inspection import PairError
from inference.objectives import make_objective

X = torch.tensor([0.7, -1.3])
C = 3


def _pair(kind, replicas=1):
    """The pair on X; with ``replicas`` > 1 on X repeated, each copy an independent estimate."""
    locs = torch.tensor([-1.5, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    logits = torch.tensor(
        [[0.3, -0.5, 0.1], [-0.2, 0.4, 0.0]], dtype=torch.float64, requires_grad=True
    )

    def model(x):
        with pyro.plate("data", len(x)):
            if kind == "onehot":
                y = pyro.sample("y", dist.OneHotCategorical(torch.full((C,), 1.0 / C)))
                loc = (y * locs).sum(-1)
            else:
                y = pyro.sample("y", dist.Categorical(torch.full((C,), 1.0 / C)))
                loc = locs[y]
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            fn = dist.OneHotCategorical if kind == "onehot" else dist.Categorical
            pyro.sample("y", fn(logits=logits.repeat(replicas, 1)))

    return model, guide, locs, logits


def _exact(objective, k, locs, logits, x):
    """E over all C^K draws per datapoint of the objective, summed over datapoints."""
    log_q = torch.log_softmax(logits, -1)  # (N, C)
    log_p = math.log(1.0 / C) + dist.Normal(locs, 1.0).log_prob(x[:, None])  # (N, C)
    total = 0.0
    for ys in itertools.product(range(C), repeat=k):
        ys = list(ys)
        log_w = log_p[:, ys] - log_q[:, ys]  # (N, K)
        weight = log_q[:, ys].sum(-1).exp()  # prod_k q(y_k)
        if objective == "elbo":
            value = log_w.mean(-1)
        else:
            value = torch.logsumexp(log_w, -1) - math.log(k)
        total = total + (weight * value).sum()
    return total


@pytest.mark.parametrize(
    "kind, objective, k",
    [("onehot", "elbo", 1), ("onehot", "elbo", 3), ("onehot", "iwae", 2), ("onehot", "iwae", 3),
     ("categorical", "iwae", 3), ("categorical", "elbo", 2)],
)  # fmt: skip
def test_gradient_matches_exhaustive_enumeration(float64, kind, objective, k):
    """60 passes over X repeated 50 times: each pass's gradient / 50 averages 50 independent
    estimates, so the 60 pass-level values give the mean of 3000 and its standard error."""
    replicas, passes = 50, 60
    model, guide, locs, logits = _pair(kind, replicas)
    x = X.double()
    exact = _exact(objective, k, locs, logits, x)
    exact_grads = torch.autograd.grad(exact, [locs, logits])
    loss = make_objective(objective, num_particles=k)
    draws, values = [], []
    for _ in range(passes):
        value = -loss.differentiable_loss(model, guide, x.repeat(replicas)) / replicas
        grads = torch.autograd.grad(value, [locs, logits])
        draws.append(torch.cat([g.reshape(-1) for g in grads]))
        values.append(float(value.detach()))
    draws, values = torch.stack(draws), torch.tensor(values)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(passes)
    want = torch.cat([g.reshape(-1) for g in exact_grads])
    assert ((mean - want).abs() <= 4.5 * se + 1e-9).all(), (mean - want) / se
    # the value is the bound: its mean over draws is the exact expectation
    assert abs(float(values.mean() - exact.detach())) < 4.5 * float(values.std()) / math.sqrt(
        passes
    )


def test_baselines_reduce_the_variance_of_the_score_terms(float64):
    """VIMCO's leave-one-out baselines against none at all (K = 5, the same draws)."""
    from inference.objectives import IWAE

    model, guide, locs, logits = _pair("onehot")
    x = X.double()

    class NoBaseline(IWAE):
        def score_signal(self, log_w):
            return self.bound(log_w).expand_as(log_w)

    spreads = []
    for objective in (IWAE(num_particles=5), NoBaseline(num_particles=5)):
        pyro.set_rng_seed(3)
        grads = torch.stack([
            torch.autograd.grad(objective.differentiable_loss(model, guide, x), logits)[0]
            for _ in range(400)
        ])  # fmt: skip
        spreads.append(float(grads.std(0).mean()))
    assert spreads[0] < 0.5 * spreads[1], spreads


def test_dreg_refuses_a_discrete_guide_site(float64):
    model, guide, _, _ = _pair("onehot")
    with pytest.raises(PairError, match=r"guide site 'y' is not reparameterised.*'iwae'"):
        make_objective("dreg", num_particles=2).loss(model, guide, X.double())


def test_a_fixed_discrete_corruption_needs_no_score_term(float64):
    """A Bernoulli draw whose probabilities need no gradient (a corruption of the data) is
    not a parameter's draw: the gradient is the path one alone, as before."""
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("noise", dist.Bernoulli(torch.full_like(x, 0.5)))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("noise", dist.Bernoulli(torch.full_like(x, 0.5)))
            pyro.sample("z", dist.Normal(x / 2, scale))

    from inference.inspection import non_reparameterised_sites
    from inference.tracing import dry_traces

    guide_trace, _ = dry_traces(model, guide, (X.double(),), {})
    assert non_reparameterised_sites(guide_trace) == []
    make_objective("iwae", num_particles=3).differentiable_loss(model, guide, X.double()).backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


@pytest.mark.parametrize("kind", ["onehot", "categorical"])
def test_guide_enumeration_gives_the_exact_gradient(float64, kind):
    """Where the support is small, trace-enum-elbo sums the guide's discrete site exactly:
    the value and the gradient are the exhaustive ones, with no Monte Carlo error at all."""
    model, _, locs, logits = _pair(kind)

    def guide(x):
        with pyro.plate("data", len(x)):
            fn = dist.OneHotCategorical if kind == "onehot" else dist.Categorical
            pyro.sample("y", fn(logits=logits), infer={"enumerate": "parallel"})

    x = X.double()
    exact = _exact("elbo", 1, locs, logits, x)
    want = torch.autograd.grad(exact, [locs, logits])
    loss = make_objective("trace-enum-elbo").differentiable_loss(model, guide, x)
    got = torch.autograd.grad(-loss, [locs, logits])
    assert torch.allclose(-loss, exact, atol=1e-10)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-10)
