"""Bounds from log importance weights against closed-form values."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference.bounds import elbo_bound, iwae_bound, logsumexp
from inference.tracing import elbo_decomposition, log_importance_weights
from ppl_models import LinearGaussian


def make_lg(guide_type="exact", x_dim=5, z_dim=2, seed=1):
    torch.manual_seed(seed)
    lg = LinearGaussian(x_dim, z_dim, guide_type=guide_type)
    lg.set_params(weight=torch.randn(x_dim, z_dim), loc=torch.randn(x_dim), scale=0.6)
    if guide_type == "diagonal":
        # A deliberately imperfect encoder: the exact posterior mean, but diagonal and too narrow.
        with torch.no_grad():
            post = LinearGaussian(x_dim, z_dim)
            post.load_state_dict(lg.state_dict(), strict=False)
            s2 = lg.scale**2
            cov = torch.linalg.inv(torch.eye(z_dim) + lg.weight.T @ lg.weight / s2)
            a = cov @ lg.weight.T / s2
            lg.enc_weight.copy_(a)
            lg.enc_bias.copy_(-a @ lg.loc)
            target = 0.8 * cov.diagonal().sqrt()
            lg.enc_scale_raw.copy_(torch.log(torch.expm1(target - 1e-4)))
    return lg


def test_exact_guide_gives_elbo_equal_iwae_equal_log_px(float64):
    lg = make_lg("exact")
    x = lg.sample(20)
    exact = lg.log_marginal(x)
    log_w = log_importance_weights(lg.model, lg.guide, x, num_particles=50, chunk_size=16)
    assert log_w.shape == (50, 20)
    assert torch.allclose(elbo_bound(log_w).value, exact, atol=1e-6, rtol=0)
    assert torch.allclose(iwae_bound(log_w).value, exact, atol=1e-6, rtol=0)
    assert torch.allclose(iwae_bound(log_w, k=5).value, exact, atol=1e-6, rtol=0)


def test_iwae_converges_to_exact_log_px(float64):
    lg = make_lg("diagonal")
    x = lg.sample(10)
    exact = lg.log_marginal(x)
    log_w = log_importance_weights(lg.model, lg.guide, x, num_particles=20000, chunk_size=4000)
    elbo = elbo_bound(log_w)
    iwae = iwae_bound(log_w)
    # The ELBO is visibly below log p(x) (the gap is KL(q||p(z|x)) > 0) ...
    assert ((exact - elbo.value) > 5 * elbo.stderr).all()
    # ... and IWAE-20000 matches it within its Monte Carlo error (bias O(1/K) is far smaller).
    assert ((iwae.value - exact).abs() < 4 * iwae.stderr + 1e-3).all()


def test_bounds_increase_with_k_in_expectation(float64):
    lg = make_lg("diagonal")
    x = lg.sample(4)
    exact = lg.log_marginal(x)
    log_w = log_importance_weights(lg.model, lg.guide, x, num_particles=64 * 400)
    # Disjoint groups give independent IWAE-k estimates; their means estimate E[IWAE_k].
    means = {}
    for k in (1, 4, 16, 64):
        bound = iwae_bound(log_w, k=k)
        means[k] = (bound.value, bound.stderr)
    elbo = elbo_bound(log_w)
    assert torch.allclose(means[1][0], elbo.value)
    for small, large in ((1, 4), (4, 16), (16, 64)):
        diff = means[large][0] - means[small][0]
        assert (diff > -3 * (means[large][1] + means[small][1])).all()
        assert diff.mean() > 0
    assert (means[64][0] <= exact + 3 * means[64][1]).all()


def test_iwae_groups_match_a_manual_computation():
    log_w = torch.randn(12, 3)
    bound = iwae_bound(log_w, k=4)
    groups = log_w.reshape(3, 4, 3)
    manual = (torch.logsumexp(groups, 1) - math.log(4)).mean(0)
    assert torch.allclose(bound.value, manual)
    assert torch.allclose(iwae_bound(log_w, k=1).stderr, elbo_bound(log_w).stderr)
    with pytest.raises(ValueError, match="k must be"):
        iwae_bound(log_w, k=13)


def test_logsumexp_handles_minus_infinity():
    inf = math.inf
    log_w = torch.tensor([[-inf, -inf, 0.0], [-inf, 1.0, 0.0]])
    out = logsumexp(log_w, 0)
    assert out[0] == -inf
    assert torch.allclose(out[1:], torch.logsumexp(log_w[:, 1:], 0))
    assert not torch.isnan(iwae_bound(log_w).value).any()
    assert not torch.isnan(elbo_bound(log_w).value).any()
    assert iwae_bound(log_w).value[0] == -inf
    assert elbo_bound(log_w).value[1] == -inf
    big = torch.tensor([1000.0, 1000.0])
    assert torch.allclose(logsumexp(big, 0), torch.tensor(1000.0 + math.log(2)))


def test_impossible_draws_give_minus_infinity_not_nan():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Uniform(z - 0.5, z + 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0))

    x = torch.tensor([0.0, 100.0])
    # Uniform's support check would raise; this test is about what happens past it.
    with pyro.validation_enabled(False):
        log_w = log_importance_weights(model, guide, x, num_particles=200)
    assert not torch.isnan(log_w).any()
    assert torch.isinf(log_w).any() and torch.isfinite(log_w[:, 0]).any()
    bound = iwae_bound(log_w)
    assert torch.isfinite(bound.value[0]) and not torch.isnan(bound.value).any()


def test_log_weights_of_a_foreign_conjugate_model(float64):
    """A model elbolab did not define: mu ~ N(0, 1), x_i ~ N(mu, 1); evidence in closed form."""
    x = torch.tensor([0.3, -1.2, 2.0, 0.7])
    n = x.numel()

    def model(x, scale=1.0):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", n):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    post_var = 1.0 / (1.0 + n)

    def guide(x, scale=1.0):
        pyro.sample("mu", dist.Normal(x.sum() * post_var, scale * math.sqrt(post_var)))

    evidence = dist.MultivariateNormal(torch.zeros(n), torch.eye(n) + torch.ones(n, n)).log_prob(x)
    exact_w = log_importance_weights(model, guide, x, num_particles=10)
    assert exact_w.shape == (10,)  # no plate named "data": one weight per particle
    assert torch.allclose(exact_w, evidence.expand(10), atol=1e-8)
    log_w = log_importance_weights(model, guide, x, 1.3, num_particles=20000, chunk_size=5000)
    bound = iwae_bound(log_w)
    assert abs(bound.value - evidence) < 4 * bound.stderr + 1e-3
    assert elbo_bound(log_w).value < evidence


def test_local_latent_foreign_model_per_datapoint(float64):
    """z_n ~ N(0, 1), x_n ~ N(z_n, s^2): log p(x_n) = N(x_n; 0, 1 + s^2), guide = posterior."""
    s = 0.5
    x = torch.linspace(-2, 2, 7)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, s), obs=x)

    def guide(x):
        var = s**2 / (1 + s**2)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / (1 + s**2), math.sqrt(var)))

    log_w = log_importance_weights(model, guide, x, num_particles=30)
    assert log_w.shape == (30, 7)
    exact = dist.Normal(0.0, math.sqrt(1 + s**2)).log_prob(x)
    assert torch.allclose(log_w, exact.expand(30, 7), atol=1e-10)


def test_global_site_with_data_plate_is_an_error():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="outside plate 'data'"):
        log_importance_weights(model, guide, torch.zeros(3), num_particles=2)
    assert log_importance_weights(
        model, guide, torch.zeros(3), num_particles=2, plate=None
    ).shape == (2,)


def test_missing_guide_site_is_an_error():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match="guide does not sample it"):
        log_importance_weights(model, lambda x: None, torch.zeros(3), num_particles=2)


def test_decomposition_closed_form(float64):
    lg = make_lg("diagonal")
    x = lg.sample(6)
    parts = elbo_decomposition(lg.model, lg.guide, x, num_particles=4000)
    assert parts["kl_analytic"]
    q = lg.posterior(x)
    prior = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    kl = torch.distributions.kl_divergence(q, prior)
    assert torch.allclose(parts["kl"], kl)
    assert torch.allclose(parts["entropy"], q.entropy())
    assert torch.allclose(parts["cross_entropy"], parts["kl"] + parts["entropy"])
    # ELBO from the decomposition vs mean log weights, and gap = KL(q || p(z|x)) in closed form.
    log_w = log_importance_weights(lg.model, lg.guide, x, num_particles=4000)
    elbo = elbo_bound(log_w)
    tol = 5 * elbo.stderr + 0.05
    assert ((parts["elbo"] - elbo.value).abs() < tol).all()
    post = lg.exact_posterior(x)
    q_full = dist.MultivariateNormal(q.mean, torch.diag_embed(q.variance))
    gap = torch.distributions.kl_divergence(q_full, post)
    assert ((lg.log_marginal(x) - elbo.value - gap).abs() < 5 * elbo.stderr).all()


def test_fast_bernoulli_matches_pyro_bernoulli(float64):
    import pyro.distributions as dist

    from ppl_models.vae import BernoulliLogits

    logits = torch.cat([torch.linspace(-40, 40, 81), torch.tensor([0.0, 1e-8, -1e-8])])
    for value in (torch.zeros_like(logits), torch.ones_like(logits)):
        ours = BernoulliLogits(logits).log_prob(value)
        theirs = dist.Bernoulli(logits=logits).log_prob(value)
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-6)
    x = (torch.rand(3, 5) < 0.5).double()
    wide = BernoulliLogits(torch.randn(4, 3, 5)).to_event(1)
    assert wide.log_prob(x).shape == (4, 3)
    assert isinstance(BernoulliLogits(torch.zeros(3)).expand((2, 3)), BernoulliLogits)
    trainable = torch.randn(4, 3, 5, requires_grad=True)  # the autograd path
    ours = BernoulliLogits(trainable).to_event(1).log_prob(x)
    ours.sum().backward()
    assert torch.allclose(trainable.grad, (x - torch.sigmoid(trainable)).detach())
    narrow = BernoulliLogits(torch.randn(5))  # value with more dims than the logits
    assert torch.allclose(
        narrow.log_prob(x), dist.Bernoulli(logits=narrow.logits).log_prob(x), atol=1e-12
    )
    assert torch.allclose(
        wide.log_prob(x), dist.Bernoulli(logits=wide.base_dist.logits).to_event(1).log_prob(x)
    )
