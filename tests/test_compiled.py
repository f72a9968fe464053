"""The compiled training step against the eager one: same loss, gradients, training, resume."""

import importlib.util
import json
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference.compiled import BACKENDS, Captured, CompiledStep
from inference.objectives import make_objective
from inference.runs import TrainConfig
from inference.svi import train
from ppl_models import VAE, HierarchicalVAE

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "my_vae.py"


def _pyro_example_vae(x_dim):
    spec = importlib.util.spec_from_file_location("my_vae", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_model(x_dim)


@pytest.mark.parametrize(
    "build, objective, kwargs",
    [
        (lambda: VAE(64, hidden=[32], z_dim=4), "iwae", {"num_data": 1000}),
        (lambda: HierarchicalVAE(64, layers=2, hidden=[32], z_dim=4), "dreg", {"num_data": 1000}),
        (lambda: VAE(64, hidden=[32], z_dim=4), "dreg", {"num_data": 1000}),  # one guide run
        (lambda: _pyro_example_vae(64), "elbo", {}),  # pyro.module, Pyro's own way
    ],
    ids=["vae-iwae", "hvae-dreg", "vae-dreg", "pyro-example-elbo"],
)
@pytest.mark.parametrize("backend", ["inductor", "replay"])
def test_compiled_step_equals_the_eager_step(build, objective, kwargs, backend):
    """Compiled: equal to float rounding; replayed: the same operations, equal bit for bit."""
    pyro.set_rng_seed(0)
    model = build()
    x = (torch.rand(32, 64) < 0.3).float()
    step = CompiledStep(model, make_objective(objective, num_particles=5), kwargs, backend=backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="training eagerly")  # a fallback warns
        step(x)  # capture, compile and the first-step check
    assert step.compiled is not None and step.fallback is None and step.compile_seconds > 0
    params = step.params
    for seed in (1, 2):  # later steps: the same noise from the same state, in both paths
        torch.manual_seed(seed)
        loss = step(x)
        compiled = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        torch.manual_seed(seed)
        eager_loss = step.eager(x)
        if backend == "replay":
            assert torch.equal(loss, eager_loss)
            assert all(torch.equal(c, p.grad) for c, p in zip(compiled, params, strict=True))
            continue
        assert float(loss) == pytest.approx(float(eager_loss), rel=1e-5)
        for c, p in zip(compiled, params, strict=True):
            assert torch.allclose(c, p.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max()))
    # another shape (an epoch's last minibatch) runs eagerly, with no recompilation
    assert step(x[:7]).shape == () and step.shape == x.shape


class _DataDependent(torch.nn.Module):
    """A model whose Python control flow depends on the data's values: it cannot be captured."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(3))

    def model(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            scale = 2.0 if float(x.sum()) > 0 else 1.0
            pyro.sample("x", dist.Normal(z, scale).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(self.loc + 0 * x, 1.0).to_event(1))


def test_a_model_that_cannot_be_captured_trains_eagerly_and_says_so():
    model = _DataDependent()
    step = CompiledStep(model, make_objective("elbo"), {})
    x = torch.randn(8, 3)
    with pytest.warns(RuntimeWarning, match="training eagerly"):
        loss = step(x)
    assert step.compiled is None and "DataDependent" in step.fallback
    assert torch.isfinite(loss) and model.loc.grad is not None
    model.loc.grad = None
    step(x)  # eager from now on, silently
    assert model.loc.grad is not None
    # a replay, which nobody asked for by name, falls back without a warning
    replay = CompiledStep(model, make_objective("elbo"), {}, backend="replay")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay(x)
    assert replay.compiled is None and "DataDependent" in replay.fallback


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_compiled_training_matches_eager_training_and_resumes(tmp_path):
    options = dict(epochs=3, hidden=[32], z_dim=4, batch_size=128, num_particles=5)
    train(TrainConfig(**options), tmp_path / "eager", progress=False)
    train(TrainConfig(**options, compile=True), tmp_path / "compiled", progress=False)
    eager, compiled = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    assert compiled[0]["compiled"] and compiled[0]["compile_seconds"] > 0
    assert compiled[1]["compile_seconds"] == 0.0  # reported once, in the epoch that paid it
    for a, b in zip(eager, compiled, strict=True):
        assert b["train_bound"] == pytest.approx(a["train_bound"], rel=1e-4)
    w_eager = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)["model"]
    w_comp = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)["model"]
    for k in w_eager:
        assert torch.allclose(w_eager[k], w_comp[k], atol=1e-3), k
    # resume: 2 epochs, then a third, compiled again, equals the 3 epochs straight
    part = tmp_path / "part"
    train(TrainConfig(**{**options, "epochs": 2}, compile=True), part, progress=False)
    train(TrainConfig(**options, compile=True), part, resume=True, progress=False)
    w_part = torch.load(part / "checkpoint.pt", weights_only=True)["model"]
    for k in w_comp:
        assert torch.allclose(w_part[k], w_comp[k], atol=1e-6), k


def test_runs_long_enough_compile_by_default_and_config_json_records_the_choice(
    tmp_path, monkeypatch
):
    import inference.svi as svi
    from inference.commands.cli import build_parser

    # digits: 1437 training images, 11 full minibatches of 128 per epoch
    assert not svi.worth_compiling(TrainConfig(epochs=272), 1437)  # 2992 steps
    assert svi.worth_compiling(TrainConfig(epochs=273), 1437)  # 3003 steps
    options = dict(epochs=1, hidden=[32], z_dim=4, num_particles=2)
    train(TrainConfig(**options), tmp_path / "short", progress=False)
    assert json.loads((tmp_path / "short" / "config.json").read_text())["compile"] is False
    assert "compiled" not in _metrics(tmp_path / "short")[0]
    monkeypatch.setattr(svi, "COMPILE_MIN_STEPS", 11)
    train(TrainConfig(**options), tmp_path / "long", progress=False)
    assert json.loads((tmp_path / "long" / "config.json").read_text())["compile"] is True
    assert _metrics(tmp_path / "long")[0]["compiled"] is True
    # an explicit choice wins either way
    train(TrainConfig(**options, compile=False), tmp_path / "off", progress=False)
    assert json.loads((tmp_path / "off" / "config.json").read_text())["compile"] is False
    parser = build_parser()
    for flags, expected in (([], None), (["--compile"], True), (["--no-compile"], False)):
        args = parser.parse_args(["train", "--out", "x", *flags])
        assert args.compile is expected


def test_a_replayed_run_trains_bit_for_bit_like_an_eager_one(tmp_path, monkeypatch):
    import inference.svi as svi

    options = dict(epochs=2, hidden=[32], z_dim=4, num_particles=3, objective="dreg",
                   model="hvae")  # fmt: skip
    assert svi.worth_replaying(TrainConfig(epochs=46), 1437)  # 506 steps
    assert not svi.worth_replaying(TrainConfig(epochs=45), 1437)  # 495 steps
    assert not svi.worth_replaying(TrainConfig(epochs=46, num_particles=50), 1437)  # K > 10
    train(TrainConfig(**options), tmp_path / "eager", progress=False)
    monkeypatch.setattr(svi, "REPLAY_MIN_STEPS", 1)
    train(TrainConfig(**options), tmp_path / "replay", progress=False)
    eager, replay = _metrics(tmp_path / "eager"), _metrics(tmp_path / "replay")
    assert "replayed" not in eager[0] and all(row["replayed"] for row in replay)
    assert [r["train_bound"] for r in eager] == [r["train_bound"] for r in replay]
    w_eager = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)["model"]
    w_replay = torch.load(tmp_path / "replay" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(w_eager[k], w_replay[k]) for k in w_eager)


def test_compile_asked_for_a_split_batch_says_the_step_stays_eager(tmp_path):
    options = dict(epochs=1, hidden=[16], z_dim=2, num_particles=2, compile=True)
    with pytest.warns(RuntimeWarning, match="eager when the batch is split"):
        train(TrainConfig(**options), tmp_path / "pieces", shards=2, progress=False)
    assert "compiled" not in _metrics(tmp_path / "pieces")[0]


def test_captured_function_computes_what_its_inputs_do_not_reach_once():
    gen = torch.Generator().manual_seed(0)
    x, w_enc, w_dec = (torch.randn(*s, generator=gen) for s in ((4, 6), (6, 5), (5, 3)))

    def fn(z):
        a = torch.tanh(x @ w_enc)  # fixed data through fixed weights: invariant
        out = ((z @ w_dec.T) * a).sum(-1)
        return out, out.exp()

    z = torch.randn(4, 3, generator=gen)
    captured = Captured(fn, [z])
    products = [
        n for n in captured.graph.graph.nodes
        if n.op == "call_function" and n.target in (torch.ops.aten.mm.default,
                                                    torch.ops.aten.addmm.default)
    ]  # fmt: skip
    assert len(products) == 1  # z @ w_dec.T; x @ w_enc was computed once, at capture
    for backend in BACKENDS:
        both = captured.function([0, 1], backend=backend)(z)
        second = captured.function([1], backend=backend)(z)
        for got, want in zip((*both, *second), (*fn(z), fn(z)[1]), strict=True):
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="random"):
        Captured(lambda z: z + torch.randn_like(z), [z])

    def noisy(z):  # draws into fresh buffers, filled in place: never computed once
        eps = torch.empty(z.shape).normal_()
        more = torch.empty(2 * z.numel())
        more.view(2, *z.shape)[0].normal_()  # through a view of the buffer
        return (z + eps * torch.tanh(x @ w_enc).sum() + more[: z.numel()].view(z.shape),)

    drawing = Captured(noisy, [z], random=True)
    for backend in BACKENDS:
        f = drawing.function([0], backend=backend)
        torch.manual_seed(5)
        first, second = f(z)[0], f(z)[0]
        torch.manual_seed(5)
        torch.testing.assert_close(first, noisy(z)[0])  # the same draws as eager mode
        torch.testing.assert_close(second, noisy(z)[0])
        assert not torch.equal(first, second)


def test_inputs_held_fixed_are_computed_from_once_per_new_value():
    """``fixed`` inputs: what depends on them and the weights alone runs once per new tensor
    (or after it is written to), and the result follows the input as eager code does."""
    gen = torch.Generator().manual_seed(0)
    w_enc, w_dec = torch.randn(6, 5, generator=gen), torch.randn(5, 3, generator=gen)
    calls = []

    def fn(x, z):
        a = torch.tanh(x @ w_enc)  # held fixed between calls
        return (((z @ w_dec.T) * a).sum(-1) + torch.randn(x.shape[0]),)

    x1, x2, z = (torch.randn(4, n, generator=gen) for n in (6, 6, 3))
    captured = Captured(fn, [x1, z], random=True, fixed=(0,))
    products = [n for n in captured.graph.graph.nodes if n.target == torch.ops.aten.mm.default]
    assert len(products) == 1  # z @ w_dec.T: x @ w_enc is computed once per x
    pre = captured._pre
    captured._pre = lambda *xs: calls.append(xs) or pre(*xs)
    for backend in BACKENDS:
        f = captured.function([0], backend=backend)
        calls.clear()
        for x in (x1, x1, x2, x2):
            torch.manual_seed(1)
            got = f(x, z)[0]
            torch.manual_seed(1)
            torch.testing.assert_close(got, fn(x, z)[0])
        assert len(calls) == 2  # x1, then x2
        x2.mul_(2.0)  # written: computed again
        torch.manual_seed(1)
        got = f(x2, z)[0]
        torch.manual_seed(1)
        torch.testing.assert_close(got, fn(x2, z)[0])
        assert len(calls) == 3


def test_compiled_evaluation_equals_the_eager_one():
    """IWAE-k over a data set with the chunk compiled: the same draws, the same bounds to float
    rounding; the last, smaller batch and the last, partial chunk run eagerly."""
    from inference.evaluation import evaluate_bounds

    pyro.set_rng_seed(0)
    model = VAE(64, hidden=[32], z_dim=4)
    x = (torch.rand(50, 64) < 0.3).float()
    settings = dict(ks=[1, 45], batch_size=20, max_rows=200, seed=3, progress=False)  # chunk 10
    eager = evaluate_bounds(model.model, model.guide, x, **settings, compile=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="evaluating eagerly")  # a fallback warns
        compiled = evaluate_bounds(model.model, model.guide, x, **settings, compile=True)
    assert compiled["compiled"] and not eager["compiled"]
    for k in (1, 45):
        torch.testing.assert_close(compiled["iwae"][k].value, eager["iwae"][k].value,
                                   rtol=0, atol=1e-4)  # fmt: skip
    assert set(compiled["decomposition"]) == set(eager["decomposition"]) >= {"kl", "elbo"}
    for name, value in eager["decomposition"].items():  # compiled too, its own particles
        torch.testing.assert_close(compiled["decomposition"][name], value, rtol=0, atol=1e-4)
    assert compiled["kl_analytic"] and eager["kl_analytic"]
    assert not torch.equal(compiled["iwae"][45].value[:20], compiled["iwae"][45].value[20:40])


def test_an_evaluation_that_cannot_be_compiled_runs_eagerly_and_says_so():
    from inference.evaluation import evaluate_bounds

    model = _DataDependent()
    x = torch.randn(8, 3)
    settings = dict(ks=[1, 4], batch_size=8, max_rows=16, seed=0, progress=False)
    with pytest.warns(RuntimeWarning, match="evaluating eagerly"):
        tried = evaluate_bounds(model.model, model.guide, x, **settings, compile=True)
    eager = evaluate_bounds(model.model, model.guide, x, **settings, compile=False)
    assert not tried["compiled"]
    assert torch.equal(tried["iwae"][4].value, eager["iwae"][4].value)
