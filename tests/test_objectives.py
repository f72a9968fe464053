"""Objectives: against Pyro's, against the bound they claim to be, and against each other."""

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from inference.bounds import iwae_bound
from inference.objectives import make_objective
from inference.tracing import log_importance_weights
from ppl_models import VAE, LinearGaussian


def small_vae(seed=0, x_dim=8):
    torch.manual_seed(seed)
    return VAE(x_dim, hidden=(6,), z_dim=2)


def binary_data(n, x_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, x_dim, generator=g) < 0.4).to(torch.get_default_dtype())


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_elbo_matches_pyro_trace_elbo_value_and_gradient(float64):
    vae, x = small_vae(), binary_data(16)
    results = []
    for objective in (make_objective("elbo", num_particles=4),
                      Trace_ELBO(num_particles=4, vectorize_particles=True)):  # fmt: skip
        # Pyro's first call guesses the plate nesting with a dry run that draws random
        # numbers (elbolab's does not): warm both up so that the seeded calls draw alike.
        objective.loss(vae.model, vae.guide, x, num_data=64)
        pyro.set_rng_seed(3)
        vae.zero_grad()
        loss = objective.differentiable_loss(vae.model, vae.guide, x, num_data=64)
        loss.backward()
        results.append((loss.detach(), grads(vae)))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-10)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-10), name


def test_iwae_objective_is_the_iwae_bound_on_full_batches(float64):
    lg = LinearGaussian(5, 2)
    torch.manual_seed(0)
    lg.set_params(weight=torch.randn(5, 2), loc=torch.zeros(5), scale=0.7)
    x = lg.sample(12)
    for name in ("iwae", "dreg"):
        loss = make_objective(name, num_particles=7).loss(lg.model, lg.guide, x)
        # exact guide: every weight is p(x), so the bound is exactly sum_n log p(x_n)
        assert loss == pytest.approx(-float(lg.log_marginal(x).detach().sum()), abs=1e-8)


def test_iwae_minibatch_average_equals_full_batch_bound(float64):
    """Subsampling: N/B times the minibatch bound is unbiased for the full-batch bound.

    Pyro's RenyiELBO(alpha=0) applies N/B inside the logsumexp and is biased here.
    """
    vae, x = small_vae(1), binary_data(40, seed=1)
    n, b, k, reps = 40, 8, 5, 3000
    iwae = make_objective("iwae", num_particles=k)
    # Reference: the expected IWAE-5 bound of the full batch, from many disjoint groups.
    log_w = log_importance_weights(vae.model, vae.guide, x, num_particles=k * 4000)
    full = iwae_bound(log_w, k=k)
    full_value, full_se = float(full.value.sum()), float(full.stderr.pow(2).sum().sqrt())
    renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True)
    ours, theirs = [], []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(reps):
            idx = torch.randperm(n, generator=gen)[:b]
            ours.append(-iwae.loss(vae.model, vae.guide, x[idx], num_data=n))
            theirs.append(-renyi.loss(vae.model, vae.guide, x[idx], num_data=n))
    ours, theirs = torch.tensor(ours), torch.tensor(theirs)
    se = (ours.var() / reps + full_se**2).sqrt()
    assert abs(ours.mean() - full_value) < 4 * se
    # The scale-inside-logsumexp estimator is off by far more than its error.
    assert abs(theirs.mean() - full_value) > 10 * (theirs.var() / reps).sqrt()


def test_dreg_gradient_agrees_with_iwae_in_expectation(float64):
    vae = small_vae(2)
    x = binary_data(1, seed=2).expand(200, -1)  # 200 independent estimates per call
    k, calls = 5, 30
    per_call = {"iwae": [], "dreg": []}
    for name in per_call:
        objective = make_objective(name, num_particles=k)
        pyro.set_rng_seed(5)
        for _ in range(calls):
            vae.zero_grad()
            objective.differentiable_loss(vae.model, vae.guide, x).backward()
            g = grads(vae)
            per_call[name].append(
                {part: torch.cat([v.flatten() for k, v in g.items() if k.startswith(part)])
                 for part in ("encoder", "decoder")}
            )  # fmt: skip

    def stacked(name, part):
        return torch.stack([call[part] for call in per_call[name]])

    # Same seed, same draws: the decoder gradient is the same formula, exactly.
    assert torch.allclose(stacked("iwae", "decoder"), stacked("dreg", "decoder"), atol=1e-8)
    # Encoder gradients: equal means within Monte Carlo error.
    enc_i, enc_d = stacked("iwae", "encoder"), stacked("dreg", "encoder")
    se = (enc_i.var(0) / calls + enc_d.var(0) / calls).sqrt()
    diff = (enc_i.mean(0) - enc_d.mean(0)).abs()
    assert (diff <= 4.5 * se + 1e-10).all(), float((diff / se).nan_to_num().max())


def test_dreg_gradient_with_exact_posterior_is_zero_for_the_guide(float64):
    """With q = p(z|x) every weight is equal: DReG's guide gradient is exactly zero (zero
    variance), while IWAE's reparameterised gradient keeps a score term that is not."""
    lg = LinearGaussian(4, 2, guide_type="diagonal")
    torch.manual_seed(0)
    with torch.no_grad():
        lg.weight.copy_(torch.eye(4, 2) * 1.5)  # orthogonal columns: posterior is diagonal
        lg.scale_raw.fill_(0.0)
    s2 = float(lg.scale.detach() ** 2)
    var = 1 / (1 + 1.5**2 / s2)
    with torch.no_grad():
        lg.enc_weight.copy_(torch.eye(2, 4) * 1.5 * var / s2)
        lg.enc_scale_raw.fill_(float(torch.log(torch.expm1(torch.tensor(var**0.5 - 1e-4)))))
    x = lg.sample(6)
    make_objective("dreg", num_particles=4).differentiable_loss(lg.model, lg.guide, x).backward()
    assert lg.enc_weight.grad.abs().max() < 1e-8
    assert lg.enc_scale_raw.grad.abs().max() < 1e-8
    lg.zero_grad()
    make_objective("iwae", num_particles=4).differentiable_loss(lg.model, lg.guide, x).backward()
    assert lg.enc_scale_raw.grad.abs().max() > 1e-3


def test_unknown_objective():
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("nope")


def _dreg_by_replay(objective, model, guide, x, **kwargs):
    """DReG as first written: draw, then replay the scaled draws (the guide runs three times)."""
    from inference.objectives import _ScaleGrad
    from inference.tracing import (
        latent_values,
        log_density,
        subsample_values,
        trace_guide,
        weighted_sample,
    )

    layout = objective._layout(model, guide, (x,), kwargs)
    first = trace_guide(guide, (x,), kwargs, layout)
    values, subsamples = latent_values(first), subsample_values(first)
    factors = {name: {} for name in values}
    scaled = {name: _ScaleGrad.apply(v, factors[name]) for name, v in values.items()}
    sample = weighted_sample(model, guide, (x,), kwargs, layout, values={**subsamples, **scaled})
    detached = {**subsamples, **{name: v.detach() for name, v in values.items()}}
    log_q_fixed = log_density(trace_guide(guide, (x,), kwargs, layout, values=detached), layout)
    wbar = torch.softmax(sample.log_w.detach(), 0)
    for name, value in values.items():
        event_dim = sample.guide_trace.nodes[name]["fn"].event_dim
        factors[name]["factor"] = layout.expand_factor(wbar, value, event_dim)
    surrogate = (wbar * (sample.log_w + log_q_fixed - log_q_fixed.detach())).sum(0)
    bound = objective.bound(sample.log_w)
    return -sample.scale() * (bound.detach() + surrogate - surrogate.detach()).sum()


@pytest.mark.parametrize("layers", [1, 2], ids=["vae", "hvae-2-layers"])
def test_dreg_drawing_and_scoring_in_one_guide_run_equals_the_replayed_estimator(float64, layers):
    from ppl_models import HierarchicalVAE

    torch.manual_seed(0)
    vae = VAE(8, hidden=(6,), z_dim=2) if layers == 1 else HierarchicalVAE(
        8, layers=2, hidden=[6], z_dim=2)  # fmt: skip
    x = binary_data(10)
    objective = make_objective("dreg", num_particles=5)
    objective.loss(vae.model, vae.guide, x, num_data=40)
    assert objective._one_latent == (layers == 1)  # one latent: drawn and scored in one run
    results = []
    for loss_fn in (
        objective.differentiable_loss,
        lambda *a, **k: _dreg_by_replay(objective, *a, **k),
    ):
        pyro.set_rng_seed(4)
        vae.zero_grad()
        loss = loss_fn(vae.model, vae.guide, x, num_data=40)
        loss.backward()
        results.append((loss.detach(), grads(vae)))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-10) and g1.keys() == g2.keys()
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-10), name
