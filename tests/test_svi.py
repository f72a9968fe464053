"""The training loop: exact resume, the NaN guard, atomic files, learning a known model."""

import json

import pytest
import torch

from inference import objectives
from inference.runs import RunError, TrainConfig, load_checkpoint, read_metrics
from inference.svi import train
from inference.training import TrainingDiverged


def tiny_config(**overrides):
    base = dict(model="vae", data="digits", objective="iwae", num_particles=3, epochs=4,
                batch_size=256, hidden=[16], z_dim=2, seed=7)  # fmt: skip
    base.update(overrides)
    return TrainConfig(**base)


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = train(tiny_config(), tmp_path / "full", progress=False)
    train(tiny_config(epochs=2), tmp_path / "split", progress=False)
    resumed = train(tiny_config(epochs=4), tmp_path / "split", resume=True, progress=False)
    a, b = params(full), params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_metrics(tmp_path / "split")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    full_rows = read_metrics(tmp_path / "full")
    assert [r["train_bound"] for r in rows] == [r["train_bound"] for r in full_rows]


def test_resume_after_an_interrupted_epoch(tmp_path):
    def interrupt(epoch, step, loss):
        if epoch == 2 and step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(), tmp_path / "run", progress=False, on_step=interrupt)
    assert load_checkpoint(tmp_path / "run")["epoch"] == 2
    resumed = train(tiny_config(), tmp_path / "run", resume=True, progress=False)
    full = train(tiny_config(), tmp_path / "full", progress=False)
    assert all(torch.equal(params(full)[k], v) for k, v in params(resumed).items())


def test_resume_refuses_a_changed_configuration(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(RunError, match="lr"):
        train(tiny_config(lr=0.1), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(RunError, match="already holds a run"):
        train(tiny_config(), tmp_path / "run", progress=False)


def test_nan_guard_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    train(tiny_config(epochs=1), tmp_path / "one", progress=False)
    real = objectives.IWAE.differentiable_loss
    calls = {"n": 0}
    steps_per_epoch = 6  # 1437 rows in batches of 256

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] > steps_per_epoch + 2 else loss

    monkeypatch.setattr(objectives.IWAE, "differentiable_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 3.*epoch 1\) is kept"):
        train(tiny_config(), tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run")
    assert state["epoch"] == 1
    good = load_checkpoint(tmp_path / "one")["model"]
    assert all(torch.equal(good[k], v) for k, v in state["model"].items())
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1]
    json.loads((tmp_path / "run" / "config.json").read_text())
    assert not list((tmp_path / "run").glob(".*"))  # no temporary files left behind


def test_linear_gaussian_learns_the_generating_density(tmp_path):
    """Maximum likelihood through the exact-posterior ELBO reaches the truth's log p(x)."""
    config = TrainConfig(model="linear-gaussian", data="synthetic", objective="elbo",
                         num_particles=1, epochs=40, batch_size=100, lr=0.05, seed=0,
                         z_dim=4, guide_type="exact")  # fmt: skip
    model = train(config, tmp_path / "lg", progress=False)
    from inference.data import load_dataset

    data = load_dataset("synthetic")
    x = data.split("test")
    with torch.no_grad():
        learned = float(model.log_marginal(x).mean())
        truth = float(data.truth.log_marginal(x).mean())
    # 2000 training points of a 16-dim model: the fitted density is within 0.3 nats of the truth.
    assert abs(learned - truth) < 0.3, (learned, truth)


def test_bad_configuration_is_named(tmp_path):
    cases = [
        (dict(epochs=0), "--epochs"),
        (dict(lr=-1.0), "--lr"),
        (dict(objective="x"), "--objective"),
        (dict(hidden=[0]), "--hidden"),
        (dict(activation="sigmoidish"), "--activation"),
    ]
    for bad, message in cases:
        with pytest.raises(RunError, match=message):
            train(tiny_config(**bad), tmp_path / "bad", progress=False)
