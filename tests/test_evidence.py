"""Model evidence: AIS and BDMC against exact evidence, adaptive schedules, Bayes factors, command.

Every model here is written as a Pyro user writes it (global latents with
constrained supports, plates, autoguides, ``config_enumerate``); each exact
evidence is closed form or a one-dimensional quadrature.
"""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from inference.ais import (
    annealed_log_marginal,
    bdmc,
    bdmc_joint,
    conditional_ess,
    next_temperature,
    temperature_schedule,
)
from inference.bounds import iwae_bound
from inference.commands.cli import main
from inference.evidence import Evidence, bayes_factors, log_evidence
from inference.tracing import log_importance_weights

SCHOOLS = "docs/examples/eight_schools.py"
Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def within(estimate, exact, se, slack=0.02):
    return abs(float(estimate) - exact) < 4 * float(se) + slack


def brackets(result, exact, slack=0.02):
    """BDMC's lower bound lies below the exact value and its upper bound above, within error."""
    lower, upper = result["lower"], result["upper"]
    return bool(
        (lower.value <= exact + 4 * lower.stderr + slack).all()
        and (upper.value >= exact - 4 * upper.stderr - slack).all()
    )


def _fit(model, guide, *args, steps=400, **kwargs):
    pyro.clear_param_store()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(steps):
        svi.step(*args, **kwargs)
    return guide


# ---------------------------------------------------------------------------
# Conjugate models
# ---------------------------------------------------------------------------


def beta_bernoulli(x):
    p = pyro.sample("p", dist.Beta(2.0, 3.0))  # the interval (0, 1): a sigmoid transform
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Bernoulli(p), obs=x)


def beta_bernoulli_evidence(x):
    k, n = float(x.sum()), len(x)
    return (
        math.lgamma(2 + k)
        + math.lgamma(3 + n - k)
        - math.lgamma(5 + n)
        - (math.lgamma(2) + math.lgamma(3) - math.lgamma(5))
    )


def test_beta_bernoulli_from_the_prior_with_an_adaptive_schedule(float64):
    pyro.set_rng_seed(0)
    x = (torch.rand(30) < 0.7).double()
    found = log_evidence(beta_bernoulli, None, x, num_chains=64)
    exact = beta_bernoulli_evidence(x)
    assert within(found.log_evidence, exact, found.stderr), (found, exact)
    assert found.temperatures > 5 and found.acceptance > 0.5
    # the bracket holds on the simulated data at the same schedule, and closes
    assert found.lower <= found.upper + 4 * found.gap_stderr and found.gap < 0.3


def gamma_poisson(x):
    rate = pyro.sample("rate", dist.Gamma(2.0, 0.5))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Poisson(rate), obs=x)


def gamma_poisson_evidence(x):
    s, n = float(x.sum()), len(x)
    return (2 * math.log(0.5) - math.lgamma(2) + math.lgamma(2 + s) - (2 + s) * math.log(0.5 + n)
            - float(torch.lgamma(x + 1).sum()))  # fmt: skip


@pytest.mark.parametrize("guide", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal])
def test_bdmc_from_an_autoguide_brackets_the_exact_evidence(float64, guide):
    """Reverse AIS starts from the exact sample mapped into the autoguide's auxiliary space."""
    x = torch.tensor([3.0, 5.0, 2.0, 4.0, 6.0, 1.0])
    pyro.set_rng_seed(1)
    fitted = _fit(gamma_poisson, guide(gamma_poisson), x)
    result = bdmc_joint(gamma_poisson, fitted, x, num_chains=32, num_temperatures=100,
                        compile=False)  # fmt: skip
    exact = gamma_poisson_evidence(result["observed"]["x"])
    assert brackets(result, exact), (result["lower"], result["upper"], exact)
    assert float(result["acceptance"]["reverse"]) > 0.5
    # and forward AIS from the same guide on the real data
    est = annealed_log_marginal(gamma_poisson, fitted, x, num_chains=32, num_temperatures=100,
                                plate=None, compile=False)  # fmt: skip
    assert within(est.value, gamma_poisson_evidence(x), est.stderr)


def test_bdmc_per_datapoint_from_an_autonormal_of_local_positive_latents(float64):
    def model(x):
        with pyro.plate("data", len(x)):
            rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Poisson(rate), obs=x)

    x = torch.tensor([1.0, 2.0, 7.0, 0.0])
    pyro.set_rng_seed(2)
    guide = _fit(model, AutoNormal(model), x)
    result = bdmc(model, guide, x, num_points=4, num_chains=16, num_temperatures=100,
                  compile=False)  # fmt: skip
    exact = dist.NegativeBinomial(2.0, probs=torch.tensor(0.5)).log_prob(result["x"])
    assert brackets(result, exact)
    assert (result["gap"].abs() < 0.2).all()


def test_dirichlet_multinomial_from_a_diagonal_autoguide(float64):
    alpha = torch.tensor([1.0, 2.0, 0.5])
    counts = torch.tensor([4.0, 9.0, 2.0])

    def model(counts):
        theta = pyro.sample("theta", dist.Dirichlet(alpha))  # the simplex: stick-breaking
        pyro.sample("counts", dist.Multinomial(int(counts.sum()), theta), obs=counts)

    def exact_of(c):
        n = float(c.sum())
        return float(math.lgamma(n + 1) - torch.lgamma(c + 1).sum() + torch.lgamma(alpha.sum())
                     - torch.lgamma(alpha.sum() + n)
                     + (torch.lgamma(alpha + c) - torch.lgamma(alpha)).sum())  # fmt: skip

    pyro.set_rng_seed(3)
    guide = _fit(model, AutoDiagonalNormal(model), counts)
    # no plate and no batch dim: each particle keeps a weight of its own (not their sum)
    log_w = log_importance_weights(model, guide, counts, num_particles=5000, plate=None)
    assert log_w.shape == (5000,) and float(log_w.std()) > 0
    iwae = iwae_bound(log_w)
    assert within(iwae.value, exact_of(counts), iwae.stderr)
    found = log_evidence(model, guide, counts, num_chains=64)
    assert within(found.log_evidence, exact_of(counts), found.stderr), found
    result = bdmc_joint(model, guide, counts, num_chains=32, num_temperatures=100, compile=False)
    assert brackets(result, exact_of(result["observed"]["counts"]))


def nig_regression(X, y=None):
    """Normal-inverse-gamma linear regression: sigma^2 ~ IG(3, 2), w | sigma^2 ~ N(0, sigma^2 I).

    Written as Pyro's users write it (``X @ w``): it does not broadcast over
    a leading chain dimension.
    """
    var = pyro.sample("var", dist.InverseGamma(3.0, 2.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), var.sqrt()).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, var.sqrt()), obs=y)


def nig_broadcasting(X, y=None):
    """The same model written to broadcast over leading dims."""
    var = pyro.sample("var", dist.InverseGamma(3.0, 2.0))
    scale = var.sqrt().unsqueeze(-1)
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), scale).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), var.sqrt()), obs=y)


def nig_evidence(X, y, a=3.0, b=2.0):
    """y ~ multivariate Student-t(2a, 0, (b/a)(I + X X^T)), the closed form of the model above."""
    n = X.shape[0]
    cov = (b / a) * (torch.eye(n) + X @ X.T)
    t = dist.MultivariateStudentT(2 * a, torch.zeros(n), torch.linalg.cholesky(cov))
    return float(t.log_prob(y))


def test_normal_inverse_gamma_regression_against_its_closed_form(float64):
    pyro.set_rng_seed(4)
    X = torch.randn(40, 3)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.7 * torch.randn(40)
    exact = nig_evidence(X, y)
    found = log_evidence(nig_broadcasting, None, X, y=y, num_chains=64)
    assert within(found.log_evidence, exact, found.stderr), (found, exact)
    assert found.lower <= found.upper + 4 * found.gap_stderr
    guide = _fit(nig_broadcasting, AutoMultivariateNormal(nig_broadcasting), X, y=y)
    est = annealed_log_marginal(nig_broadcasting, guide, X, y=y, num_chains=32,
                                num_temperatures=50, plate=None, compile=False)  # fmt: skip
    assert within(est.value, exact, est.stderr)
    result = bdmc_joint(nig_broadcasting, guide, X, y=y, num_chains=32, num_temperatures=50,
                        compile=False)  # fmt: skip
    assert brackets(result, nig_evidence(X, result["observed"]["y"]))


@pytest.mark.parametrize("make", [AutoLowRankMultivariateNormal, AutoIAFNormal])
def test_ais_and_bdmc_from_low_rank_and_flow_autoguides(float64, make):
    """Their auxiliary draw is the packed unconstrained latent, as for AutoMultivariateNormal."""
    pyro.set_rng_seed(7)
    X = torch.randn(40, 3)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.7 * torch.randn(40)
    guide = _fit(nig_broadcasting, make(nig_broadcasting), X, y=y, steps=300)
    est = annealed_log_marginal(nig_broadcasting, guide, X, y=y, num_chains=32,
                                num_temperatures=50, plate=None, compile=False)  # fmt: skip
    assert float(est.acceptance) > 0.5
    assert within(est.value, nig_evidence(X, y), est.stderr)
    result = bdmc_joint(nig_broadcasting, guide, X, y=y, num_chains=32, num_temperatures=50,
                        compile=False)  # fmt: skip
    assert brackets(result, nig_evidence(X, result["observed"]["y"]))


def test_a_model_that_does_not_broadcast_is_annealed_one_chain_at_a_time(float64):
    """``X @ w`` fails under a chain dimension; as Pyro's NUTS, AIS then runs it chain by chain."""
    pyro.set_rng_seed(4)
    X = torch.randn(40, 3)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.7 * torch.randn(40)
    guide = _fit(nig_broadcasting, AutoMultivariateNormal(nig_broadcasting), X, y=y)
    with pytest.warns(RuntimeWarning, match="one at a time"):
        est = annealed_log_marginal(nig_regression, guide, X, y=y, num_chains=16,
                                    num_temperatures=20, leapfrog_steps=5, plate=None)  # fmt: skip
    assert est.log_weights.shape == (16,) and float(est.log_weights.std()) > 0
    assert within(est.value, nig_evidence(X, y), est.stderr)
    assert float(est.acceptance) > 0.5
    with pytest.warns(RuntimeWarning, match="one at a time"):
        prior = annealed_log_marginal(nig_regression, None, X, y=y, num_chains=8,
                                      num_temperatures=3, initial="prior", plate=None)  # fmt: skip
    assert prior.log_weights.shape == (8,)


# ---------------------------------------------------------------------------
# Eight schools and a Bayes factor
# ---------------------------------------------------------------------------


def _schools_evidence(hierarchical: bool) -> float:
    """Integrate theta and mu analytically; tau (half-Cauchy) by quadrature."""
    from scipy import integrate

    y, sigma = torch.tensor(Y), torch.tensor(SIGMA)

    def log_f(tau):
        cov = 25 * torch.ones(8, 8) + torch.diag(sigma**2 + tau**2)
        prior = dist.HalfCauchy(5.0).log_prob(torch.tensor(tau)) if hierarchical else 0.0
        return float(dist.MultivariateNormal(torch.zeros(8), cov).log_prob(y) + prior)

    if not hierarchical:
        return log_f(0.0)
    shift = log_f(3.0)
    value, _ = integrate.quad(lambda t: math.exp(log_f(t) - shift), 0, math.inf, limit=200)
    return shift + math.log(value)


def test_eight_schools_bayes_factor_from_the_command(float64, tmp_path, capsys):
    out = tmp_path / "evidence.json"
    assert main(["evidence", "--model", f"{SCHOOLS}:hierarchical", "--model", f"{SCHOOLS}:pooled",
                 "--data", "docs/examples/eight_schools.json", "--no-bdmc", "--chains", "64",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "log BF [" in printed and "schools.py:pooled" in printed
    report = json.loads(out.read_text())
    hier, pooled = report["models"]
    for entry, exact in ((hier, _schools_evidence(True)), (pooled, _schools_evidence(False))):
        assert within(entry["log_evidence"], exact, entry["stderr"]), (entry, exact)
        assert entry["gap"] is None and entry["arrays"] == ["J", "sigma", "y"]
    (bf,) = report["bayes_factors"]
    exact_bf = _schools_evidence(True) - _schools_evidence(False)
    assert within(bf["log_bf"], exact_bf, bf["stderr"]), (bf, exact_bf)
    assert bf["stderr"] == pytest.approx(math.hypot(hier["stderr"], pooled["stderr"]))
    # same seed, same numbers
    main(["evidence", "--model", f"{SCHOOLS}:pooled", "--data", "docs/examples/eight_schools.json",
          "--no-bdmc", "--chains", "64", "--out", str(tmp_path / "again.json"),
          "--no-progress"])  # fmt: skip
    again = json.loads((tmp_path / "again.json").read_text())["models"][0]
    assert again["log_evidence"] == pooled["log_evidence"]


def test_bayes_factors_carry_their_errors_and_say_when_undecided():
    a = Evidence(-10.0, 0.1, 50, 0.9, 1.0, gap=0.05, gap_stderr=0.02)
    noisy = Evidence(-10.0, 0.1, 50, 0.9, 1.0, gap=0.05, gap_stderr=0.5)
    b = Evidence(-12.0, 0.2, 50, 0.9, 1.0, gap=0.5, gap_stderr=0.02)
    c = Evidence(-10.1, 0.1, 50, 0.9, 1.0)
    ab, ac, bc = bayes_factors({"a": a, "b": b, "c": c})
    assert ab["log_bf"] == pytest.approx(2.0)
    assert ab["stderr"] == pytest.approx(math.hypot(0.1, 0.2))
    assert ab["decided"] and not ac["decided"]  # 0.1 is within 3 s.e.
    assert bc["log_bf"] == pytest.approx(-1.9) and bc["decided"]
    assert not b.converged and a.converged and c.converged and not noisy.converged


# ---------------------------------------------------------------------------
# A mixture with enumerated assignments and a global location
# ---------------------------------------------------------------------------


@pyro.infer.config_enumerate
def mixture(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(loc * (2 * c - 1), 1.0), obs=x)


def mixture_evidence(x):
    """Quadrature over the location; the assignments summed in closed form."""
    from scipy import integrate

    def log_f(loc):
        loc = torch.tensor(loc)
        per_point = torch.logaddexp(math.log(0.3) + dist.Normal(loc, 1.0).log_prob(x),
                                    math.log(0.7) + dist.Normal(-loc, 1.0).log_prob(x))  # fmt: skip
        return float(per_point.sum() + dist.Normal(0.0, 2.0).log_prob(loc))

    shift = max(log_f(t) for t in np.linspace(-6, 6, 121))
    value, _ = integrate.quad(lambda t: math.exp(log_f(t) - shift), -12, 12, limit=400)
    return shift + math.log(value)


def test_a_mixture_with_enumerated_assignments_bracketed(float64):
    x = torch.tensor([1.8, -2.1, -1.2, -2.5, 2.2, -1.7])
    pyro.set_rng_seed(5)
    found = log_evidence(mixture, None, x, num_chains=64)
    assert within(found.log_evidence, mixture_evidence(x), found.stderr), found
    result = bdmc_joint(mixture, None, x, num_chains=32, num_temperatures=200, initial="prior",
                        compile=False)  # fmt: skip
    assert brackets(result, mixture_evidence(result["observed"]["x"]))


# ---------------------------------------------------------------------------
# The adaptive schedule
# ---------------------------------------------------------------------------


def test_conditional_ess_and_the_next_temperature(float64):
    gen = torch.Generator().manual_seed(0)
    log_w = torch.randn(50, 3, generator=gen)
    ratio = 5 * torch.randn(50, 3, generator=gen)
    W = torch.softmax(log_w, 0)
    for delta in (0.0, 0.01, 0.3):
        v = torch.exp(delta * ratio)
        direct = (W * v).sum(0) ** 2 / (W * v**2).sum(0)
        assert torch.allclose(conditional_ess(log_w, ratio, delta), direct)
    beta = next_temperature(0.2, log_w, ratio, 0.9)
    assert 0.2 < beta < 1.0
    assert float(conditional_ess(log_w, ratio, beta - 0.2).min()) == pytest.approx(0.9, abs=1e-6)
    assert next_temperature(0.2, log_w, torch.zeros_like(ratio), 0.9) == 1.0


def test_adaptive_schedules_report_their_temperatures_and_respect_a_cap(float64):
    x = torch.tensor([3.0, 5.0, 2.0, 4.0, 6.0, 1.0])
    pyro.set_rng_seed(6)
    coarse = annealed_log_marginal(gamma_poisson, None, x, num_chains=32, schedule="adaptive",
                                   target_ess=0.9, initial="prior", plate=None)  # fmt: skip
    pyro.set_rng_seed(6)
    fine = annealed_log_marginal(gamma_poisson, None, x, num_chains=32, schedule="adaptive",
                                 target_ess=0.999, initial="prior", plate=None)  # fmt: skip
    assert coarse.num_temperatures < fine.num_temperatures
    assert fine.betas[0] == 0 and fine.betas[-1] == 1 and (fine.betas.diff() > 0).all()
    pyro.set_rng_seed(6)
    again = annealed_log_marginal(gamma_poisson, None, x, num_chains=32, schedule="adaptive",
                                  target_ess=0.999, initial="prior", plate=None)  # fmt: skip
    assert torch.equal(again.betas, fine.betas) and torch.equal(again.value, fine.value)
    with pytest.warns(RuntimeWarning, match="cap of 3 temperatures"):
        capped = annealed_log_marginal(gamma_poisson, None, x, num_chains=8,
                                       num_temperatures=3, schedule="adaptive",
                                       initial="prior", plate=None)  # fmt: skip
    assert capped.num_temperatures == 3
    with pytest.raises(ValueError, match="increase from 0 to 1"):
        annealed_log_marginal(gamma_poisson, None, x, num_chains=2, initial="prior", plate=None,
                              betas=torch.tensor([0.0, 0.7, 0.5, 1.0]))  # fmt: skip
    with pytest.raises(ValueError, match="placed by a run"):
        temperature_schedule(10, "adaptive")


# ---------------------------------------------------------------------------
# The command: data files, trained runs, mistakes
# ---------------------------------------------------------------------------

MODELS = """
import pyro, pyro.distributions as dist, torch

def coin(flips):
    p = pyro.sample("p", dist.Beta(2.0, 3.0))
    with pyro.plate("data", len(flips)):
        pyro.sample("flips", dist.Bernoulli(p), obs=flips)

def fair(flips):
    with pyro.plate("data", len(flips)):
        pyro.sample("flips", dist.Bernoulli(0.5), obs=flips)

def make():
    return coin

def nothing(z):
    return z
"""


@pytest.mark.parametrize("fmt", ["npz", "csv", "json"])
def test_evidence_reads_named_arrays_from_every_format(float64, tmp_path, capsys, fmt):
    (tmp_path / "coins.py").write_text(MODELS)
    flips = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0])
    data = tmp_path / f"flips.{fmt}"
    if fmt == "npz":
        np.savez(data, flips=flips)
    elif fmt == "csv":
        data.write_text("flips\n" + "\n".join(map(str, flips)) + "\n")
    else:
        data.write_text(json.dumps({"flips": flips.tolist()}))
    out = tmp_path / "evidence.json"
    assert main(["evidence", "--model", f"{tmp_path}/coins.py:make", "--model",
                 f"{tmp_path}/coins.py:fair", "--data", str(data), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    coin, fair = report["models"]
    exact = beta_bernoulli_evidence(torch.tensor(flips, dtype=torch.float64))
    assert within(coin["log_evidence"], exact, coin["stderr"])
    assert fair["log_evidence"] == pytest.approx(len(flips) * math.log(0.5))  # no latents
    assert coin["lower"] is not None and coin["converged"]
    assert report["bayes_factors"][0]["log_bf"] == pytest.approx(
        coin["log_evidence"] - fair["log_evidence"]
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{d}/coins.py:coin"], "--model needs --data"),
        (["--model", "{d}/coins.py:coin", "--data", "{d}/missing.json"], "no such file"),
        (["--model", "{d}/coins.py:nothing", "--data", "{d}/flips.json"], "takes none of the"),
        (["--model", "{d}/coins.py:coin", "--data", "{d}/bad.csv"], "not a number"),
        (["--model", "{d}/coins.py:coin", "--data", "{d}/coins.py"], ".npz, .csv or .json"),
        (
            [
                "--model",
                "{d}/coins.py:coin",
                "--model",
                "{d}/coins.py:coin",
                "--data",
                "{d}/flips.json",
            ],
            "named twice",
        ),  # fmt: skip
        ([], "give run directories, or --model"),
        (
            ["--model", "{d}/coins.py:coin", "--data", "{d}/flips.json", "--target-ess", "1"],
            "--target-ess must lie in",
        ),  # fmt: skip
    ],
)
def test_evidence_mistakes_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "coins.py").write_text(MODELS)
    (tmp_path / "flips.json").write_text('{"flips": [1, 0, 1]}')
    (tmp_path / "bad.csv").write_text("flips\n1\nyes\n")
    assert main(["evidence", *[a.format(d=tmp_path) for a in args], "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_evidence_of_trained_runs_against_their_exact_log_likelihood(tmp_path, capsys):
    runs = []
    for z_dim in ("1", "3"):
        run = tmp_path / f"lg{z_dim}"
        main(["train", "--model", "linear-gaussian", "--guide-type", "diagonal", "--data",
              "synthetic", "--objective", "elbo", "--epochs", "3", "--lr", "0.05", "--z-dim",
              z_dim, "--out", str(run), "--no-progress"])  # fmt: skip
        runs.append(str(run))
    assert main(["evidence", *runs, "--limit", "20", "--temperatures", "50", "--chains", "16",
                 "--bdmc-points", "5", "--no-progress"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "lg1" / "evidence.json").read_text())
    from inference.runs import load_run

    for entry, run in zip(report["models"], runs, strict=True):
        _, dataset, model = load_run(run)
        x = dataset.split("test")[:20].double()
        with torch.no_grad():
            exact = float(model.double().log_marginal(x).sum())
        assert within(entry["log_evidence"], exact, entry["stderr"], slack=0.1), (entry, exact)
        assert entry["datapoints"] == 20 and entry["gap"] is not None
    assert "log BF [" in capsys.readouterr().out
    # evaluate --ais with the adaptive schedule reports the temperatures it placed
    assert main(["evaluate", runs[0], "--k", "1,100", "--limit", "10", "--ais", "--ais-schedule",
                 "adaptive", "--ais-chains", "16", "--no-progress"]) == 0  # fmt: skip
    ais = json.loads((tmp_path / "lg1" / "eval.json").read_text())["ais"]
    assert ais["temperature_cap"] == 1000 and 1 < ais["num_temperatures"] < 1000
    assert f"AIS-{ais['num_temperatures']}" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# The target is Pyro's own
# ---------------------------------------------------------------------------


def _load_schools():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eight_schools", SCHOOLS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_annealed_target_is_pyros_hmc_potential_energy(float64):
    """At beta = 1 the chains' log density in unconstrained space is minus the potential energy
    that Pyro's ``initialize_model`` builds for its HMC and NUTS (transforms, Jacobians and
    enumeration alike)."""
    from pyro.infer.mcmc.util import initialize_model

    from inference.ais import _make_path

    schools = _load_schools().hierarchical
    cases = [
        (schools, (), {"J": 8, "sigma": torch.tensor(SIGMA), "y": torch.tensor(Y)}),
        (mixture, (torch.tensor([1.8, -2.1, -1.2, -2.5, 2.2]),), {}),
        (beta_bernoulli, (torch.tensor([1.0, 0.0, 1.0, 1.0]),), {}),
    ]
    for model, args, kwargs in cases:
        pyro.set_rng_seed(0)
        init, potential_fn, _, _ = initialize_model(model, model_args=args, model_kwargs=kwargs,
                                                    max_plate_nesting=1)  # fmt: skip
        path = _make_path(model, None, args, kwargs, 6, None, "prior")
        values = path.start()
        log_p, _ = path.log_parts(values)
        for i in range(6):
            params = {name: values[name][i].reshape(init[name].shape) for name in init}
            assert float(log_p[i]) == pytest.approx(-float(potential_fn(params)), abs=1e-9)
