"""RBM: energies against brute force, the exact-posterior guide, exact log Z, AIS bracket."""

import functools
import itertools
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference.bounds import elbo_bound
from inference.partition import ais_log_partition, exact_log_partition
from inference.tracing import log_importance_weights
from ppl_models.rbm import RBM


def random_rbm(n_v, n_h, seed=0, scale=1.0):
    torch.manual_seed(seed)
    rbm = RBM(n_v, n_h)
    with torch.no_grad():
        rbm.W.normal_(0, scale)
        rbm.b_v.normal_(0, scale)
        rbm.b_h.normal_(0, scale)
    return rbm.double()


def all_states(n):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def test_free_energy_is_energy_summed_over_h_and_log_z_brute_force():
    rbm = random_rbm(4, 3)
    v, h = all_states(4), all_states(3)
    with torch.no_grad():
        energies = rbm.energy(v[:, None, :], h[None, :, :])  # (16, 8)
        assert torch.allclose(-rbm.free_energy(v), torch.logsumexp(-energies, 1))
        brute = float(torch.logsumexp(-energies.reshape(-1), 0))
    assert exact_log_partition(rbm) == pytest.approx(brute, abs=1e-10)
    wide = random_rbm(3, 5, seed=1)  # enumerates v instead of h
    with torch.no_grad():
        e = wide.energy(all_states(3)[:, None, :], all_states(5)[None, :, :])
    assert exact_log_partition(wide) == pytest.approx(float(torch.logsumexp(-e.reshape(-1), 0)))
    assert exact_log_partition(rbm, chunk_size=3) == pytest.approx(brute, abs=1e-10)


def test_exact_guide_elbo_is_minus_free_energy_and_other_guides_leave_a_gap():
    rbm = random_rbm(6, 4, seed=2)
    v = all_states(6)[::5]
    with torch.no_grad():
        target = -rbm.free_energy(v)
    log_w = log_importance_weights(rbm.model, rbm.guide, v, num_particles=20)
    assert torch.allclose(log_w, target.expand(20, -1), atol=1e-10)

    def mean_field(v):
        with pyro.plate("data", v.shape[0]):
            pyro.sample("h", dist.Bernoulli(probs=torch.full((4,), 0.3, dtype=v.dtype)).to_event(1))

    log_w = log_importance_weights(rbm.model, mean_field, v, num_particles=4000)
    elbo = elbo_bound(log_w)
    assert ((target - elbo.value) > 5 * elbo.stderr).all()  # KL(q || p(h|v)) > 0


def test_bad_visible_data():
    rbm = RBM(5, 2)
    with pytest.raises(ValueError, match="5 visible units"):
        rbm.check_visible(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="binary"):
        rbm.check_visible(torch.full((3, 5), 0.5))


@pytest.mark.parametrize("schedule", ["linear", "sm08"])
def test_ais_on_20_hidden_units_is_within_its_error_of_exact_and_reverse_brackets(schedule):
    rbm = random_rbm(30, 20, seed=3, scale=1.0)
    exact = exact_log_partition(rbm)  # 2^20 hidden states
    # Data: exact samples would make reverse AIS unbiased; long Gibbs chains are close.
    torch.manual_seed(0)
    v = torch.bernoulli(torch.full((500, 30), 0.5, dtype=torch.float64))
    v, _ = rbm.gibbs(v, steps=500)
    ais = {"num_chains": 200, "num_betas": 2000, "data": v, "schedule": schedule}
    forward = ais_log_partition(rbm, **ais, seed=0)
    reverse = ais_log_partition(rbm, **ais, seed=1, reverse=True)
    assert 0 < forward.stderr < 0.05 and 0 < reverse.stderr < 0.05
    assert abs(forward.log_z - exact) < 4 * forward.stderr
    assert abs(reverse.log_z - exact) < 4 * reverse.stderr
    assert forward.log_z - 3 * forward.stderr <= exact <= reverse.log_z + 3 * reverse.stderr


def test_beta_schedules():
    from inference.commands.cli import main
    from inference.partition import BETA_SCHEDULES, beta_schedule

    for kind in ("sm08", "linear"):  # every schedule is offered by the command
        with pytest.raises(SystemExit) as stop:
            main(["rbm", "evaluate", "--schedule", kind, "--help"])
        assert stop.value.code == 0
    with pytest.raises(SystemExit) as stop:
        main(["rbm", "evaluate", "RUN", "--schedule", "unknown"])
    assert stop.value.code == 2
    assert set(BETA_SCHEDULES) == {"sm08", "linear"}

    for kind in ("linear", "sm08"):
        betas = beta_schedule(14_500, kind)
        assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()
    sm08 = beta_schedule(14_501, "sm08")
    # the paper's counts: 500 steps to 0.5, 4000 more to 0.9, 10000 to 1 (14,501 values)
    assert sm08[500] == pytest.approx(0.5, abs=1e-12)
    assert sm08[4500] == pytest.approx(0.9, abs=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        beta_schedule(10, "cosine")


def test_gibbs_sampling_matches_the_exact_distribution():
    """Chi-square test of p(v) on a 3x2 RBM from 20000 samples of long chains."""
    rbm = random_rbm(3, 2, seed=4)
    states = all_states(3)
    with torch.no_grad():
        log_p = -rbm.free_energy(states) - exact_log_partition(rbm)
    torch.manual_seed(0)
    v, _ = rbm.gibbs(torch.zeros(20000, 3, dtype=torch.float64), steps=50)
    codes = (v * torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)).sum(1).long()
    observed = torch.bincount(codes, minlength=8).double()
    expected = 20000 * log_p.exp()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: the 0.999 quantile is 24.3.
    assert chi2 < 24.3, chi2
    assert math.isclose(float(log_p.exp().sum()), 1.0, rel_tol=1e-10)


def test_long_chain_contrastive_gradient_is_the_exact_gradient():
    """With (near) exact negative samples, E[CD gradient] = d mean log p(v) / d theta."""
    from inference.contrastive import contrastive_gradient

    rbm = random_rbm(5, 3, seed=5, scale=0.7).requires_grad_(True)
    v_data = all_states(5)[[1, 6, 7, 19, 30]]
    log_z = torch.logsumexp(-rbm.free_energy(all_states(5)), 0)
    (-rbm.free_energy(v_data) - log_z).mean().backward()
    exact = {name: p.grad.clone() for name, p in rbm.named_parameters()}
    rbm.requires_grad_(False)
    torch.manual_seed(0)
    start = v_data.repeat(8000, 1)  # 40000 chains started at the data
    v_neg, _ = rbm.gibbs(start, steps=60)
    estimate = contrastive_gradient(rbm, v_data, v_neg)
    # Monte Carlo error of the negative phase: sd of v_i p(h_j|v) over chains / sqrt(40000).
    ph = torch.sigmoid(rbm.hidden_logits(v_neg))
    se_w = (v_neg[:, :, None] * ph[:, None, :]).std(0) / math.sqrt(v_neg.shape[0])
    assert ((estimate["W"] - exact["W"]).abs() < 5 * se_w + 1e-3).all()
    assert ((estimate["b_v"] - exact["b_v"]).abs() < 5 * v_neg.std(0) / 200 + 1e-3).all()
    assert ((estimate["b_h"] - exact["b_h"]).abs() < 5 * ph.std(0) / 200 + 1e-3).all()


@pytest.mark.parametrize("momentum", [0.5, 0.0])
@pytest.mark.parametrize("method", ["cd", "pcd"])
def test_training_update_is_the_contrastive_gradient_with_momentum_and_decay(method, momentum):
    """_cd_update (fused, in place) against contrastive_gradient, with known negatives.

    Visible biases of +-40 make p(v|h) deterministic, so v_neg is known and the
    two code paths must agree to rounding for two steps of momentum and decay.
    """
    from inference.contrastive import RBMConfig, _cd_update, contrastive_gradient
    from ppl_models.rbm import BernoulliStream

    rbm = random_rbm(6, 4, seed=7, scale=0.3).requires_grad_(False)
    with torch.no_grad():
        rbm.b_v.copy_(40.0 * torch.tensor([1.0, -1, -1, 1, 1, -1], dtype=torch.float64))
    v_neg = (rbm.b_v > 0).double().expand(5, -1)
    config = RBMConfig(method=method, cd_steps=2, momentum=momentum, weight_decay=0.01)
    velocity = {name: torch.zeros_like(p) for name, p in rbm.named_parameters()}
    expected_vel = {name: torch.zeros_like(p) for name, p in rbm.named_parameters()}
    chains = torch.zeros(5, 4, dtype=torch.float64)
    torch.manual_seed(0)
    for lr in (0.1, 0.05):
        v = torch.bernoulli(torch.full((5, 6), 0.5, dtype=torch.float64))
        grad = contrastive_gradient(rbm, v, v_neg)
        grad["W"] = grad["W"] - config.weight_decay * rbm.W
        expected = {}
        for name, p in rbm.named_parameters():
            expected_vel[name] = config.momentum * expected_vel[name] + lr * grad[name]
            expected[name] = p + expected_vel[name]
        chains = _cd_update(rbm, v, chains, config, velocity, lr, BernoulliStream(0).sample)
        for name, p in rbm.named_parameters():
            assert torch.allclose(p, expected[name], atol=1e-12), name
    assert chains.shape == (5, 4) and ((chains == 0) | (chains == 1)).all()


@pytest.mark.parametrize("method, momentum, cd_steps", [("pcd", 0.0, 1), ("pcd", 0.5, 1),
                                                       ("cd", 0.5, 2)])  # fmt: skip
def test_sparse_kernels_give_the_dense_update(method, momentum, cd_steps):
    """_cd_update through inference.kernels against torch's products, from the same state.

    p(v|h) is a dense product in both, so with the same draws the two paths
    see the same negative visibles and must agree to float rounding.
    """
    from inference.contrastive import RBMConfig, _cd_update
    from ppl_models.rbm import BernoulliStream

    torch.manual_seed(0)
    start = RBM(50, 70).requires_grad_(False)  # 70: not a multiple of the kernels' 8-float vectors
    with torch.no_grad():
        start.W.normal_(0, 0.3)
        start.b_h.normal_(0, 0.5)
    config = RBMConfig(method=method, cd_steps=cd_steps, momentum=momentum, weight_decay=0.01)
    data = (torch.rand(3, 12, 50) < 0.15).float()
    chains0 = (torch.rand(12, 70) < 0.3).float()
    results = []
    for sparse in (False, True):
        rbm = RBM(50, 70).requires_grad_(False)
        rbm.load_state_dict(start.state_dict())
        velocity = {name: torch.zeros_like(p) for name, p in rbm.named_parameters()}
        chains, draw = chains0.clone(), BernoulliStream(1).sample
        for v, lr in zip(data, (0.1, 0.05, 0.05), strict=True):
            chains = _cd_update(rbm, v, chains, config, velocity, lr, draw, sparse)
        results.append((rbm, chains))
    (dense, dense_chains), (kernel, kernel_chains) = results
    for name, p in dense.named_parameters():
        torch.testing.assert_close(getattr(kernel, name), p, rtol=0, atol=2e-6)
        assert not torch.equal(getattr(start, name), p), name  # the updates did move it
    assert torch.equal(kernel_chains, dense_chains)


@pytest.mark.parametrize("sparse_kernels", [None, True])
def test_rbm_training_improves_exact_likelihood_and_resumes_exactly(
    tmp_path, monkeypatch, sparse_kernels
):
    import inference.contrastive as contrastive
    import inference.training as training
    from inference.runs import read_metrics

    # Digits are 32% ones, above SPARSE_DENSITY: by default dense products, True forces the kernels.
    config = contrastive.RBMConfig(hidden=10, epochs=6, seed=3)  # linear lr decay over 6 epochs
    train = functools.partial(contrastive.train_rbm, progress=False, sparse_kernels=sparse_kernels)
    full = train(config, tmp_path / "full")
    rows = read_metrics(tmp_path / "full")
    assert {r["products"] for r in rows} == {"sparse" if sparse_kernels else "dense"}
    assert rows[-1]["exact_log_likelihood"] > rows[0]["exact_log_likelihood"]
    # the updates alone, timed apart from the held-out metrics that the epoch's seconds include
    assert all(0 < r["update_seconds"] < r["seconds"] for r in rows)

    save = training.save_checkpoint

    def interrupted_after_epoch_3(out, state):
        save(out, state)
        if state["epoch"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", interrupted_after_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "split")
    monkeypatch.undo()
    resumed = train(config, tmp_path / "split", resume=True)
    assert all(
        torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters(), strict=True)
    )
    assert [r["exact_log_likelihood"] for r in read_metrics(tmp_path / "split")] == [
        r["exact_log_likelihood"] for r in rows
    ]


def test_rbm_cli(tmp_path, capsys):
    from inference.commands.cli import main

    run = str(tmp_path / "rbm")
    assert main(["rbm", "train", "--hidden", "8", "--epochs", "3", "--out", run,
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "exact log-likelihood" in out and "; dense products;" in out  # digits: 32% ones
    assert main(["rbm", "train", "--hidden", "8", "--epochs", "1", "--sparse-kernels",
                 "--out", str(tmp_path / "kernels"), "--no-progress"]) == 0  # fmt: skip
    assert "; sparse products;" in capsys.readouterr().out
    assert main(["rbm", "evaluate", run, "--chains", "50", "--betas", "500"]) == 0
    out = capsys.readouterr().out
    assert "exact" in out and "reverse AIS" in out and "bracket" in out
    report = json.loads((tmp_path / "rbm" / "rbm_eval.json").read_text())
    low, high = report["bracket"]
    assert low <= report["exact"]["log_likelihood"] <= high
    assert (tmp_path / "rbm" / "rbm_eval.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", run]) == 1
    assert "is a rbm run; use elbolab rbm evaluate" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hidden", "0"], "hidden"),
        (["--method", "cd", "--cd-steps", "0"], "cd-steps"),
        (["--data", "binarized-mnist", "--data-path", "NONBINARY"], "needs 0/1 data, found 2"),
    ],
)
def test_rbm_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    import numpy as np

    from inference.commands.cli import main

    bad = tmp_path / "nonbinary.npz"
    np.savez(bad, **{s: np.full((4, 784), 2, dtype=np.uint8) for s in ("train", "valid", "test")})
    args = [str(bad) if a == "NONBINARY" else a for a in args]
    assert main(["rbm", "train", *args, "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bernoulli_stream_draws_the_requested_probabilities_and_checkpoints_exactly():
    from ppl_models.rbm import BernoulliStream

    stream = BernoulliStream(5)
    probs = torch.tensor([0.0, 1e-3, 0.25, 0.5, 0.9, 1.0])
    n = 200_000
    draws = stream.sample(probs.expand(n, -1).contiguous())
    assert draws.dtype == torch.float32 and ((draws == 0) | (draws == 1)).all()
    freq = draws.mean(0)
    stderr = (probs * (1 - probs) / n).sqrt()
    assert (freq - probs).abs().le(4 * stderr + 1e-7).all(), (freq, probs)
    assert freq[0] == 0 and freq[-1] == 1  # certain outcomes are exact
    # float64 probabilities give float64 draws from the same uniforms
    state = stream.state
    p64 = torch.rand(300, 7, dtype=torch.float64)
    a = stream.sample(p64)
    stream.set_state(state)
    b = stream.sample(p64.float())
    assert a.dtype == torch.float64 and torch.equal(a.float(), b)
    # the state restores the stream exactly; another seed gives other draws
    state = stream.state
    first = stream.sample(torch.full((1000,), 0.5))
    stream.set_state(state)
    assert torch.equal(stream.sample(torch.full((1000,), 0.5)), first)
    assert not torch.equal(BernoulliStream(6).sample(torch.full((1000,), 0.5)), first)
    assert torch.equal(BernoulliStream(6).sample(torch.full((1000,), 0.5)),
                       BernoulliStream(6).sample(torch.full((1000,), 0.5)))  # fmt: skip


def test_pseudo_log_likelihood_is_the_flipped_free_energy_gap():
    """One product for both free energies (hidden logits +- a row of W) against flipping v."""
    from inference.contrastive import pseudo_log_likelihood, reconstruction_error

    rbm = random_rbm(12, 7, seed=2).requires_grad_(False)
    v = torch.bernoulli(torch.full((40, 12), 0.3, dtype=torch.float64))
    torch.manual_seed(5)
    fast = pseudo_log_likelihood(rbm, v)
    torch.manual_seed(5)
    idx = torch.randint(12, (40,))
    flipped = v.clone()
    flipped[torch.arange(40), idx] = 1 - flipped[torch.arange(40), idx]
    gap = rbm.free_energy(flipped) - rbm.free_energy(v)
    expected = 12 * torch.nn.functional.logsigmoid(gap).mean()
    assert fast == pytest.approx(float(expected), abs=1e-12)
    hidden = rbm.hidden_logits(v)
    for metric in (pseudo_log_likelihood, reconstruction_error):
        torch.manual_seed(6)
        given = metric(rbm, v, hidden=hidden)
        torch.manual_seed(6)
        assert given == metric(rbm, v)
