"""Hierarchical bounds against closed forms (all-Gaussian, linear model and encoder)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference.bounds import iwae_bound
from inference.hierarchical import hierarchical_log_densities

D_X, D_H, D_Z = 4, 3, 2


def make_problem(seed=0, reverse="random"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    p = dict(
        W=rnd(D_X, D_Z), mu=rnd(D_X), sigma=0.7,  # model x | z
        A=rnd(D_H, D_X, scale=0.5), a=rnd(D_H), sh=0.3 + rnd(D_H).abs(),  # q(h | x)
        B=rnd(D_Z, D_H, scale=0.5), b=rnd(D_Z), sz=0.2 + rnd(D_Z).abs() * 0.5,  # q(z | h)
        C=rnd(D_H, D_Z, scale=0.5), Dm=rnd(D_H, D_X, scale=0.3), c=rnd(D_H),
        sr=0.4 + rnd(D_H).abs() * 0.5,  # r(h | z, x)
    )  # fmt: skip
    if reverse == "prior":  # r(h | z, x) = q(h | x)
        p.update(C=torch.zeros(D_H, D_Z, dtype=torch.float64), Dm=p["A"], c=p["a"], sr=p["sh"])
    if reverse == "exact":  # r(h | z, x) = q(h | z, x), the Gaussian conditional
        sig_h = torch.diag(p["sh"] ** 2)
        cov_z = p["B"] @ sig_h @ p["B"].T + torch.diag(p["sz"] ** 2)
        gain = sig_h @ p["B"].T @ torch.linalg.inv(cov_z)
        shrink = torch.eye(D_H, dtype=torch.float64) - gain @ p["B"]
        p.update(C=gain, Dm=shrink @ p["A"], c=shrink @ p["a"] - gain @ p["b"])
        p["r_cov"] = shrink @ sig_h

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(D_Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ p["W"].T + p["mu"], p["sigma"]).to_event(1), obs=x)
            loc = z @ p["C"].T + x @ p["Dm"].T + p["c"]
            if "r_cov" in p:
                pyro.sample("h", dist.MultivariateNormal(loc, p["r_cov"]))
            else:
                pyro.sample("h", dist.Normal(loc, p["sr"]).to_event(1))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            h = pyro.sample("h", dist.Normal(x @ p["A"].T + p["a"], p["sh"]).to_event(1))
            pyro.sample("z", dist.Normal(h @ p["B"].T + p["b"], p["sz"]).to_event(1))

    return p, model, guide


def closed_forms(p, x):
    """L_marg, L_h, L_aux, I(z; h | x) and log p(x) per datapoint, exactly."""
    sig_h = torch.diag(p["sh"] ** 2)
    sig_z = torch.diag(p["sz"] ** 2)
    m_h = x @ p["A"].T + p["a"]
    m = m_h @ p["B"].T + p["b"]
    cov = p["B"] @ sig_h @ p["B"].T + sig_z  # q(z | x)
    W, mu, s2 = p["W"], p["mu"], p["sigma"] ** 2
    resid = x - m @ W.T - mu
    e_log_pz = -0.5 * D_Z * math.log(2 * math.pi) - 0.5 * (torch.trace(cov) + (m**2).sum(1))
    e_log_px_z = -0.5 * D_X * math.log(2 * math.pi * s2) - 0.5 / s2 * (
        (resid**2).sum(1) + torch.trace(W @ cov @ W.T)
    )
    e_log_p = e_log_pz + e_log_px_z

    def entropy(c):
        return 0.5 * torch.logdet(2 * math.pi * math.e * c)

    l_marg = e_log_p + entropy(cov)
    l_h = e_log_p + entropy(sig_z)
    # E[log r(h | z, x)]: u = h - C z is Gaussian given x
    C = p["C"]
    m_u = m_h - m @ C.T - x @ p["Dm"].T - p["c"]
    cross = sig_h @ p["B"].T  # Cov(h, z)
    cov_u = sig_h - cross @ C.T - C @ cross.T + C @ cov @ C.T
    prec = torch.diag(1 / p["sr"] ** 2)
    e_log_r = (
        -0.5 * D_H * math.log(2 * math.pi)
        - torch.log(p["sr"]).sum()
        - 0.5 * (((m_u**2) * (1 / p["sr"] ** 2)).sum(1) + torch.trace(prec @ cov_u))
    )
    l_aux = e_log_p + e_log_r + entropy(sig_h) + entropy(sig_z)
    marginal = dist.MultivariateNormal(mu, W @ W.T + s2 * torch.eye(D_X, dtype=torch.float64))
    mi = entropy(cov) - entropy(sig_z)
    return dict(l_marg=l_marg, l_h=l_h, l_aux=l_aux, mi=mi, log_px=marginal.log_prob(x))


def data(n, seed):
    return torch.randn(n, D_X, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def within(log_w, target, sigmas=4.0):
    """Mean over particles equals ``target`` within ``sigmas`` Monte Carlo standard errors."""
    mean, se = log_w.mean(0), log_w.std(0) / math.sqrt(log_w.shape[0])
    return bool(((mean - target).abs() < sigmas * se + 1e-9).all())


def test_hierarchical_terms_match_closed_forms(float64):
    p, model, guide = make_problem(0)
    x = data(5, 1)
    exact = closed_forms(p, x)
    k = 20000
    terms = hierarchical_log_densities(
        model, guide, x, aux_sites=["h"], num_particles=k, inner_samples=(1,)
    )
    assert within(terms["log_w_aux"], exact["l_aux"])
    assert within(terms["log_w_h"], exact["l_h"])
    # the chain: L_marg >= L_aux and L_marg >= L_h, the gap to L_h being I(z; h | x)
    assert (exact["l_marg"] >= exact["l_aux"]).all() and (exact["l_marg"] >= exact["l_h"]).all()
    assert torch.allclose(exact["l_marg"] - exact["l_h"], exact["mi"])
    assert (exact["mi"] > 0).all()
    # IWAE with the extended target p(x, z) r(h | z, x) is still a bound on log p(x)
    lse = torch.logsumexp(terms["log_w_aux"], 0) - math.log(k)
    assert (lse <= exact["log_px"] + 0.01).all() and (lse > exact["l_aux"]).all()


def test_exact_reverse_model_makes_the_plug_in_exact(float64):
    """With r(h|z,x) = q(h|z,x), q(z|h) q(h|x) / r(h|z,x) = q(z|x) for every h."""
    p, model, guide = make_problem(2, reverse="exact")
    x = data(4, 3)
    exact = closed_forms(p, x)
    terms = hierarchical_log_densities(
        model, guide, x, aux_sites=["h"], num_particles=4000, inner_samples=(1, 7)
    )
    assert torch.allclose(terms["log_w_marg[1]"], terms["log_w_marg[7]"], atol=1e-8)
    assert torch.allclose(terms["log_w_aux"], terms["log_w_marg[1]"], atol=1e-8)
    assert within(terms["log_w_marg[1]"], exact["l_marg"])
    # the paired mutual-information estimate against its closed form
    assert within(terms["log_w_marg[7]"] - terms["log_w_h"], exact["mi"])


def test_plug_in_bias_is_positive_and_shrinks_with_s(float64):
    p, model, guide = make_problem(4)
    x = data(3, 5)
    exact = closed_forms(p, x)
    k = 2000
    terms = hierarchical_log_densities(
        model, guide, x, aux_sites=["h"], num_particles=k, inner_samples=(1, 10, 100)
    )
    marg = {s: terms[f"log_w_marg[{s}]"] for s in (1, 10, 100)}
    se = {s: v.std(0) / math.sqrt(k) for s, v in marg.items()}
    mean = {s: v.mean(0) for s, v in marg.items()}
    for small, large in ((1, 10), (10, 100)):
        assert (mean[small] > mean[large] - 4 * (se[small] + se[large])).all()
    assert (mean[100] > exact["l_marg"] - 4 * se[100]).all()
    assert (mean[1] - mean[100]).sum() > 0


def test_reverse_model_equal_to_q_h_gives_l_aux_equal_l_h(float64):
    p, model, guide = make_problem(1, reverse="prior")
    x = torch.randn(3, D_X, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    terms = hierarchical_log_densities(
        model, guide, x, aux_sites=["h"], num_particles=50, inner_samples=(1,)
    )
    assert torch.allclose(terms["log_w_aux"], terms["log_w_h"], atol=1e-10)


def test_aggregate_posterior_terms():
    from inference.surgery import aggregate_posterior_terms

    prior = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))

    def same(x):  # every datapoint has the same posterior: no information about x
        return dist.Normal(torch.full_like(x, 0.3), 0.5).to_event(1)

    def apart(x):  # well-separated posteriors: I(x; z) reaches log N
        return dist.Normal(
            100 * torch.arange(len(x)).unsqueeze(1).expand_as(x).float(), 0.1
        ).to_event(1)

    pyro.set_rng_seed(0)
    flat = aggregate_posterior_terms(same, prior, x)
    assert abs(flat["mutual_information"]) < 1e-5
    assert abs(flat["marginal_kl"] - flat["average_kl"]) < 1e-5
    sharp = aggregate_posterior_terms(apart, prior, x, chunk_size=64)
    assert abs(sharp["mutual_information"] - math.log(400)) < 1e-3
    assert sharp["mutual_information"] <= sharp["log_n"] + 1e-6


def trained_split(tmp_path, *, steps, **options):
    """Train a small model for 3 epochs, then split its gap on 20 test images."""
    from inference.amortization import amortization_split
    from inference.bounds import iwae_bound
    from inference.runs import TrainConfig, load_run
    from inference.svi import train
    from inference.tracing import log_importance_weights

    config = TrainConfig(epochs=3, hidden=[32], z_dim=3, num_particles=2, batch_size=256,
                         **options)  # fmt: skip
    train(config, tmp_path / "run", progress=False)
    _, dataset, model = load_run(tmp_path / "run")
    x = dataset.split("test")[:20]
    pyro.set_rng_seed(0)
    log_w = log_importance_weights(model.model, model.guide, x, num_particles=2000)
    log_px = iwae_bound(log_w).value
    split = amortization_split(model, x, log_px=log_px, steps=steps, lr=0.05)
    total = split["approximation_gap"] + split["amortization_gap"]
    assert torch.allclose(total, split["total_gap"], atol=1e-5)
    return split, x, log_px


def test_amortization_split_adds_up_and_optimum_improves(tmp_path):
    split, _, _ = trained_split(tmp_path, steps=200)
    # a barely trained encoder is far from the per-datapoint optimum
    assert split["amortization_gap"].mean() > 0.1
    assert (split["approximation_gap"] > -0.05).all()


def test_discrete_case_exact_sums(float64):
    """z and h binary (2 units each): every term is an exact finite sum."""
    import itertools

    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    Wx, bz = rnd(3, 2), rnd(2)  # p(z) Bernoulli(sigmoid(bz)), p(x|z) Bernoulli(sigmoid(Wx z))
    Qh, qh = rnd(2, 3), rnd(2)  # q(h | x)
    Qz, qz = rnd(2, 2), rnd(2)  # q(z | h)
    Rz, Rx, rc = rnd(2, 2), rnd(2, 3), rnd(2)  # r(h | z, x)

    def bern(logits):
        return dist.Bernoulli(logits=logits).to_event(1)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", bern(bz.expand(x.shape[0], 2)))
            pyro.sample("x", bern(z @ Wx.T), obs=x)
            pyro.sample("h", bern(z @ Rz.T + x @ Rx.T + rc))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            h = pyro.sample("h", bern(x @ Qh.T + qh))
            pyro.sample("z", bern(h @ Qz.T + qz))

    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=2)), dtype=torch.float64)
    exact = {k: [] for k in ("l_marg", "l_h", "l_aux", "log_px")}
    for xn in x:
        log_p = torch.stack([bern(bz).log_prob(z) + bern(Wx @ z).log_prob(xn) for z in states])
        log_qh = torch.stack([bern(Qh @ xn + qh).log_prob(h) for h in states])
        log_qzh = torch.tensor([[bern(Qz @ h + qz).log_prob(z) for z in states] for h in states])
        log_r = torch.tensor([[bern(Rz @ z + Rx @ xn + rc).log_prob(h) for z in states]
                              for h in states])  # fmt: skip  # [h, z]
        joint = (log_qh[:, None] + log_qzh).exp()  # q(h, z | x), [h, z]
        q_z = joint.sum(0)
        exact["l_marg"].append((q_z * (log_p - q_z.log())).sum())
        exact["l_h"].append((joint * (log_p[None, :] - log_qzh)).sum())
        exact["l_aux"].append((joint * (log_p[None, :] + log_r - log_qzh - log_qh[:, None])).sum())
        exact["log_px"].append(torch.logsumexp(log_p, 0))
    exact = {k: torch.stack(v) for k, v in exact.items()}
    k = 40000
    terms = hierarchical_log_densities(
        model, guide, x, aux_sites=["h"], num_particles=k, inner_samples=()
    )
    assert within(terms["log_w_aux"], exact["l_aux"])
    assert within(terms["log_w_h"], exact["l_h"])
    iwae = iwae_bound(terms["log_w_aux"])
    assert ((iwae.value - exact["log_px"]).abs() < 4 * iwae.stderr + 1e-3).all()
    k = 4000
    terms = hierarchical_log_densities(
        model, guide, x, aux_sites=["h"], num_particles=k, inner_samples=(1, 400)
    )
    marg = terms["log_w_marg[400]"]
    se = marg.std(0) / math.sqrt(k)
    # the S = 400 plug-in's remaining bias is far below 0.01 nats for 4 hidden states
    assert ((marg.mean(0) - exact["l_marg"]).abs() < 4 * se + 0.01).all()
    assert (terms["log_w_marg[1]"].mean(0) > exact["l_marg"]).all()
    assert (exact["l_marg"] >= exact["l_aux"]).all() and (exact["l_marg"] >= exact["l_h"]).all()


def test_amortization_split_for_a_two_layer_encoder(tmp_path):
    from inference.amortization import amortization_split

    split, x, log_px = trained_split(tmp_path, steps=150, model="hvae", layers=2)
    assert split["amortization_gap"].mean() > 0  # local first-layer parameters help
    from ppl_models import HierarchicalVAE

    with pytest.raises(ValueError, match="no local parameters"):
        amortization_split(
            HierarchicalVAE(64, layers=2, corruption="dropout:0.1"), x, log_px=log_px
        )


def test_hierarchical_surgery_matches_the_exact_density_version(float64):
    """With r(h|z,x) = q(h|z,x) the plug-in density is exact: same draws, same terms."""
    from inference.bounds import logsumexp
    from inference.surgery import hierarchical_surgery

    p, model, guide = make_problem(3, reverse="exact")
    x = data(150, 4)
    prior = dist.Normal(torch.zeros(D_Z, dtype=torch.float64), 1.0).to_event(1)
    sig_h = torch.diag(p["sh"] ** 2)
    cov = p["B"] @ sig_h @ p["B"].T + torch.diag(p["sz"] ** 2)
    q = dist.MultivariateNormal((x @ p["A"].T + p["a"]) @ p["B"].T + p["b"], cov)
    z = q.sample()
    log_q = q.log_prob(z.unsqueeze(1))  # [draw n, component m]
    own = log_q.diagonal()
    mi = float((own - (logsumexp(log_q, 1) - math.log(150))).mean())
    avg_kl = float((own - prior.log_prob(z)).mean())
    plug_in = hierarchical_surgery(
        model, guide, x, aux_sites=["h"], prior=prior, inner_samples=3, draws={"z": z},
        max_rows=2000,
    )  # fmt: skip
    assert plug_in["mutual_information"] == pytest.approx(mi, abs=1e-8)
    assert plug_in["average_kl"] == pytest.approx(avg_kl, abs=1e-8)
    assert 0 < plug_in["mutual_information"] <= plug_in["log_n"]


def test_surgery_terms_carry_errors_and_name_an_impossible_sign():
    from inference.commands.gaps import format_surgery
    from inference.surgery import _surgery_terms

    gen = torch.Generator().manual_seed(0)
    kl = 1.0 + 0.1 * torch.randn(200, generator=gen, dtype=torch.float64)
    own = torch.randn(200, generator=gen, dtype=torch.float64)
    terms = _surgery_terms(kl, own, own + 0.5)  # I_q estimated at -0.5: impossible
    assert terms["mutual_information"] == pytest.approx(-0.5)
    assert terms["mutual_information_stderr"] < 1e-9  # the same shift for every draw
    assert terms["impossible"] == ["mutual_information"]
    assert terms["average_kl_stderr"] == pytest.approx(float(kl.std()) / math.sqrt(200))
    text = "\n".join(format_surgery(terms))
    assert "I_q(x;z) -0.500 +- 0.000" in text and "+-" in text.split("average KL")[1][:20]
    assert "mutual_information is below 0 by more than 3 s.e." in text
    fine = _surgery_terms(kl, own, own - 0.5)
    assert fine["impossible"] == [] and "below 0" not in "\n".join(format_surgery(fine))
