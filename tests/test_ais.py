"""AIS and BDMC against exact values: linear-Gaussian evidence, grid quadrature, HMC invariance."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference.ais import (
    _make_path,
    annealed_log_marginal,
    bdmc,
    hmc_step,
    temperature_schedule,
    worth_compiling,
)
from inference.bounds import Bound, iwae_bound
from inference.tracing import log_importance_weights
from ppl_models import LinearGaussian


def _poor_linear_gaussian(n=20):
    """10-d data, 4-d latent; the guide is diagonal and misplaced: a poor proposal."""
    torch.manual_seed(1)
    lg = LinearGaussian(10, 4, guide_type="diagonal")
    lg.set_params(weight=torch.randn(10, 4), loc=torch.randn(10), scale=0.6)
    return lg.requires_grad_(False), lg.sample(n)


def _mean(bound: Bound) -> tuple[float, float]:
    return bound.mean()


def test_schedules():
    for kind in ("sigmoid", "linear"):
        betas = temperature_schedule(100, kind)
        assert betas.shape == (101,) and betas[0] == 0 and betas[-1] == 1
        assert (betas.diff() > 0).all()
    sigmoid = temperature_schedule(100, "sigmoid").diff()
    assert sigmoid[0] < sigmoid[50] > sigmoid[-1]  # denser at both ends
    assert temperature_schedule(1).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        temperature_schedule(10, "cosine")


def test_one_temperature_is_importance_sampling(float64):
    lg, x = _poor_linear_gaussian(5)
    pyro.set_rng_seed(3)
    ais = annealed_log_marginal(lg.model, lg.guide, x, num_chains=50, num_temperatures=1)
    pyro.set_rng_seed(3)
    log_w = log_importance_weights(lg.model, lg.guide, x, num_particles=50)
    assert torch.allclose(ais.log_weights, log_w, atol=1e-12)
    assert torch.allclose(ais.value, iwae_bound(log_w).value, atol=1e-12)


def test_ais_beats_iwae_at_equal_compute_on_a_poor_guide(float64):
    lg, x = _poor_linear_gaussian()
    exact = float(lg.log_marginal(x).mean())
    pyro.set_rng_seed(0)
    chains, temps, leapfrog = 16, 200, 5
    ais = annealed_log_marginal(lg.model, lg.guide, x, num_chains=chains,
                                num_temperatures=temps, leapfrog_steps=leapfrog)  # fmt: skip
    mean, se = _mean(ais)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert 0.4 < float(ais.acceptance.mean()) < 0.95  # the step size was adapted
    # IWAE with as many model evaluations (one per temperature and leapfrog step)
    log_w = log_importance_weights(lg.model, lg.guide, x, num_particles=chains * temps * leapfrog)
    iwae, _ = _mean(iwae_bound(log_w))
    assert abs(mean - exact) < abs(iwae - exact)


def _nonlinear(n=4):
    """z ~ N(0, I_2), x | z ~ N(tanh(A z) + 0.5 z_1^2, 0.3^2 I_3): log p(x) by quadrature."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 2, generator=gen, dtype=torch.float64) * 2

    def mean(z):
        return torch.tanh(z @ a.T) + 0.5 * z[..., :1] ** 2

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(mean(z), 0.3).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.2).to_event(1))

    z_true = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    x = mean(z_true) + 0.3 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    grid = torch.linspace(-7, 7, 561, dtype=torch.float64)
    step = float(grid[1] - grid[0])
    zz = torch.cartesian_prod(grid, grid)  # (G, 2)
    log_prior = dist.Normal(0.0, 1.0).log_prob(zz).sum(-1)
    log_lik = dist.Normal(mean(zz)[:, None, :], 0.3).log_prob(x).sum(-1)  # (G, n)
    exact = torch.logsumexp(log_prior[:, None] + log_lik, 0) + 2 * math.log(step)
    return model, guide, x, exact


def test_ais_on_a_nonlinear_model_against_grid_quadrature(float64):
    model, guide, x, exact = _nonlinear()
    pyro.set_rng_seed(0)
    ais = annealed_log_marginal(model, guide, x, num_chains=32, num_temperatures=300,
                                leapfrog_steps=5)  # fmt: skip
    error = ais.value - exact
    assert (error.abs() < 4 * ais.stderr + 0.02).all(), (error, ais.stderr)
    mean_se = float(ais.stderr.pow(2).sum().sqrt()) / len(error)  # about 0.05 here
    assert abs(float(error.mean())) < 4 * mean_se + 0.02


def test_bdmc_sandwiches_the_exact_evidence_and_closes_with_more_temperatures(float64):
    lg, x = _poor_linear_gaussian()
    gaps = []
    for temps in (20, 300):
        pyro.set_rng_seed(0)
        result = bdmc(lg.model, lg.guide, x, num_points=20, num_chains=8,
                      num_temperatures=temps, leapfrog_steps=5)  # fmt: skip
        exact = float(lg.log_marginal(result["x"]).mean())
        (low, low_se), (high, high_se) = result["lower"].mean(), result["upper"].mean()
        assert low - 4 * low_se <= exact <= high + 4 * high_se, (temps, low, exact, high)
        gaps.append(high - low)
    assert gaps[1] < gaps[0] / 2 and gaps[1] > -0.05


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_hmc_leaves_the_posterior_invariant(float64, compiled):
    """Start at exact posterior draws of a linear-Gaussian model; 20 HMC steps at beta = 1
    keep the mean and covariance (4000 chains: 4 s.e. on the mean, 10% on variances), with the
    model evaluated eagerly or compiled."""
    lg, x = _poor_linear_gaussian(1)
    post = lg.exact_posterior(x)  # MultivariateNormal over z, batch (1,)
    mean, cov = post.mean[0], post.covariance_matrix[0]
    chains = 4000
    path = _make_path(lg.model, lg.guide, (x,), {}, chains, "data", "guide")
    path.start()
    values = {"z": post.sample((chains,))}  # (chains, 1, 4)
    if compiled:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
            path.compile(values)
        assert path.compiled is not None
    state = path.evaluate(values)
    step = 0.5 * cov.diagonal().sqrt().min().reshape(1)
    for _ in range(20):
        state, prob = hmc_step(path, state, 1.0, step, 5)
    z = state.values["z"][:, 0]
    assert 0.3 < float(prob.mean()) < 1.0
    se = cov.diagonal().sqrt() / math.sqrt(chains)
    assert ((z.mean(0) - mean).abs() < 4 * se * 3).all()  # chains are correlated over steps
    assert torch.allclose(torch.cov(z.T).diagonal(), cov.diagonal(), rtol=0.1)


def test_constrained_latents_move_in_unconstrained_space(float64):
    """Gamma-Poisson per datapoint: p(x_n) = NegativeBinomial; the chains move log rate."""
    x = torch.tensor([1.0, 2.0, 7.0])

    def model(x):
        with pyro.plate("data", len(x)):
            rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Poisson(rate), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("rate", dist.Gamma(3.0, 1.0))

    # Gamma(a, b) mixed Poisson: NegativeBinomial(total_count=a, probs=1/(1+b))
    exact = dist.NegativeBinomial(2.0, probs=torch.tensor(0.5)).log_prob(x)
    est = annealed_log_marginal(model, guide, x, num_chains=32, num_temperatures=100,
                                compile=False)  # fmt: skip
    assert float(est.acceptance.mean()) > 0.5
    assert ((est.value - exact).abs() < 4 * est.stderr + 0.01).all(), (est.value, exact)

    # and with the exact posterior Gamma(2 + x, 2) as guide every weight is log p(x_n)
    def posterior(x):
        with pyro.plate("data", len(x)):
            pyro.sample("rate", dist.Gamma(2.0 + x, 2.0))

    est = annealed_log_marginal(model, posterior, x, num_chains=4, num_temperatures=10,
                                compile=False)  # fmt: skip
    assert torch.allclose(est.log_weights, exact.expand(4, 3), atol=1e-10)


def test_evidence_of_global_constrained_latents_from_the_prior_without_a_guide(float64):
    """Gamma-Poisson and Dirichlet-categorical, annealed from the prior (no guide at all)."""
    x = torch.tensor([3.0, 5.0, 2.0, 4.0, 6.0, 1.0])

    def gamma_poisson(x):
        rate = pyro.sample("rate", dist.Gamma(2.0, 0.5))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Poisson(rate), obs=x)

    s, n = float(x.sum()), len(x)
    exact = (2 * math.log(0.5) - math.lgamma(2) + math.lgamma(2 + s) - (2 + s) * math.log(0.5 + n)
             - float(torch.lgamma(x + 1).sum()))  # fmt: skip
    est = annealed_log_marginal(gamma_poisson, None, x, num_chains=32, num_temperatures=200,
                                initial="prior", plate=None, compile=False)  # fmt: skip
    assert abs(float(est.value) - exact) < 4 * float(est.stderr) + 0.01, (est.value, exact)

    c = torch.tensor([0, 2, 2, 1, 2, 0, 2])
    alpha = torch.tensor([1.0, 2.0, 0.5])

    def dirichlet(c):
        theta = pyro.sample("theta", dist.Dirichlet(alpha))  # the simplex: stick-breaking
        with pyro.plate("data", len(c)):
            pyro.sample("c", dist.Categorical(theta), obs=c)

    counts = torch.bincount(c, minlength=3).double()
    exact = float(torch.lgamma(alpha.sum()) - torch.lgamma(alpha.sum() + len(c))
                  + (torch.lgamma(alpha + counts) - torch.lgamma(alpha)).sum())  # fmt: skip
    pyro.set_rng_seed(2)
    est = annealed_log_marginal(dirichlet, None, c, num_chains=64, num_temperatures=300,
                                initial="prior", plate=None, compile=False)  # fmt: skip
    assert abs(float(est.value) - exact) < 4 * float(est.stderr) + 0.01, (est.value, exact)

    def posterior(c):
        pyro.sample("theta", dist.Dirichlet(alpha + counts))

    est = annealed_log_marginal(dirichlet, posterior, c, num_chains=4, num_temperatures=10,
                                plate=None, compile=False)  # fmt: skip
    assert torch.allclose(est.log_weights, torch.full_like(est.log_weights, exact), atol=1e-10)
    with pytest.raises(ValueError, match="initial='prior'"):
        annealed_log_marginal(dirichlet, None, c, num_chains=2, num_temperatures=2, plate=None)


def test_bdmc_brackets_a_positive_latent(float64):
    """z_n ~ LogNormal(0, 1), x_n ~ N(log z_n, 1): the bracket on simulated data holds."""

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.LogNormal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.log(), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.LogNormal(x / 3, 0.9))

    result = bdmc(model, guide, torch.zeros(4), num_points=4, num_chains=16,
                  num_temperatures=100, compile=False)  # fmt: skip
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(result["x"])
    lower, upper = result["lower"], result["upper"]
    assert (lower.value <= exact + 4 * lower.stderr + 0.01).all()
    assert (upper.value >= exact - 4 * upper.stderr - 0.01).all()
    assert (result["gap"].abs() < 0.1).all()


def test_ais_and_bdmc_from_the_command_line(tmp_path, capsys):
    import json

    from inference.commands.cli import main

    run = tmp_path / "vae"
    tiny = ["--hidden", "16", "--z-dim", "2", "--epochs", "3", "--batch-size", "256",
            "--num-particles", "2", "--no-progress"]  # fmt: skip
    ais = ["--ais-chains", "4", "--ais-temperatures", "20", "--ais-leapfrog", "2"]
    assert main(["train", "--out", str(run), *tiny]) == 0
    assert main(["evaluate", str(run), "--k", "1,100", "--limit", "10", "--ais", *ais,
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "AIS-20" in out and "stochastic lower bound" in out
    report = json.loads((run / "eval.json").read_text())
    assert report["ais"]["num_temperatures"] == 20 and 0 < report["ais"]["acceptance"] <= 1
    # the headline is AIS's estimate, named, with its convergence verdict beside it
    assert report["log_px"]["estimator"] == "AIS-20"
    assert report["log_px"]["mean"] == report["ais"]["mean"]
    assert report["iwae_log_px"]["estimator"] == "IWAE-100"
    assert "log p(x) ~" in out and "(AIS-20)" in out and "chains moved" in out
    assert abs(report["ais"]["mean"] - report["iwae"]["100"]["mean"]) < 2.0

    assert main(["bdmc", str(run), "--points", "5", "--temperatures", "5,50", "--chains", "4",
                 "--leapfrog", "2", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "lower (AIS)" in out and "upper (rev.)" in out
    result = json.loads((run / "bdmc.json").read_text())
    assert [r["temperatures"] for r in result["rows"]] == [5, 50]
    assert (run / "bdmc.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["gaps", str(run), "--logpx", "ais", *ais, "--limit", "10", "--k", "20",
                 "--no-progress"]) == 0  # fmt: skip
    gaps = json.loads((run / "gaps.json").read_text())
    assert gaps["log_px_estimator"] == "AIS-20" and "cremer" in gaps
    assert "log p(x) by AIS-20" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--ais", "--ais-chains", "0", "--no-progress"]) == 1


def _example_vae(x_dim):
    """docs/examples/my_vae.py: written Pyro's own way (pyro.module, Bernoulli probs)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "my_vae.py"
    spec = importlib.util.spec_from_file_location("my_vae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_model(x_dim)


@pytest.mark.parametrize("pair", ["linear-gaussian", "pyro-example-vae"])
def test_compiled_ais_equals_eager_ais(float64, pair):
    """The compiled evaluation (guide network computed once, gradient-only leapfrog steps)
    gives the eager run's log weights to float rounding, on the same random stream."""
    if pair == "linear-gaussian":
        lg, x = _poor_linear_gaussian(8)
        model, guide = lg.model, lg.guide
    else:
        torch.manual_seed(0)
        vae = _example_vae(12)
        model, guide, x = vae.model, vae.guide, torch.bernoulli(torch.full((6, 12), 0.3))
    runs = {}
    for compile in (False, True):
        pyro.set_rng_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
            runs[compile] = annealed_log_marginal(
                model, guide, x, num_chains=8, num_temperatures=40, leapfrog_steps=3,
                compile=compile,
            )  # fmt: skip
    assert runs[True].compiled and not runs[False].compiled
    assert torch.allclose(runs[True].log_weights, runs[False].log_weights, rtol=0, atol=1e-8)
    assert torch.equal(runs[True].acceptance > 0, runs[False].acceptance > 0)


def test_a_model_that_cannot_be_compiled_anneals_eagerly_and_says_so(float64):
    weight = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            if bool((z.abs() > 1e6).any()):  # Python control flow on a latent's value
                raise FloatingPointError("the chains diverged")
            pyro.sample("x", dist.Normal(z @ weight.T, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.5).to_event(1))

    x = torch.randn(3, 5)
    settings = dict(num_chains=4, num_temperatures=20, leapfrog_steps=2)
    pyro.set_rng_seed(0)
    with pytest.warns(RuntimeWarning, match="AIS runs eagerly"):
        tried = annealed_log_marginal(model, guide, x, **settings, compile=True)
    pyro.set_rng_seed(0)
    eager = annealed_log_marginal(model, guide, x, **settings, compile=False)
    assert not tried.compiled and torch.equal(tried.log_weights, eager.log_weights)


def test_long_runs_compile_by_default():
    assert worth_compiling(1000, 10) and worth_compiling(500, 10)
    assert not worth_compiling(200, 5) and not worth_compiling(499, 10)


def test_ais_whose_chains_do_not_move_says_so(float64):
    """Step sizes far too large: every proposal rejected, and a warning, not a silent IS."""
    import warnings

    import pyro
    import pyro.distributions as dist

    from inference.ais import annealed_log_marginal
    from inference.commands.evaluate import ais_verdict

    x = torch.tensor([0.3, -0.5])

    def model(x):
        with pyro.plate("data", 2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.01), obs=x)

    def guide(x):
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = annealed_log_marginal(model, guide, x, num_chains=4, num_temperatures=5,
                                    step_size=1e3, compile=False)  # fmt: skip
    assert float(est.acceptance.mean()) < 0.05
    assert any("barely moved" in str(w.message) for w in caught)
    assert ais_verdict(est, {"num_temperatures": 5}).startswith("NOT CONVERGED")
