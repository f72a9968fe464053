"""Models elbolab did not write, in Pyro's own idioms: every number against an exact value.

Pyro-native subsampling (``pyro.plate(..., subsample_size=B)`` in model and
guide), global and local latents, nested plates, masks, discrete latents and
Pyro's autoguides. Where the guide is the exact posterior, every importance
weight equals log p(x) exactly, so a wrong replay shows as weights that vary.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from inference.bounds import elbo_bound, iwae_bound
from inference.objectives import make_objective
from inference.tracing import guess_max_plate_nesting, log_importance_weights

N, B, X_DIM, Z_DIM = 64, 8, 3, 2


def _linear_gaussian(seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(X_DIM, Z_DIM, generator=gen, dtype=torch.float64)
    loc = torch.randn(X_DIM, generator=gen, dtype=torch.float64)
    scale = 0.7
    z = torch.randn(N, Z_DIM, generator=gen, dtype=torch.float64)
    x = z @ weight.T + loc + scale * torch.randn(N, X_DIM, generator=gen, dtype=torch.float64)
    exact = dist.MultivariateNormal(
        loc, weight @ weight.T + scale**2 * torch.eye(X_DIM, dtype=torch.float64)
    ).log_prob(x)
    precision = torch.eye(Z_DIM, dtype=torch.float64) + weight.T @ weight / scale**2
    cov = torch.linalg.inv(precision)
    post_mean = (x - loc) @ weight @ cov / scale**2  # (N, Z_DIM); cov is symmetric
    return weight, loc, scale, x, exact, post_mean, cov


def _subsampled_pair(subsample_size, *, widen=1.0):
    """A user's linear-Gaussian model and guide, subsampling the Pyro way (both draw idx)."""
    weight, loc, scale, x, exact, post_mean, cov = _linear_gaussian()
    tril = torch.linalg.cholesky(cov) * widen

    def model(data):
        with pyro.plate("data", N, subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([Z_DIM]).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T + loc, scale).to_event(1), obs=data[idx])

    def guide(data):
        with pyro.plate("data", N, subsample_size=subsample_size) as idx:
            pyro.sample("z", dist.MultivariateNormal(post_mean[idx], scale_tril=tril))

    return model, guide, x, exact


def test_native_subsampling_scores_the_guides_minibatch(float64):
    model, guide, x, exact = _subsampled_pair(B)
    assert guess_max_plate_nesting(model, guide, (x,), {}) == 1
    for _ in range(20):
        log_w = log_importance_weights(model, guide, x, num_particles=5)
        assert log_w.shape == (5, B)
        # The exact posterior: every weight is log p(x_i) of the datapoint the guide drew.
        assert torch.allclose(log_w, log_w[0].expand_as(log_w), atol=1e-9)
        nearest = (log_w[0][:, None] - exact[None, :]).abs().min(1).values
        assert (nearest < 1e-9).all()
        assert len({round(float(v), 9) for v in log_w[0]}) == B  # B distinct datapoints
    # Particles drawn in chunks share one minibatch.
    log_w = log_importance_weights(model, guide, x, num_particles=6, chunk_size=2)
    assert torch.allclose(log_w, log_w[0].expand_as(log_w), atol=1e-9)
    # A caller that knows the plates skips the dry run: the same minibatch, the same weights.
    for k in (1, 4):
        torch.manual_seed(k)
        with_dry_run = log_importance_weights(model, guide, x, num_particles=k)
        torch.manual_seed(k)
        known = log_importance_weights(model, guide, x, num_particles=k, max_plate_nesting=1)
        assert torch.allclose(with_dry_run, known, rtol=0, atol=1e-12)  # float64 rounding


@pytest.mark.parametrize("objective", ["iwae", "elbo", "dreg"])
def test_mean_objective_over_native_minibatches_is_the_full_data_bound(float64, objective):
    """E over Pyro's own random minibatches of the loss = minus the full-data bound (N/B scale)."""
    k, batches = 5, 2000
    model, guide, x, _ = _subsampled_pair(B, widen=1.6)
    full_model, full_guide, _, _ = _subsampled_pair(None, widen=1.6)
    loss = make_objective(objective, num_particles=k)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        losses = torch.tensor([loss.loss(model, guide, x) for _ in range(batches)])
    mean, se = float(losses.mean()), float(losses.std() / math.sqrt(batches))
    log_w = log_importance_weights(full_model, full_guide, x, num_particles=k * 4000)
    bound = iwae_bound(log_w, k=k) if objective != "elbo" else elbo_bound(log_w)
    truth, truth_se = -float(bound.value.sum()), float(bound.stderr.pow(2).sum().sqrt())
    assert abs(mean - truth) < 4 * math.hypot(se, truth_se), (mean, se, truth, truth_se)


def test_full_plate_subsample_sites_are_replayed_too(float64):
    """A plate without subsample_size still has a subsample site; replaying it is harmless."""
    model, guide, x, exact = _subsampled_pair(None)
    log_w = log_importance_weights(model, guide, x, num_particles=3)
    assert torch.allclose(log_w, exact.expand(3, N), atol=1e-9)


# ---------------------------------------------------------------------------
# Global and local latents
# ---------------------------------------------------------------------------


def _global_local(x, *, exact_guide=True):
    """z_g ~ N(0,1), z_n ~ N(z_g,1), x_n ~ N(z_n,1): evidence N(0, 2 I + 1 1^T)."""
    n = x.shape[0]

    def model(x):
        z_g = pyro.sample("z_g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(z_g, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    # Exact posterior: x_n | z_g ~ N(z_g, 2), so z_g | x ~ N(sum(x)/2 / (1 + n/2), 1/(1 + n/2));
    # z_n | z_g, x_n ~ N((z_g + x_n)/2, 1/2).
    g_var = 1.0 / (1.0 + n / 2)
    g_mean = x.sum() / 2 * g_var
    widen = 1.0 if exact_guide else 1.5

    def guide(x):
        z_g = pyro.sample("z_g", dist.Normal(g_mean, widen * math.sqrt(g_var)))
        with pyro.plate("data", n):
            pyro.sample("z", dist.Normal((z_g + x) / 2, widen * math.sqrt(0.5)))

    cov = 2 * torch.eye(n, dtype=x.dtype) + 1.0
    exact = dist.MultivariateNormal(torch.zeros(n, dtype=x.dtype), cov).log_prob(x)
    return model, guide, float(exact)


def test_global_latent_needs_plate_none_and_then_gives_the_joint_evidence(float64):
    x = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.1], dtype=torch.float64)
    model, guide, exact = _global_local(x)
    with pytest.raises(ValueError, match=r"site 'z_g' lies outside plate 'data'.*plate=None"):
        log_importance_weights(model, guide, x, num_particles=4)
    log_w = log_importance_weights(model, guide, x, num_particles=4, plate=None)
    assert log_w.shape == (4,)
    assert torch.allclose(log_w, torch.full_like(log_w, exact), atol=1e-9)

    model, guide, exact = _global_local(x, exact_guide=False)
    log_w = log_importance_weights(model, guide, x, num_particles=20_000, plate=None)
    elbo, iwae = elbo_bound(log_w), iwae_bound(log_w)
    assert float(elbo.value) < exact - 0.05  # a loose guide: a visible gap
    assert abs(float(iwae.value) - exact) < 4 * float(iwae.stderr) + 1e-3


# ---------------------------------------------------------------------------
# Nested plates and masks
# ---------------------------------------------------------------------------


def test_feature_plate_inside_the_data_plate(float64):
    """z_n ~ N(0,1), x_nd ~ N(z_n, 1) for d in a feature plate: evidence per datapoint."""
    x = torch.tensor([[0.5, 1.0, -0.2], [2.0, 1.5, 1.0]], dtype=torch.float64)
    n, d = x.shape

    def model(x):
        with pyro.plate("data", n, dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))  # (n, 1)
            with pyro.plate("features", d, dim=-1):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    post_var = 1.0 / (1.0 + d)
    post_mean = x.sum(-1, keepdim=True) * post_var

    def guide(x):
        with pyro.plate("data", n, dim=-2):
            pyro.sample("z", dist.Normal(post_mean, math.sqrt(post_var)))

    cov = torch.eye(d, dtype=x.dtype) + 1.0
    exact = dist.MultivariateNormal(torch.zeros(d, dtype=x.dtype), cov).log_prob(x)
    log_w = log_importance_weights(model, guide, x, num_particles=3)
    assert log_w.shape == (3, n)
    assert torch.allclose(log_w, exact.expand(3, n), atol=1e-9)


def test_data_plate_inside_an_outer_plate(float64):
    """Groups g (outer) and datapoints n (inner): each datapoint's weight sums its groups."""
    x = torch.tensor([[0.5, -1.0, 0.2], [1.5, 0.3, -0.4]], dtype=torch.float64)  # (groups, n)
    groups, n = x.shape

    def model(x):
        with pyro.plate("groups", groups, dim=-2), pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("groups", groups, dim=-2), pyro.plate("data", n, dim=-1):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))

    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum(0)  # (n,)
    log_w = log_importance_weights(model, guide, x, num_particles=3)
    assert log_w.shape == (3, n)
    assert torch.allclose(log_w, exact.expand(3, n), atol=1e-9)


@pytest.mark.parametrize("how", ["poutine.mask", "Distribution.mask"])
def test_masked_observations(float64, how):
    """Masked-out observations contribute nothing: their posterior is the prior."""
    x = torch.tensor([0.4, -1.1, 2.2, 0.0], dtype=torch.float64)
    keep = torch.tensor([True, False, True, False])

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            if how == "poutine.mask":
                with poutine.mask(mask=keep):
                    pyro.sample("x", dist.Normal(z, 1.0), obs=x)
            else:
                pyro.sample("x", dist.Normal(z, 1.0).mask(keep), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            loc = torch.where(keep, x / 2, torch.zeros_like(x))
            scale = torch.where(keep, torch.full_like(x, 0.5**0.5), torch.ones_like(x))
            pyro.sample("z", dist.Normal(loc, scale))

    exact = torch.where(keep, dist.Normal(0.0, 2.0**0.5).log_prob(x), torch.zeros_like(x))
    log_w = log_importance_weights(model, guide, x, num_particles=3)
    assert torch.allclose(log_w, exact.expand(3, len(x)), atol=1e-9)


# ---------------------------------------------------------------------------
# Discrete latents sampled by the guide
# ---------------------------------------------------------------------------


def test_two_component_mixture_against_the_exact_sum_over_z(float64):
    x = torch.tensor([-2.5, -0.3, 0.4, 3.1], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    locs = torch.tensor([-2.0, 2.0], dtype=torch.float64)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    joint = weights.log() + dist.Normal(locs, 1.0).log_prob(x[:, None])  # (n, 2)
    exact = torch.logsumexp(joint, -1)

    def guide_with(probs):
        def guide(x):
            with pyro.plate("data", len(x)):
                pyro.sample("z", dist.Categorical(probs))

        return guide

    responsibilities = (joint - exact[:, None]).exp()
    log_w = log_importance_weights(model, guide_with(responsibilities), x, num_particles=50)
    assert torch.allclose(log_w, exact.expand(50, len(x)), atol=1e-9)

    uniform = torch.full((len(x), 2), 0.5, dtype=torch.float64)
    log_w = log_importance_weights(model, guide_with(uniform), x, num_particles=20_000)
    iwae = iwae_bound(log_w)
    assert ((iwae.value - exact).abs() < 4 * iwae.stderr + 1e-3).all()
    assert (elbo_bound(log_w).value < exact).all()


# ---------------------------------------------------------------------------
# Pyro's autoguides on conjugate models with closed-form evidence
# ---------------------------------------------------------------------------


def _regression():
    """Bayesian linear regression, known noise: w ~ N(0, I), y ~ N(X w, s^2 I).

    The evidence is y ~ N(0, X X^T + s^2 I).
    """
    gen = torch.Generator().manual_seed(3)
    n, p, noise = 12, 3, 0.5
    features = torch.randn(n, p, generator=gen, dtype=torch.float64)
    y = features @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = y + noise * torch.randn(n, generator=gen, dtype=torch.float64)

    def model(y):
        w = pyro.sample("w", dist.Normal(torch.zeros(p, dtype=y.dtype), 1.0).to_event(1))
        with pyro.plate("data", n):
            pyro.sample("y", dist.Normal((w * features).sum(-1), noise), obs=y)

    cov = features @ features.T + noise**2 * torch.eye(n, dtype=torch.float64)
    exact = dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(y)
    precision = torch.eye(p, dtype=torch.float64) + features.T @ features / noise**2
    post_mean = torch.linalg.solve(precision, features.T @ y / noise**2)
    return model, y, float(exact), post_mean


def _normal_normal():
    """mu ~ N(0, 1), x_i ~ N(mu, 1): x ~ N(0, I + 1 1^T)."""
    x = torch.tensor([0.8, 1.4, -0.2, 1.1, 0.6], dtype=torch.float64)
    n = len(x)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        with pyro.plate("data", n):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    cov = torch.eye(n, dtype=torch.float64) + 1.0
    exact = dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(x)
    return model, x, float(exact), (x.sum() / (n + 1)).reshape(1)


AUTOGUIDES = {
    "AutoNormal": lambda m: pyro.infer.autoguide.AutoNormal(m),
    "AutoDiagonalNormal": lambda m: pyro.infer.autoguide.AutoDiagonalNormal(m),
    "AutoMultivariateNormal": lambda m: pyro.infer.autoguide.AutoMultivariateNormal(m),
    "AutoLowRankMultivariateNormal": lambda m: pyro.infer.autoguide.AutoLowRankMultivariateNormal(
        m, rank=1
    ),
    "AutoIAFNormal": lambda m: pyro.infer.autoguide.AutoIAFNormal(m, hidden_dim=[8]),
}


def _fit(model, guide, data, steps=1000):
    """Pyro's own SVI, its step size decaying to 1/150 so that the last iterate settles."""
    pyro.set_rng_seed(0)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995})
    svi = pyro.infer.SVI(model, guide, optim, pyro.infer.Trace_ELBO())
    for _ in range(steps):
        svi.step(data)


@pytest.mark.parametrize(
    "name, problem",
    [(name, "regression") for name in AUTOGUIDES]
    # an autoregressive flow needs two latent dimensions or more: not on the one-latent model
    + [(name, "normal-normal") for name in AUTOGUIDES if name != "AutoIAFNormal"],
)
def test_autoguides_give_bounds_that_converge_to_the_evidence(float64, name, problem):
    model, data, exact, _ = _regression() if problem == "regression" else _normal_normal()
    guide = AUTOGUIDES[name](model)
    _fit(model, guide, data)
    with pytest.raises(ValueError, match="outside plate 'data'.*plate=None"):
        log_importance_weights(model, guide, data, num_particles=2)
    log_w = log_importance_weights(model, guide, data, num_particles=20_000, plate=None)
    assert log_w.shape == (20_000,)
    elbo, iwae = elbo_bound(log_w), iwae_bound(log_w)
    # ELBO = log p(x) - KL(q || p(.|x)) <= log p(x), up to its Monte Carlo error
    assert float(elbo.value) <= exact + 4 * float(elbo.stderr)
    # IWAE-20000 of a trained guide sits at log p(x) within its (delta-method) error
    assert abs(float(iwae.value) - exact) < 4 * float(iwae.stderr) + 2e-3, (iwae, exact)
    assert float(iwae.value) >= float(elbo.value) - 4 * float(elbo.stderr)


def test_autoguide_draws_match_the_exact_posterior(float64):
    """A diagnose-style comparison: the autoguide's draws against the conjugate posterior."""
    from inference import diagnostics

    model, y, _, post_mean = _regression()
    guide = AUTOGUIDES["AutoMultivariateNormal"](model)
    _fit(model, guide, y)
    tree = diagnostics.from_guide(guide, y, num_samples=4000, sites=["w"])
    draws = torch.as_tensor(tree["posterior"]["w"].values[0])  # (draw, 3)
    assert draws.shape == (4000, 3)
    se = draws.std(0) / math.sqrt(4000)
    assert ((draws.mean(0) - post_mean).abs() < 4 * se + 0.02).all()
    khat = diagnostics.psis_khat(
        log_importance_weights(model, guide, y, num_particles=4000, plate=None)
    )
    assert float(khat) < 0.7  # the trained guide is a usable proposal


def test_point_mass_guides_are_refused(float64):
    model, y, _, _ = _regression()
    guide = pyro.infer.autoguide.AutoDelta(model)
    _fit(model, guide, y, steps=50)
    for plate in ("data", None):
        with pytest.raises(ValueError, match="'w' is a point mass.*no density"):
            log_importance_weights(model, guide, y, num_particles=2, plate=plate)
    with pytest.raises(ValueError, match="point mass"):
        make_objective("iwae", num_particles=2).loss(model, guide, y)


def test_hierarchical_terms_replay_the_minibatch_too(float64):
    """gaps' estimator on a subsampling pair: with the exact posterior every term is log p(x)."""
    from inference.hierarchical import hierarchical_log_densities

    model, guide, x, exact = _subsampled_pair(B)
    terms = hierarchical_log_densities(
        model, guide, x, aux_sites=(), num_particles=4, inner_samples=(2,)
    )
    for name in ("log_w_aux", "log_w_h", "log_w_marg[2]"):
        log_w = terms[name]
        assert log_w.shape == (4, B)
        nearest = (log_w[:, :, None] - exact).abs().min(-1).values
        assert (nearest < 1e-9).all(), name


def test_a_subsampling_guide_is_evaluated_eagerly_with_one_minibatch_per_batch(float64):
    """A compiled chunk would draw a minibatch of its own; the evaluation stays eager (and says
    so), so that the chunks of a batch share the guide's one minibatch as before."""
    from inference.evaluation import evaluate_bounds

    model, guide, x, exact = _subsampled_pair(B)
    settings = dict(ks=[1, 6], batch_size=N, max_rows=2 * N, seed=0, progress=False)  # chunk 2
    with pytest.warns(RuntimeWarning, match="subsamples its data plate"):
        tried = evaluate_bounds(model, guide, x, **settings, compile=True)
    eager = evaluate_bounds(model, guide, x, **settings, compile=False)
    assert not tried["compiled"]
    assert torch.equal(tried["iwae"][6].value, eager["iwae"][6].value)
    # the exact posterior as guide: each weight is log p of the minibatch's datapoint
    nearest = (tried["iwae"][6].value[:, None] - exact[None, :]).abs().min(1).values
    assert (nearest < 1e-9).all()
