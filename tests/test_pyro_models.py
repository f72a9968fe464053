"""Right or refused: models written the way Pyro's examples and test suite write them.

Each class of model that once gave a silently wrong number or a traceback
(issue 28) is here, against an exact value (closed form or quadrature) or
refused in one line that names the site and says what to do.
"""

import itertools
import math
import re
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal
from pyro.ops.indexing import Vindex

from inference.ais import annealed_log_marginal, bdmc, bdmc_joint
from inference.bounds import elbo_bound, iwae_bound
from inference.diagnostics import psis_khat
from inference.evaluation import evaluate_bounds
from inference.inspection import PairError
from inference.objectives import make_objective
from inference.tracing import log_importance_weights

# ---------------------------------------------------------------------------
# Eight schools (Pyro's examples/eight_schools/mcmc.py): no plate, batch in the shapes
# ---------------------------------------------------------------------------

J = 8
Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def schools(sigma, y=None):
    eta = pyro.sample("eta", dist.Normal(torch.zeros(J), torch.ones(J)))
    mu = pyro.sample("mu", dist.Normal(torch.zeros(1), 10 * torch.ones(1)))
    tau = pyro.sample("tau", dist.HalfCauchy(scale=25 * torch.ones(1)))
    theta = mu + tau * eta
    return pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def _schools_evidence(y=Y):
    """log p(y) by quadrature over tau: y | tau ~ N(0, 100 11^T + diag(sigma^2 + tau^2))."""
    from scipy import integrate

    y, sigma = torch.tensor(y, dtype=torch.float64), torch.tensor(SIGMA, dtype=torch.float64)

    def log_f(tau):
        cov = 100 * torch.ones(J, J, dtype=torch.float64) + torch.diag(sigma**2 + tau**2)
        tau = torch.tensor(tau, dtype=torch.float64)
        return float(
            dist.MultivariateNormal(torch.zeros(J, dtype=torch.float64), cov).log_prob(y)
            + dist.HalfCauchy(25.0).log_prob(tau)
        )

    shift = log_f(5.0)
    value, _ = integrate.quad(lambda t: math.exp(log_f(t) - shift), 0, math.inf, limit=200)
    return shift + math.log(value)


def _fit(model, guide, *args, steps=600, loss=None, **kwargs):
    pyro.set_rng_seed(0)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995})
    svi = pyro.infer.SVI(model, guide, optim, loss or pyro.infer.Trace_ELBO())
    for _ in range(steps):
        svi.step(*args, **kwargs)


@pytest.fixture(scope="module")
def fitted_schools():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        guide = AutoNormal(schools)
        sigma, y = torch.tensor(SIGMA), torch.tensor(Y)
        # Pyro's Trace_ELBO needs max_plate_nesting for batch dims without a plate; elbolab's
        # ELBO with plate=None finds them in its dry run.
        _fit(schools, guide, sigma, y=y, loss=make_objective("elbo", num_particles=4, plate=None))
        evidence = _schools_evidence()
    finally:
        torch.set_default_dtype(old)
    yield guide, sigma, y, evidence
    pyro.clear_param_store()


def test_plateless_model_gives_joint_bounds_at_the_quadrature_evidence(float64, fitted_schools):
    guide, sigma, y, exact = fitted_schools
    log_w = log_importance_weights(schools, guide, sigma, y=y, num_particles=20_000, plate=None)
    assert log_w.shape == (20_000,)
    elbo, iwae = elbo_bound(log_w), iwae_bound(log_w)
    assert float(elbo.value) < exact - 0.1  # a mean-field guide on a funnel: a visible gap
    assert float(psis_khat(log_w)) < 0.7
    assert abs(float(iwae.value) - exact) < 4 * float(iwae.stderr) + 0.02, (iwae, exact)


def test_ais_from_an_autoguide_moves_in_its_unconstrained_space(float64, fitted_schools):
    """The HalfCauchy scale has support (0, inf); AutoNormal's chains move its log."""
    guide, sigma, y, exact = fitted_schools
    pyro.set_rng_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "chains barely moved" warning
        est = annealed_log_marginal(
            schools, guide, sigma, y=y, num_chains=16, num_temperatures=100, plate=None,
            compile=False,
        )  # fmt: skip
    assert float(est.acceptance.mean()) > 0.5
    assert abs(float(est.value) - exact) < 4 * float(est.stderr) + 0.02, (est.value, exact)


def test_bdmc_from_an_autoguide_brackets_the_evidence_of_simulated_schools(float64, fitted_schools):
    """Reverse AIS starts from the simulated latents mapped into AutoNormal's auxiliary space."""
    guide, sigma, y, _ = fitted_schools
    pyro.set_rng_seed(3)
    result = bdmc_joint(schools, guide, sigma, y=y, num_chains=16, num_temperatures=200,
                        compile=False)  # fmt: skip
    exact = _schools_evidence(result["observed"]["obs"].reshape(-1).tolist())
    lower, upper = result["lower"], result["upper"]
    assert float(lower.value) <= exact + 4 * float(lower.stderr) + 0.02, (lower, exact)
    assert float(upper.value) >= exact - 4 * float(upper.stderr) - 0.02, (upper, exact)


def test_bdmc_from_a_guide_of_unknown_auxiliary_draws_is_refused_in_one_line(float64):
    def guide(y):
        log_tau = pyro.sample("log_tau", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
        pyro.sample("mu", dist.Normal(0.0, 5.0))
        pyro.sample("tau", dist.Delta(log_tau.exp(), log_density=-log_tau))
        with pyro.plate("schools", J):
            pyro.sample("theta", dist.Normal(0.0, 10.0))

    y = torch.tensor(Y)
    with pytest.raises(PairError, match=r"reverse AIS cannot start from the exact posterior"):
        bdmc(centred_schools, guide, y, num_points=1, num_chains=2, num_temperatures=2,
             plate=None)  # fmt: skip


# ---------------------------------------------------------------------------
# A point mass among densities: AutoGuideList(AutoDelta, AutoNormal)
# ---------------------------------------------------------------------------


def centred_schools(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("data", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, torch.tensor(SIGMA)), obs=y)


def test_a_map_part_beside_a_density_part_is_refused(float64):
    y = torch.tensor(Y)
    guide = AutoGuideList(centred_schools)
    guide.append(AutoDelta(poutine.block(centred_schools, expose=["mu"])))
    guide.append(AutoNormal(poutine.block(centred_schools, hide=["mu"])))
    _fit(centred_schools, guide, y, steps=20)
    message = r"guide site 'mu' is a point mass \(Delta, as AutoDelta draws\).*AutoNormal"
    with pytest.raises(PairError, match=message):
        log_importance_weights(centred_schools, guide, y, num_particles=3, plate=None)
    with pytest.raises(PairError, match=message):
        make_objective("iwae", num_particles=2, plate=None).loss(centred_schools, guide, y)
    with pytest.raises(PairError, match=message):
        annealed_log_marginal(centred_schools, guide, y, num_chains=2, num_temperatures=2,
                              plate=None)  # fmt: skip
    # AutoNormal alone, the same sites: its Deltas transform auxiliary draws, a density
    alone = AutoNormal(centred_schools)
    _fit(centred_schools, alone, y, steps=20)
    assert torch.isfinite(log_importance_weights(centred_schools, alone, y, num_particles=3,
                                                 plate=None)).all()  # fmt: skip


# ---------------------------------------------------------------------------
# A global latent with Pyro-native subsampling
# ---------------------------------------------------------------------------

N, B = 40, 8


def _global_subsampled():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, generator=gen, dtype=torch.float64) + 1.0
    post_var = 1.0 / (1 + N)
    loc, scale = float(x.sum()) * post_var, 1.6 * math.sqrt(post_var)  # a loose guide

    def model(x, subsample_size=B):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N, subsample_size=subsample_size) as idx:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])

    def guide(x, subsample_size=B):
        pyro.sample("mu", dist.Normal(loc, scale))

    cov = torch.eye(N, dtype=torch.float64) + 1.0
    exact = float(dist.MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov).log_prob(x))
    return model, guide, x, exact


def test_log_mean_bounds_of_a_subsampled_global_model_are_refused(float64):
    model, guide, x, exact = _global_subsampled()
    message = r"site 'x' carries scale 5 \(plate 'data' subsamples 8 of 40 datapoints\)"
    with pytest.raises(PairError, match=message):
        log_importance_weights(model, guide, x, num_particles=10, plate=None)
    for name in ("iwae", "dreg"):
        with pytest.raises(PairError, match=message):
            make_objective(name, num_particles=3, plate=None).loss(model, guide, x)
    with pytest.raises(PairError, match=message):
        annealed_log_marginal(model, guide, x, num_chains=2, num_temperatures=2, plate=None)
    # the per-datapoint form says where to go, and that advice can be followed
    with pytest.raises(PairError, match=r"site 'mu' lies outside plate 'data'.*plate=None"):
        make_objective("elbo", num_particles=3).loss(model, guide, x)
    # on the full data the joint IWAE is the evidence
    log_w = log_importance_weights(model, guide, x, subsample_size=None, num_particles=20_000,
                                   plate=None)  # fmt: skip
    iwae = iwae_bound(log_w)
    assert abs(float(iwae.value) - exact) < 4 * float(iwae.stderr) + 1e-3


def test_the_plate_scaled_elbo_of_minibatches_is_the_full_data_elbo(float64):
    model, guide, x, _ = _global_subsampled()
    loss = make_objective("elbo", num_particles=2, plate=None)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        losses = torch.tensor([loss.loss(model, guide, x) for _ in range(3000)])
    mean, se = float(losses.mean()), float(losses.std()) / math.sqrt(len(losses))
    full = elbo_bound(log_importance_weights(model, guide, x, subsample_size=None,
                                             num_particles=50_000, plate=None))  # fmt: skip
    assert abs(mean + float(full.value)) < 4 * math.hypot(se, float(full.stderr))

    # and it trains: Pyro's SVI with it moves the global latent's guide to the posterior
    def trainable(x, subsample_size=B):
        pyro.sample("mu", dist.Normal(pyro.param("q_loc", torch.tensor(0.0)), 0.15))

    _fit(model, trainable, x, steps=400, loss=loss)
    assert abs(pyro.param("q_loc").item() - float(x.sum()) / (1 + N)) < 0.05


# ---------------------------------------------------------------------------
# pyro.plate("data") without a size; networks that do not broadcast (ss_vae_M2)
# ---------------------------------------------------------------------------

X_DIM, Z_DIM, C = 4, 2, 3


class LinearM2(torch.nn.Module):
    """ss_vae_M2 as Pyro writes it, with linear-Gaussian decoding so that log p(x) is exact.

    p(y) = Cat(1/C), p(z) = N(0, I), p(x | y, z) = N(W [z, y] + b, s^2 I), so
    x | y ~ N(W_y y + b, W_z W_z^T + s^2 I). The networks concatenate along
    dim 1 (``torch.cat([xs, ys], dim=1)``), so they do not broadcast over a
    leading particle dimension; the data plate has no size.
    """

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.decoder = torch.nn.Linear(Z_DIM + C, X_DIM)
        with torch.no_grad():
            self.decoder.weight.copy_(torch.randn(X_DIM, Z_DIM + C, generator=gen) * 1.5)
            self.decoder.bias.copy_(torch.randn(X_DIM, generator=gen))
        self.encoder_y = torch.nn.Linear(X_DIM, C)
        self.encoder_z = torch.nn.Linear(X_DIM + C, 2 * Z_DIM)
        self.noise = 0.6

    def model(self, xs):
        pyro.module("ss_vae", self)
        batch = xs.size(0)
        with pyro.plate("data"):
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(batch, Z_DIM), 1.0).to_event(1))
            ys = pyro.sample("y", dist.OneHotCategorical(xs.new_ones(batch, C) / C))
            loc = self.decoder(torch.cat([zs, ys], dim=1))
            pyro.sample("x", dist.Normal(loc, self.noise).to_event(1), obs=xs)

    def guide(self, xs):
        with pyro.plate("data"):
            alpha = torch.softmax(self.encoder_y(xs), -1)
            ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            out = self.encoder_z(torch.cat([xs, ys], dim=1))
            loc, scale = out[..., :Z_DIM], torch.nn.functional.softplus(out[..., Z_DIM:]) + 0.1
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def log_marginal(self, xs):
        w = self.decoder.weight
        w_z, w_y = w[:, :Z_DIM], w[:, Z_DIM:]
        cov = w_z @ w_z.T + self.noise**2 * torch.eye(X_DIM, dtype=xs.dtype)
        means = w_y.T + self.decoder.bias  # (C, X_DIM)
        log_px_y = dist.MultivariateNormal(means, cov).log_prob(xs[:, None, :])  # (N, C)
        return torch.logsumexp(log_px_y - math.log(C), -1)


def test_ss_vae_m2_is_evaluated_one_particle_at_a_time_against_the_exact_evidence(float64):
    m2 = LinearM2().double()
    xs = torch.randn(6, X_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = m2.log_marginal(xs).detach()
    with pytest.warns(RuntimeWarning, match="does not broadcast.*one at a time"):
        log_w = log_importance_weights(m2.model, m2.guide, xs, num_particles=3000)
    assert log_w.shape == (3000, 6)
    iwae = iwae_bound(log_w)
    assert ((iwae.value - exact).abs() < 4 * iwae.stderr + 0.02).all(), (iwae.value, exact)
    assert (elbo_bound(log_w).value < exact).all()
    # trained with the IWAE objective (VIMCO for y), as Pyro's SVI runs it
    pyro.clear_param_store()
    with pytest.warns(RuntimeWarning, match="one at a time"):
        _fit(m2.model, m2.guide, xs, steps=3, loss=make_objective("iwae", num_particles=2))
    with pytest.raises(PairError, match="does not broadcast.*objectives evaluate such a pair"):
        make_objective("dreg", num_particles=2).loss(m2.model, m2.guide, xs)


def test_looped_and_vectorised_particles_give_the_same_weights(float64):
    """With the exact posterior as guide every weight is log p(x_i): any mix-up shows."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, dtype=torch.float64, generator=gen)

    def model(x):
        with pyro.plate("data"):  # no size: Pyro infers it
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data"):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))

    def unbroadcast_model(x):  # written for one sample: z.view(x.shape)
        with pyro.plate("data"):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z.view(x.shape), 1.0), obs=x)

    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    vectorised = log_importance_weights(model, guide, x, num_particles=4)
    with pytest.warns(RuntimeWarning, match="one at a time"):
        looped = log_importance_weights(unbroadcast_model, guide, x, num_particles=4)
    assert torch.allclose(vectorised, exact.expand(4, 5), atol=1e-12)
    assert torch.allclose(looped, vectorised, atol=1e-12)


def test_a_sizeless_plate_in_evaluation_and_ais(float64):
    x = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)

    def model(x):
        with pyro.plate("data"):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data"):
            pyro.sample("z", dist.Normal(x / 3, 0.9))

    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    result = evaluate_bounds(model, guide, x, ks=[1, 2000], batch_size=2, progress=False,
                             seed=0, compile=False)  # fmt: skip
    iwae = result["iwae"][2000]
    assert iwae.value.shape == (4,)
    assert ((iwae.value - exact).abs() < 4 * iwae.stderr + 1e-3).all()
    est = annealed_log_marginal(model, guide, x, num_chains=16, num_temperatures=50,
                                compile=False)  # fmt: skip
    assert ((est.value - exact).abs() < 4 * est.stderr + 0.01).all()


# ---------------------------------------------------------------------------
# Enumerated discrete latents (config_enumerate), summed out as TraceEnum_ELBO does
# ---------------------------------------------------------------------------


@pyro.infer.config_enumerate
def gmm(x):
    """Pyro's GMM idiom (Vindex, a global latent, an enumerated assignment per datapoint)."""
    locs = pyro.sample("locs", dist.Normal(torch.tensor([-2.0, 2.0]), 1.0).to_event(1))
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(torch.tensor([0.3, 0.7])))
        pyro.sample("x", dist.Normal(Vindex(locs)[..., c], 1.0), obs=x)


def _gmm_evidence(x):
    """Sum over all 2^N assignments A: x | A ~ N(A m, I + A A^T)."""
    terms = []
    for a in itertools.product([0, 1], repeat=len(x)):
        onehot = torch.nn.functional.one_hot(torch.tensor(a), 2).double()
        cov = torch.eye(len(x), dtype=torch.float64) + onehot @ onehot.T
        mean = onehot @ torch.tensor([-2.0, 2.0], dtype=torch.float64)
        prior = torch.tensor([0.3, 0.7], dtype=torch.float64).log()[list(a)].sum()
        terms.append(prior + dist.MultivariateNormal(mean, cov).log_prob(x))
    return float(torch.logsumexp(torch.stack(terms), 0))


def test_an_enumerated_mixture_gets_its_elbo_and_iwae(float64):
    x = torch.tensor([-2.1, -1.5, 0.2, 1.8, 2.5, 3.0])
    exact = _gmm_evidence(x)
    guide = AutoNormal(poutine.block(gmm, hide=["c"]))
    _fit(gmm, guide, x, steps=300, loss=pyro.infer.TraceEnum_ELBO(max_plate_nesting=1))
    log_w = log_importance_weights(gmm, guide, x, num_particles=20_000, plate=None)
    iwae, elbo = iwae_bound(log_w), elbo_bound(log_w)
    assert float(psis_khat(log_w)) < 0.7
    assert abs(float(iwae.value) - exact) < 4 * float(iwae.stderr) + 2e-3, (iwae, exact)
    # the ELBO is TraceEnum_ELBO's: the same expectation
    pyro.set_rng_seed(4)
    theirs = torch.tensor([
        -pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(gmm, guide, x) for _ in range(1000)
    ])  # fmt: skip
    se = math.hypot(float(theirs.std()) / math.sqrt(1000), float(elbo.stderr))
    assert abs(float(theirs.mean()) - float(elbo.value)) < 4 * se
    assert float(elbo.value) < exact


def _local_mixture(feature_plate: bool):
    """c_n enumerated (and z_n from the guide): per-datapoint evidence in closed form."""
    mus = torch.tensor([-1.5, 2.0], requires_grad=True)
    weights = torch.tensor([0.4, 0.6])

    @pyro.infer.config_enumerate
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2 if feature_plate else -1):
            c = pyro.sample("c", dist.Categorical(weights))
            if feature_plate:  # no continuous latent: x_nd ~ N(mu_c, 1), d in a feature plate
                with pyro.plate("features", x.shape[1], dim=-1):
                    pyro.sample("x", dist.Normal(Vindex(mus)[..., c], 1.0), obs=x)
            else:
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
                pyro.sample("x", dist.Normal(z + Vindex(mus)[..., c], 1.0), obs=x)

    def guide(x):
        if not feature_plate:
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(x / 3, 0.8))

    def exact(x):
        if feature_plate:
            per_c = dist.Normal(mus, 1.0).log_prob(x[..., None]).sum(-2)  # (N, 2)
        else:
            per_c = dist.Normal(mus, math.sqrt(2.0)).log_prob(x[:, None])
        return torch.logsumexp(per_c + weights.log(), -1)

    return model, guide, mus, exact


def test_enumeration_nested_in_plates_against_the_closed_form(float64):
    model, guide, mus, exact = _local_mixture(feature_plate=True)
    x = torch.tensor([[0.1, -0.4, 0.3], [2.2, 1.7, 2.9], [0.5, 0.8, -0.1]])
    # no latent left for the guide: every weight is log p(x_n), summed over c exactly
    log_w = log_importance_weights(model, guide, x, num_particles=3)
    assert log_w.shape == (3, 3)
    assert torch.allclose(log_w, exact(x).detach().expand(3, 3), atol=1e-10)
    # the objective's value and gradient are TraceEnum_ELBO's, exactly
    ours = make_objective("elbo").differentiable_loss(model, guide, x)
    grad = torch.autograd.grad(ours, mus)[0]
    theirs = pyro.infer.TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(model, guide, x)
    assert torch.allclose(ours, theirs, atol=1e-10)
    assert torch.allclose(grad, torch.autograd.grad(theirs, mus)[0], atol=1e-10)


def test_a_local_enumerated_site_beside_a_guide_latent(float64):
    model, guide, _, exact = _local_mixture(feature_plate=False)
    x = torch.tensor([-1.8, 0.3, 2.6, 1.1])
    want = exact(x).detach()
    result = evaluate_bounds(model, guide, x, ks=[1, 5000], batch_size=2, progress=False,
                             seed=0, compile=False)  # fmt: skip
    iwae, elbo = result["iwae"][5000], result["elbo"]
    assert ((iwae.value - want).abs() < 4 * iwae.stderr + 2e-3).all()
    assert (elbo.value < want).all()
    dec = result["decomposition"]  # log p(x | z) with c summed out, and KL to the marginal p(z)
    assert not result["kl_analytic"]
    assert torch.allclose(dec["reconstruction"] - dec["kl"], dec["elbo"])
    assert ((dec["elbo"] - elbo.value).abs() < 4 * elbo.stderr * math.sqrt(5000 / 100)).all()
    assert (dec["kl"] > -0.05).all()  # a KL, estimated by Monte Carlo with 100 draws


def test_ais_sums_enumerated_sites_out_of_its_target(float64):
    """As Pyro's HMC does: the chains move the continuous latents, c is summed exactly."""
    model, guide, _, exact = _local_mixture(feature_plate=False)
    x = torch.tensor([-1.8, 0.3, 2.6, 1.1])
    want = exact(x).detach()
    for start, pair_guide in (("guide", guide), ("prior", None)):
        est = annealed_log_marginal(model, pair_guide, x, num_chains=16, num_temperatures=100,
                                    initial=start, compile=False)  # fmt: skip
        assert ((est.value - want).abs() < 4 * est.stderr + 0.01).all(), (start, est.value, want)
    result = bdmc(model, guide, x, num_points=4, num_chains=16, num_temperatures=100,
                  compile=False)  # fmt: skip
    assert (result["gap"].abs() < 0.15).all()
    # a global location beside the enumerated assignments, from the fitted autoguide
    x = torch.tensor([-2.1, -1.5, 0.2, 1.8, 2.5, 3.0])
    gmm_guide = AutoNormal(poutine.block(gmm, hide=["c"]))
    _fit(gmm, gmm_guide, x, steps=300, loss=pyro.infer.TraceEnum_ELBO(max_plate_nesting=1))
    est = annealed_log_marginal(gmm, gmm_guide, x, num_chains=16, num_temperatures=100,
                                plate=None, compile=False)  # fmt: skip
    assert abs(float(est.value) - _gmm_evidence(x)) < 4 * float(est.stderr) + 0.01


def test_an_enumerated_site_is_refused_where_it_cannot_be_summed_out(float64):
    x = torch.tensor([-1.8, 0.3])

    def sequential(x):
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "sequential"})
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(PairError, match=r"'c' is marked for 'sequential' enumeration"):
        log_importance_weights(sequential, lambda x: None, x, num_particles=2)


# ---------------------------------------------------------------------------
# The same classes through the elbolab command: a number or one line, never a traceback
# ---------------------------------------------------------------------------

MODELS = Path(__file__).resolve().parent / "pyro_style_models.py"
TINY = ["--data", "digits", "--epochs", "2", "--batch-size", "256", "--num-particles", "2",
        "--no-progress"]  # fmt: skip


def _one_line(capsys, code):
    captured = capsys.readouterr()
    assert code == 1 and captured.err.startswith("elbolab: error: "), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


def test_the_command_trains_and_evaluates_ss_vae_m2_and_refuses_what_it_cannot(tmp_path, capsys):
    import json

    from inference.commands.cli import main

    run = tmp_path / "m2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "one particle at a time", tested above
        assert main(["train", "--model", f"{MODELS}:m2", "--objective", "iwae", "--out",
                     str(run), *TINY]) == 0  # fmt: skip
        assert main(["evaluate", str(run), "--k", "1,20", "--limit", "30", "--no-progress"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["elbo"]["mean"] <= report["iwae"]["20"]["mean"] + 3 * report["elbo"]["stderr"]
    capsys.readouterr()
    # what runs its chains or particles vectorised says so, in one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        err = _one_line(capsys, main(["gaps", str(run), "--k", "5", "--limit", "4",
                                      "--no-progress"]))  # fmt: skip
    assert "does not broadcast over a leading particle dimension" in err
    err = _one_line(capsys, main(["diagnose", str(run), "--points", "1", "--chains", "1",
                                  "--samples", "5", "--warmup", "5", "--no-progress"]))  # fmt: skip
    assert "Pyro's NUTS could not run" in err
    # an enumerated site: trained and evaluated with it summed out; gaps does not yet
    run = tmp_path / "enumerated"
    assert main(["train", "--model", f"{MODELS}:enumerated", "--objective", "iwae", "--out",
                 str(run), *TINY]) == 0  # fmt: skip
    assert main(["evaluate", str(run), "--k", "1,20", "--limit", "30", "--ais", "--ais-chains",
                 "4", "--ais-temperatures", "20", "--no-progress"]) == 0  # fmt: skip
    report = json.loads((run / "eval.json").read_text())
    assert report["elbo"]["mean"] <= report["iwae"]["20"]["mean"] + 3 * report["elbo"]["stderr"]
    assert not report["kl_analytic"]
    assert report["ais"]["acceptance"] > 0.5  # c summed out of AIS's target too
    assert abs(report["ais"]["mean"] - report["iwae"]["20"]["mean"]) < 1.0
    # NUTS (Pyro's, enumerating c itself) against the guide's z
    assert main(["diagnose", str(run), "--points", "1", "--chains", "1", "--samples", "30",
                 "--warmup", "30", "--num-particles", "50", "--no-progress"]) == 0  # fmt: skip
    assert json.loads((run / "diagnose.json").read_text())["site"] == "z"
    capsys.readouterr()
    err = _one_line(capsys, main(["gaps", str(run), "--k", "5", "--limit", "4",
                                  "--no-progress"]))  # fmt: skip
    assert "model site 'c' is enumerated" in err and "elbolab evaluate does" in err
    cases = {
        "map_encoder": r"guide site 'z' is a point mass",
        "global_scale": r"site 's' lies in no plate, not in pyro.plate\('data'\).*global",
        "no_plate": r"site 'z' lies in no plate, not in pyro.plate\('data'\)",
    }
    for factory, message in cases.items():
        for objective in ("elbo", "iwae"):
            err = _one_line(capsys, main(["train", "--model", f"{MODELS}:{factory}", "--objective",
                                          objective, "--out", str(tmp_path / factory),
                                          "--overwrite", *TINY]))  # fmt: skip
            assert re.search(message, err), err


# ---------------------------------------------------------------------------
# A small deep Markov model (Pyro's examples/dmm.py, linear-Gaussian so that log p(x) is exact)
# ---------------------------------------------------------------------------


def test_a_ragged_markov_model_against_the_gaussian_evidence(float64):
    """dmm.py's structure: plate "z_minibatch", pyro.markov over time, masks for ragged lengths.

    z_1 ~ N(0, 1), z_t ~ N(0.8 z_{t-1}, 0.5^2), x_t ~ N(b z_t, 0.7^2 I): the observed steps of
    a sequence are jointly Gaussian. Masked steps (after a sequence's length) count nowhere.
    """
    gen = torch.Generator().manual_seed(7)
    t_max, lengths, b = 4, torch.tensor([4, 2, 3]), torch.tensor([1.0, -0.5])
    x = torch.randn(3, t_max, 2, generator=gen, dtype=torch.float64)
    mask = torch.arange(t_max)[None, :] < lengths[:, None]  # (3, T)

    def model(batch, mask):
        with pyro.plate("z_minibatch", len(batch)):
            z_prev = batch.new_zeros(len(batch), 1)
            for t in pyro.markov(range(1, t_max + 1)):
                loc, scale = (0.8 * z_prev, 0.5) if t > 1 else (z_prev, 1.0)
                z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).mask(mask[:, t - 1 : t])
                                .to_event(1))  # fmt: skip
                pyro.sample(f"obs_x_{t}", dist.Normal(z * b, 0.7).mask(mask[:, t - 1 : t])
                            .to_event(1), obs=batch[:, t - 1, :])  # fmt: skip
                z_prev = z

    def guide(batch, mask):
        with pyro.plate("z_minibatch", len(batch)):
            z_prev = batch.new_zeros(len(batch), 1)
            for t in pyro.markov(range(1, t_max + 1)):
                loc = 0.5 * z_prev + 0.4 * (batch[:, t - 1, :] * b).sum(-1, keepdim=True)
                z_prev = pyro.sample(f"z_{t}", dist.Normal(loc, 0.8).mask(mask[:, t - 1 : t])
                                     .to_event(1))  # fmt: skip

    steps = torch.arange(t_max, dtype=torch.float64)
    # AR(1): Var z_1 = 1, Var z_t = 0.64 Var z_{t-1} + 0.25, Cov(z_s, z_t) = 0.8^(t-s) Var z_s
    var = [1.0]
    for _ in range(t_max - 1):
        var.append(0.64 * var[-1] + 0.25)
    var = torch.tensor(var, dtype=torch.float64)
    lag = (steps[:, None] - steps[None, :]).abs()
    first = torch.minimum(steps[:, None], steps[None, :]).long()
    cov_z = 0.8**lag * var[first]
    exact = []
    for i, n in enumerate(lengths.tolist()):
        emit = torch.kron(torch.eye(n, dtype=torch.float64), b[:, None])  # (2n, n)
        cov = emit @ cov_z[:n, :n] @ emit.T + 0.49 * torch.eye(2 * n, dtype=torch.float64)
        exact.append(dist.MultivariateNormal(torch.zeros(2 * n, dtype=torch.float64), cov)
                     .log_prob(x[i, :n].reshape(-1)))  # fmt: skip
    exact = torch.stack(exact)
    # under the default plate name the weights are joint over the sequences: a bound on the
    # joint evidence, the sum of the sequences' (the shape says which)
    joint = iwae_bound(log_importance_weights(model, guide, x, mask, num_particles=20_000))
    assert joint.value.shape == ()
    assert float(joint.value) < float(exact.sum()) + 4 * float(joint.stderr)
    log_w = log_importance_weights(model, guide, x, mask, num_particles=20_000,
                                   plate="z_minibatch")  # fmt: skip
    iwae = iwae_bound(log_w)
    assert ((iwae.value - exact).abs() < 4 * iwae.stderr + 2e-3).all(), (iwae.value, exact)
    assert (elbo_bound(log_w).value < exact).all()


def test_the_inspection_tells_each_sites_role(float64):
    from inference.inspection import format_inspection, inspect_pair

    y = torch.tensor(Y)
    guide = AutoGuideList(centred_schools)
    guide.append(AutoDelta(poutine.block(centred_schools, expose=["mu"])))
    guide.append(AutoNormal(poutine.block(centred_schools, hide=["mu"])))
    roles = {(r.side, r.name): r for r in inspect_pair(centred_schools, guide, y)}
    assert roles["guide", "mu"].role == "point mass"
    assert roles["guide", "tau_unconstrained"].role == "auxiliary"
    assert roles["guide", "tau"].role == "transform"
    assert roles["model", "obs"].role == "observed" and roles["model", "obs"].in_data_plate
    assert not roles["model", "tau"].in_data_plate and roles["model", "theta"].plates == (
        "data[8]",
    )

    m2 = LinearM2().double()
    roles = {(r.side, r.name): r for r in inspect_pair(m2.model, m2.guide, torch.randn(4, X_DIM))}
    assert roles["guide", "y"].reparameterised is False and roles["guide", "z"].reparameterised
    assert roles["guide", "y"].plates == ("data[inferred]",)

    model, guide, x, _ = _global_subsampled()
    reports = inspect_pair(model, guide, x)
    assert {r.name: r.plates for r in reports if r.side == "model"} == {
        "mu": (), "x": ("data[8 of 40]",)
    }  # fmt: skip
    x = torch.tensor([0.1, 2.0])
    gmm_guide = AutoNormal(poutine.block(gmm, hide=["c"]))
    text = format_inspection(inspect_pair(gmm, gmm_guide, x))
    assert "enumerated" in text.splitlines()[-2] and text.splitlines()[0].startswith("side")


def test_compiled_evaluation_of_the_new_classes_draws_as_the_eager_one(float64):
    """Enumerated sites compile (the same draws); a pair that does not broadcast stays eager,
    with the numbers of an eager run."""
    settings = dict(ks=[1, 20], batch_size=2, max_rows=20, progress=False, seed=0)
    model, guide, _, _ = _local_mixture(feature_plate=False)
    x = torch.tensor([-1.8, 0.3, 2.6, 1.1])
    eager = evaluate_bounds(model, guide, x, **settings, compile=False)
    compiled = evaluate_bounds(model, guide, x, **settings, compile=True)
    assert compiled["compiled"]
    assert torch.allclose(compiled["iwae"][20].value, eager["iwae"][20].value, atol=1e-9)
    m2 = LinearM2().double()
    xs = torch.randn(4, X_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one particle at a time; stays eager
        eager = evaluate_bounds(m2.model, m2.guide, xs, **settings, compile=False)
        tried = evaluate_bounds(m2.model, m2.guide, xs, **settings, compile=True)
    assert not tried["compiled"]
    assert torch.equal(tried["iwae"][20].value, eager["iwae"][20].value)


def test_evaluate_prints_the_error_of_a_monte_carlo_kl_and_of_a_gap_near_zero():
    from inference.commands.evaluate import format_report

    entry = {"mean": -10.0, "stderr": 0.02, "error": "monte carlo"}
    report = {
        "run": "r", "split": "test", "num_datapoints": 5, "data": "digits", "binarization": "b",
        "seed": 0, "seconds": 1.0, "elbo": entry, "iwae": {"10": {**entry, "mean": -9.99}},
        "decomposition": {"reconstruction": -9.97, "kl": -0.03, "entropy": 1.0},
        "decomposition_stderr": {"reconstruction": 0.1, "kl": 0.05, "entropy": 0.1},
        "kl_analytic": False,
        "log_px": {**entry, "mean": -9.99, "k": 10, "estimator": "IWAE-10"},
    }  # fmt: skip
    text = format_report(report)
    assert "KL(q||p) -0.030 +- 0.050 (Monte Carlo; s.e. across datapoints)" in text
    assert "gap log p(x) - ELBO >= 0.010 +- 0.028 (not distinguishable from 0" in text
    report["kl_analytic"], report["log_px"]["mean"] = True, -9.0
    text = format_report(report)
    assert "KL(q||p) -0.030 (analytic)" in text and "not distinguishable" not in text


def test_the_elbo_decomposition_of_an_autoguide_adds_up(float64):
    """AutoNormal's latents are Deltas behind auxiliary draws: the KL is Monte Carlo over the
    whole guide (it was -log p(z), the Delta's 'analytic' KL, 2 nats off on the user model)."""
    from inference.tracing import elbo_decomposition

    guide = AutoNormal(centred_schools)
    y = torch.tensor(Y)
    _fit(centred_schools, guide, y, steps=200)
    dec = elbo_decomposition(centred_schools, guide, y, num_particles=20_000, plate=None)
    assert not dec["kl_analytic"]
    log_w = log_importance_weights(centred_schools, guide, y, num_particles=20_000, plate=None)
    elbo = elbo_bound(log_w)
    assert abs(float(dec["elbo"]) - float(elbo.value)) < 6 * float(elbo.stderr)
    assert float(dec["kl"]) > 0


def test_ais_from_the_command_moves_an_auxiliary_guides_unconstrained_draws(tmp_path, capsys):
    """A LogNormal latent whose guide draws log z as an auxiliary site (AutoNormal's way)."""
    import json

    from inference.commands.cli import main

    run = tmp_path / "positive"
    assert main(["train", "--model", f"{MODELS}:positive_latent", "--objective", "iwae",
                 "--out", str(run), *TINY]) == 0  # fmt: skip
    assert main(["evaluate", str(run), "--k", "1,500", "--limit", "10", "--ais", "--ais-chains",
                 "4", "--ais-temperatures", "50", "--no-progress"]) == 0  # fmt: skip
    report = json.loads((run / "eval.json").read_text())
    assert report["ais"]["acceptance"] > 0.5 and report["ais"]["converged"].startswith("chains")
    assert abs(report["ais"]["mean"] - report["iwae"]["500"]["mean"]) < 0.5
    dec = report["decomposition"]
    assert not report["kl_analytic"] and dec["kl"] > 0
    assert abs(dec["reconstruction"] - dec["kl"] - report["elbo"]["mean"]) < 0.3
    # BDMC too: reverse AIS starts from the simulated z mapped to u = log z, the guide's space
    assert main(["bdmc", str(run), "--points", "4", "--temperatures", "50", "--chains", "4",
                 "--no-progress"]) == 0  # fmt: skip
    (row,) = json.loads((run / "bdmc.json").read_text())["rows"]
    assert row["acceptance_reverse"] > 0.5
    assert row["lower"]["mean"] <= row["upper"]["mean"] + 4 * row["gap"]["stderr"] + 0.02
