"""HierarchicalVAE: sites, corruptions, and the objectives on it."""

import pyro
import pytest
import torch
from pyro import poutine

from inference.bounds import elbo_bound, iwae_bound
from inference.objectives import make_objective
from inference.tracing import log_importance_weights
from ppl_models import HierarchicalVAE


def data(n=8, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) < 0.4).float()


@pytest.mark.parametrize(
    "options, sites",
    [
        (dict(layers=1), ["z"]),
        (dict(layers=3), ["h1", "h2", "z"]),
        (dict(layers=2, corruption="salt-pepper:0.1"), ["h1", "z"]),
        (dict(layers=3, corruption="dropout:0.2"), ["h1", "h2", "z"]),
        (dict(layers=2, corruption="gaussian:0.25"), ["h1", "z"]),
    ],
)
def test_sites_and_objectives(options, sites):
    model = HierarchicalVAE(12, hidden=(8,), z_dim=3, **options)
    x = data()
    guide_trace = poutine.trace(model.guide).get_trace(x)
    names = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and n != "data"]
    assert names == sites
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    assert model_trace.nodes["x"]["is_observed"]
    log_w = log_importance_weights(model.model, model.guide, x, num_particles=200)
    assert log_w.shape == (200, 8) and torch.isfinite(log_w).all()
    assert (elbo_bound(log_w).value <= iwae_bound(log_w).value + 1e-5).all()
    for name in ("elbo", "iwae", "dreg"):
        model.zero_grad()
        make_objective(name, num_particles=3).differentiable_loss(
            model.model, model.guide, x
        ).backward()
        grads = [p.grad for p in model.encoder.parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_corruption_probabilities():
    model = HierarchicalVAE(4, layers=2, hidden=(4,), z_dim=2, corruption="salt-pepper:0.2")
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(
        model.corruption_dist(x).base_dist.probs, torch.tensor([[0.1, 0.9, 0.9, 0.1]])
    )
    model = HierarchicalVAE(4, layers=2, hidden=(4,), z_dim=2, corruption="dropout:0.25")
    assert torch.allclose(
        model.corruption_dist(x).base_dist.probs, torch.tensor([[0.0, 0.75, 0.75, 0.0]])
    )


def test_bad_options():
    with pytest.raises(ValueError, match="kind must be one of"):
        HierarchicalVAE(4, corruption="snow:0.1")
    with pytest.raises(ValueError, match="at least 2"):
        HierarchicalVAE(4, layers=1, corruption="dropout:0.1")
    with pytest.raises(ValueError, match="needs binary data"):
        HierarchicalVAE(4, layers=2, corruption="dropout:0.1", likelihood="normal")
    with pytest.raises(ValueError, match="h_dims needs 2 sizes"):
        HierarchicalVAE(4, layers=3, h_dims=[5])


def test_hvae_trains(tmp_path):
    from inference.runs import TrainConfig, read_metrics
    from inference.svi import train

    config = TrainConfig(model="hvae", layers=2, objective="iwae", num_particles=3, epochs=4,
                         hidden=[32], z_dim=4, batch_size=128)  # fmt: skip
    train(config, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"]
    pyro.clear_param_store()
