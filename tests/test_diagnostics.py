"""PSIS k-hat against theory, DataTree round trips, NUTS against a conjugate posterior."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS

from inference import diagnostics
from inference.commands.evaluate import format_report
from inference.reference import run_nuts


def gaussian_log_weights(s: float, k: int, n: int, seed: int = 0) -> np.ndarray:
    """Target N(0, 1), proposal N(0, s^2): (K, N) log weights."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, s, size=(k, n))
    return -0.5 * z**2 + 0.5 * (z / s) ** 2 + math.log(s)


@pytest.mark.parametrize("s, k_true", [(0.5, 0.75), (0.8, 0.36)])
def test_khat_matches_theory(s, k_true):
    """w ~ |z|^... has a Pareto tail with shape 1 - s^2 for s < 1.

    With K = 20000 draws PSIS fits about 3 sqrt(K) = 424 tail weights; the
    estimator's standard deviation is about (1 + k) / sqrt(424) ~ 0.085 per
    column, so the mean of 20 columns is within ~0.02 (plus a small bias from
    the regularising prior): 0.08 is ~4 standard errors.
    """
    khat = diagnostics.psis_khat(gaussian_log_weights(s, 20000, 20))
    assert khat.shape == (20,)
    assert abs(khat.mean() - k_true) < 0.08
    assert (np.abs(khat - k_true) < 0.35).all()


def test_khat_bounded_weights_and_one_dimensional_input():
    khat = diagnostics.psis_khat(gaussian_log_weights(1.5, 20000, 20))
    assert khat.mean() < 0.1 and (khat < 0.5).all()
    single = diagnostics.psis_khat(torch.as_tensor(gaussian_log_weights(0.5, 20000, 1)[:, 0]))
    assert single.shape == () and 0.5 < float(single) < 1.0


def test_khat_with_impossible_draws():
    lw = gaussian_log_weights(0.8, 5000, 3)
    lw[:100, 0] = -np.inf
    lw[:, 2] = -np.inf
    khat = diagnostics.psis_khat(lw)
    assert np.isfinite(khat[:2]).all() and khat[2] == np.inf


def test_importance_ess_and_summary():
    equal = np.zeros((100, 2))
    assert np.allclose(diagnostics.importance_ess(equal), 100.0)
    one = np.full((100, 1), -np.inf)
    one[3] = 0.0
    assert np.allclose(diagnostics.importance_ess(one), 1.0)
    summary = diagnostics.khat_summary([0.1, 0.6, 0.9, 1.2])
    assert (summary["good"], summary["ok"], summary["bad"]) == (1, 1, 2)
    warning = diagnostics.khat_warning(summary, what="the estimate")
    assert "2 of 4 datapoints" in warning and "1.20" in warning
    assert diagnostics.khat_warning(diagnostics.khat_summary([0.1]), what="x") is None


def test_evaluate_table_warns_on_bad_khat():
    bound = {"mean": -1.0, "stderr": 0.1}
    report = {
        "run": "r", "split": "test", "num_datapoints": 4, "data": "d", "binarization": "b",
        "seed": 0, "elbo": bound, "iwae": {"10": bound}, "seconds": 1.0,
        "decomposition": {"reconstruction": 0.0, "kl": 1.0, "entropy": 1.0},
        "kl_analytic": True, "log_px": {**bound, "k": 10, "estimator": "IWAE-10"},
        "khat": diagnostics.khat_summary([0.2, 0.3, 0.8, 0.9]), "is_ess_median": 3.0,
    }  # fmt: skip
    text = format_report(report)
    assert "warning: PSIS k-hat >= 0.7 for 2 of 4 datapoints" in text


def test_datatree_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 50, 4, 2))
    tree = diagnostics.samples_to_datatree(
        {"z": z}, coords={"datapoint": [2, 5, 7, 9]}, sample_stats={"diverging": z[..., 0, 0] > 2}
    )
    weights = diagnostics.weights_to_datatree(
        rng.normal(size=(100, 4)), bounds={"iwae": np.arange(4.0)}, datapoints=[2, 5, 7, 9]
    )
    tree["log_weights"] = weights["log_weights"]
    tree["bounds"] = weights["bounds"]
    path = diagnostics.save_datatree(tree, tmp_path / "t.nc")
    back = diagnostics.load_datatree(path)
    assert back["posterior"]["z"].dims == ("chain", "draw", "datapoint", "latent")
    assert np.array_equal(back["posterior"]["z"].values, z)
    assert list(back["posterior"]["datapoint"].values) == [2, 5, 7, 9]
    assert np.array_equal(back["bounds"]["iwae"].values, np.arange(4.0))
    assert back["log_weights"]["log_w"].dims == ("particle", "datapoint")
    assert np.isfinite(back["bounds"]["khat"].values).all()


def conjugate_model(x):
    """mu ~ N(0, 1), x_i ~ N(mu, 1): a model elbolab did not define."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


@pytest.mark.parametrize("jit", [False, True])
def test_nuts_recovers_the_conjugate_posterior(jit):
    x = torch.tensor([0.3, -1.2, 2.0, 0.7, 1.1, 0.4, -0.2, 0.9, 1.5, 0.6])
    samples, divergences = run_nuts(
        conjugate_model, x, num_chains=2, num_samples=600, warmup_steps=300, seed=1, jit=jit
    )
    mu = samples["mu"]
    assert mu.shape == (2, 600)
    tree = diagnostics.samples_to_datatree({"mu": mu})
    rhat, ess = diagnostics.rhat_ess(tree, "mu")
    assert rhat < 1.01 and ess > 300
    post_mean, post_sd = float(x.sum()) / 11, math.sqrt(1 / 11)
    # Monte Carlo standard error of the mean: sd / sqrt(ESS).
    assert abs(float(mu.mean()) - post_mean) < 4 * post_sd / math.sqrt(float(ess))
    assert abs(float(mu.std()) / post_sd - 1) < 0.1
    assert not any(divergences.values())


# On 2 cores Pyro keeps one core free and draws the chains one after another; it says so.
@pytest.mark.filterwarnings("ignore:num_chains=2 is more than available_cpu")
def test_from_mcmc_with_several_chains():
    x = torch.tensor([0.5, 1.5, -0.3])
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(conjugate_model), num_samples=100, warmup_steps=50, num_chains=2,
                disable_progbar=True, mp_context="spawn")  # fmt: skip
    mcmc.run(x)
    tree = diagnostics.from_mcmc(mcmc)
    assert tree["posterior"]["mu"].dims == ("chain", "draw")
    assert tree["posterior"]["mu"].shape == (2, 100)
    assert tree["sample_stats"]["diverging"].shape == (2, 100)


def test_from_guide():
    def guide(x):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", 5):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    tree = diagnostics.from_guide(guide, torch.zeros(5, 3), num_samples=40)
    assert tree["posterior"]["z"].dims == ("chain", "draw", "datapoint", "latent")
    assert tree["posterior"]["z"].shape == (1, 40, 5, 3)
