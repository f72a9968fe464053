"""Rewrites of recorded graphs (inference/rewrites.py): the same values as the operations they
replace, matched where the pattern is and nowhere else."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from inference.compiled import Captured
from inference.rewrites import addmm, bernoulli_sums, tanh
from ppl_models.vae import BernoulliLogits

aten = torch.ops.aten


def _record(fn, *inputs):
    return make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)


def _bernoulli_log_lik(logits, value):  # BernoulliLogits' log density summed over its event
    with torch.no_grad():
        return BernoulliLogits(logits, validate_args=False).to_event(1).log_prob(value)


def _logits(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * 30).to(dtype)
    flat = logits.view(-1)
    special = [0.0, -0.0, 17.0, -17.0, 19.9, 20.1, -40.0, -88.0, 90.0, -100.0, -800.0, 800.0]
    flat[: len(special)] = torch.tensor(special, dtype=dtype)
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("event", [784, 37, 16, 1, 2000])  # 1 group, padded, 1 vector, 2 groups
@pytest.mark.parametrize("values", ["binary", "fractions"])
def test_the_bernoulli_sum_is_the_softplus_sum(dtype, event, values):
    logits = _logits((3, 5, event), dtype)
    gen = torch.Generator().manual_seed(2)
    u = torch.rand(5, event, generator=gen, dtype=dtype)
    x = (u < 0.3).to(dtype) if values == "binary" else u  # the value broadcasts over particles
    graph = _record(_bernoulli_log_lik, logits, x)
    assert bernoulli_sums(graph) == 1
    graph.recompile()
    assert not any(n.target == aten.softplus.default for n in graph.graph.nodes)
    got, want = graph(logits, x), _bernoulli_log_lik(logits, x)
    assert got.shape == want.shape == (3, 5) and got.dtype == dtype
    # float32: one rounding of 1 + exp(-|l|) per element and of each product, against
    # the rounding of each log1p; float64 to its own precision
    scale = float(want.abs().max())
    tol = (5e-7 if dtype == torch.float32 else 1e-14) * max(scale, event)
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


def test_the_bernoulli_sum_keeps_infinite_and_nan_logits():
    logits = torch.zeros(4, 20)
    logits[0, 3], logits[1, 5], logits[2, 7] = float("inf"), float("-inf"), float("nan")
    x = torch.ones(20)
    x[5] = 0.0
    graph = _record(_bernoulli_log_lik, logits, x)
    assert bernoulli_sums(graph) == 1
    graph.recompile()
    got, want = graph(logits, x), _bernoulli_log_lik(logits, x)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite])


def test_other_sums_of_softplus_are_left_alone():
    logits, x = torch.randn(3, 8), (torch.rand(3, 8) < 0.5).float()

    def over_particles(logits, x):  # summed over the first dimension, not the event
        with torch.no_grad():
            return BernoulliLogits(logits, validate_args=False).log_prob(x).sum(0)

    def broadcast_logits(logits, x):  # the value broadcasts the logits up: fewer softplus terms
        with torch.no_grad():
            return BernoulliLogits(logits[0], validate_args=False).log_prob(x).sum(-1)

    def softplus_used_twice(logits, x):
        s = torch.nn.functional.softplus(logits)
        return torch.addcmul(-s, x, logits).sum(-1) + s.sum()

    for fn in (over_particles, broadcast_logits, softplus_used_twice):
        graph = _record(fn, logits, x)
        assert bernoulli_sums(graph) == 0, fn.__name__
        graph.recompile()
        assert torch.equal(graph(logits, x), fn(logits, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_by_exp_is_tanh(dtype):
    x = torch.cat([
        torch.randn(10_000, dtype=dtype) * 3,
        torch.logspace(-30, 3, 200, dtype=dtype),
        -torch.logspace(-30, 3, 200, dtype=dtype),
        torch.tensor([0.0, -0.0, 44.0, -44.0, 400.0, float("inf"), -float("inf")], dtype=dtype),
    ])  # fmt: skip
    graph = _record(torch.tanh, x)
    assert tanh(graph) == 1
    graph.recompile()
    got, want = graph(x), torch.tanh(x)
    atol = 2e-7 if dtype == torch.float32 else 1e-15
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0.0 stays -0.0
    assert graph(torch.tensor([float("nan")], dtype=dtype)).isnan().all()


def test_addmm_as_a_product_then_the_bias():
    a, w, b = torch.randn(50, 30), torch.randn(30, 20), torch.randn(20)
    graph = _record(lambda a, w, b: torch.addmm(b, a, w), a, w, b)
    assert addmm(graph) == 1
    graph.recompile()
    torch.testing.assert_close(graph(a, w, b), torch.addmm(b, a, w), rtol=1e-6, atol=1e-6)
    scaled = _record(lambda a, w, b: torch.addmm(b, a, w, beta=0.5), a, w, b)
    assert addmm(scaled) == 0  # a scaled bias is left to addmm


def test_a_vae_evaluation_chunk_is_rewritten_and_compiled_equal():
    """The evaluation's chunk of the elbolab VAE: the log-likelihood sum, the tanh layer and
    the products rewritten, the compiled weights equal to the eager ones."""
    from ppl_models import VAE

    torch.manual_seed(0)
    model = VAE(50, hidden=[32], z_dim=4)
    x = (torch.rand(6, 50) < 0.3).float()

    def chunk(xb):
        from inference.tracing import Layout, weighted_sample

        with torch.no_grad():
            sample = weighted_sample(model.model, model.guide, (xb,), {}, Layout(7, 1, "data"))
        return (sample.log_w,)

    captured = Captured(chunk, [x], random=True, fixed=(0,))
    compiled = captured.function([0])
    # the decoder's layers; the encoder's run on the batch, computed once, is not compiled
    assert captured.rewrites == {"bernoulli_sum": 1, "tanh": 1, "addmm": 2}
    torch.manual_seed(3)
    got = compiled(x)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(got, chunk(x)[0], rtol=1e-5, atol=1e-4)
