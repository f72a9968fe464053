"""The compiled sparse-product kernels against torch's dense products, and their fallback."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from inference import kernels

# Widths that exercise every register block (64 floats), the 8-float vectors and the scalar tail.
SHAPES = [(100, 784, 500), (1, 1, 1), (7, 13, 70), (3, 5, 8), (64, 100, 129), (2, 9, 3)]


def sparse(n: int, d: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """Mostly zeros; the nonzeros are not all 1, so the kernels' coefficients are exercised."""
    mask = torch.rand(n, d, generator=generator) < density
    ones = torch.rand(n, d, generator=generator) < 0.5
    values = torch.where(ones, 1.0, torch.randn(n, d, generator=generator))
    return (mask * values).float()


def assert_rounding_close(out, exact, scale):
    """Within float32 rounding of a sum: a few units in the last place of the sum of |terms|."""
    error = (out.double() - exact).abs()
    assert (error <= 1e-6 * scale.double() + 1e-30).all(), float((error / scale).max())


def test_the_kernels_build_where_a_c_compiler_is():
    """CI and the development machines have gcc (torch.compile needs it): no silent fallback."""
    assert kernels.available(), kernels.unavailable_reason()


@pytest.mark.parametrize("n, d, h", SHAPES)
def test_sparse_times_dense_is_addmm(n, d, h):
    g = torch.Generator().manual_seed(n * d * h)
    a, w, bias = sparse(n, d, 0.2, g), torch.randn(d, h, generator=g), torch.randn(h, generator=g)
    out = kernels.sparse_times_dense(a, w, bias)
    expected = torch.addmm(bias.double(), a.double(), w.double())
    assert_rounding_close(out, expected, torch.addmm(bias.abs(), a.abs(), w.abs()))


@pytest.mark.parametrize("n, d, h", SHAPES)
def test_sparse_outer_add_is_two_addmm(n, d, h):
    g = torch.Generator().manual_seed(n + d + h)
    w = torch.randn(d, h, generator=g)
    a1, p1 = sparse(n, d, 0.2, g), torch.rand(n, h, generator=g)
    a2, p2 = sparse(n + 3, d, 0.1, g), torch.rand(n + 3, h, generator=g)
    expected = (0.9 * w.double()).addmm_(a1.T.double(), p1.double(), alpha=0.5)
    expected.addmm_(a2.T.double(), p2.double(), alpha=-2.0)
    scale = (0.9 * w.abs()).addmm_(a1.T.abs(), p1, alpha=0.5).addmm_(a2.T.abs(), p2, alpha=2.0)
    out = kernels.sparse_outer_add(w, a1, p1, a2, p2, beta=0.9, alpha1=0.5, alpha2=-2.0)
    assert out is w
    assert_rounding_close(w, expected, scale)


def test_all_zero_factors_leave_the_bias_and_scale_the_target():
    a, w, bias = torch.zeros(4, 30), torch.randn(30, 20), torch.randn(20)
    assert torch.equal(kernels.sparse_times_dense(a, w, bias), bias.expand(4, 20))
    target = torch.randn(30, 20)
    expected = target * 0.5
    kernels.sparse_outer_add(target, a, torch.randn(4, 20), a, torch.randn(4, 20), beta=0.5)
    assert torch.equal(target, expected)


def test_results_do_not_depend_on_the_number_of_threads():
    g = torch.Generator().manual_seed(0)
    a, w, bias = sparse(100, 784, 0.13, g), torch.randn(784, 500, generator=g), torch.randn(500)
    p = torch.rand(100, 500, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            target = w.clone()
            kernels.sparse_outer_add(target, a, p, a, p, alpha1=0.1, alpha2=-0.2)
            results.append((kernels.sparse_times_dense(a, w, bias), target))
    finally:
        torch.set_num_threads(threads)
    for out, target in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(target, results[0][1])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, w, b: (a.double(), w, b), "a must be float32"),
        (lambda a, w, b: (a, w.T.contiguous().T, b), "w must be contiguous"),
        (lambda a, w, b: (a, w[:5], b), "w has shape"),
        (lambda a, w, b: (a, w, b[:3]), "bias has shape"),
    ],
)
def test_bad_inputs_are_named(change, message):
    a, w, bias = torch.zeros(4, 6), torch.zeros(6, 8), torch.zeros(8)
    with pytest.raises(ValueError, match=message):
        kernels.sparse_times_dense(*change(a, w, bias))


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """The kernels module as in a new process, with its cache in ``tmp_path``."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name, value in (
        ("_library", None),
        ("_reason", None),
        ("_loaded", False),
        ("_fallback", None),
    ):
        monkeypatch.setattr(kernels, name, value)
    return tmp_path / "elbolab" / "kernels"


def test_a_build_is_cached_and_reused(fresh_kernels, monkeypatch):
    run = kernels.subprocess.run
    commands = []

    def recording(command, **options):
        commands.append(command)
        return run(command, **options)

    monkeypatch.setattr(kernels.subprocess, "run", recording)
    assert kernels.available()
    built = list(fresh_kernels.glob("*.so"))
    assert len(built) == 1 and not list(fresh_kernels.glob("*.tmp"))
    builds = [c for c in commands if "-o" in c]
    assert len(builds) == 1 and "-O3" in builds[0]
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(kernels, "_loaded", False)  # as a new process
    commands.clear()
    assert kernels.available()
    assert not [c for c in commands if "-o" in c]  # loaded, not built again
    assert built[0].stat().st_mtime_ns == stamp


def test_without_a_compiler_the_reason_is_given_and_rbm_training_falls_back(
    fresh_kernels, monkeypatch, tmp_path
):
    from inference.contrastive import RBMConfig, train_rbm
    from inference.runs import RunError, read_metrics

    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    assert not kernels.available()
    assert "no C compiler" in kernels.unavailable_reason()
    with pytest.raises(RuntimeError, match="not available: no C compiler"):
        kernels.sparse_times_dense(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1))

    # binarized-MNIST-like sparse data would take the kernels: a warning, then dense products
    config = RBMConfig(data="binarized-mnist", data_path=str(_sparse_npz(tmp_path)), hidden=6,
                       epochs=1, batch_size=10)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="sparse kernels unavailable.*no C compiler"):
        train_rbm(config, tmp_path / "fallback", progress=False)
    assert read_metrics(tmp_path / "fallback")[-1]["products"] == "dense"
    with pytest.raises(RunError, match="sparse kernels requested, but they could not be built"):
        train_rbm(config, tmp_path / "insist", progress=False, sparse_kernels=True)


def test_a_failing_compiler_is_reported(fresh_kernels, monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: fatal error: no input files' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(kernels, "_compiler", lambda: str(fake))
    assert not kernels.available()
    assert "the C compiler failed" in kernels.unavailable_reason()
    assert "no input files" in kernels.unavailable_reason()
    assert not list(fresh_kernels.glob("*"))  # nothing half-written left behind


def _as_new_process(monkeypatch):
    for name, value in (("_library", None), ("_reason", None), ("_loaded", False)):
        monkeypatch.setattr(kernels, name, value)


def _plant(library: Path, marker: Path, tmp_path: Path) -> None:
    """Replace ``library`` by one whose constructor writes ``marker`` (another user's code)."""
    source = tmp_path / "planted.c"
    source.write_text(
        "#include <stdio.h>\n"
        f'__attribute__((constructor)) static void planted(void) {{ fopen("{marker}", "w"); }}\n'
        "int sparse_times_dense(void) { return 1; }\nint sparse_outer_add(void) { return 1; }\n"
    )
    built = subprocess.run([kernels._compiler(), "-shared", "-fPIC", "-o", str(library),
                            str(source)], capture_output=True, text=True)  # fmt: skip
    assert built.returncode == 0, built.stderr


def test_a_library_planted_in_a_folder_others_can_write_is_never_loaded(
    fresh_kernels, monkeypatch, tmp_path
):
    assert kernels.available()
    library = next(fresh_kernels.glob("*.so"))
    marker = tmp_path / "planted-code-ran"
    # Another user's folder, or one others may write into: the planted library is even
    # recorded with a matching hash, as its planter could do.
    fresh_kernels.chmod(0o777)
    _plant(library, marker, tmp_path)
    library.with_name(library.name + ".sha256").write_text(kernels._sha256(library))
    _as_new_process(monkeypatch)
    assert kernels.available()  # built anew in a private folder of this process
    assert not marker.exists()
    private = kernels._fallback
    assert private is not None and private.parent == Path(tempfile.gettempdir())
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert private.name != f"elbolab-kernels-{os.getuid()}"  # no name another user can predict
    a, w, bias = torch.zeros(2, 3), torch.ones(3, 4), torch.zeros(4)
    assert torch.equal(kernels.sparse_times_dense(a, w, bias), torch.zeros(2, 4))


def test_a_replaced_or_truncated_library_is_built_again_not_loaded(
    fresh_kernels, monkeypatch, tmp_path
):
    assert kernels.available()
    library = next(fresh_kernels.glob("*.so"))
    assert stat.S_IMODE(fresh_kernels.stat().st_mode) == 0o700
    marker = tmp_path / "planted-code-ran"
    _plant(library, marker, tmp_path)  # a different library under the recorded name
    _as_new_process(monkeypatch)
    assert kernels.available() and not marker.exists()
    assert kernels._verified(library)
    library.write_bytes(library.read_bytes()[:4096])  # truncated: used to end in SIGBUS
    _as_new_process(monkeypatch)
    assert kernels.available() and kernels._verified(library)
    a, w, bias = torch.eye(3)[:2], torch.ones(3, 4), torch.zeros(4)
    assert torch.equal(kernels.sparse_times_dense(a, w, bias), torch.ones(2, 4))


def _sparse_npz(tmp_path):
    import numpy as np

    g = np.random.default_rng(0)
    path = tmp_path / "sparse.npz"
    splits = {s: (g.random((40, 784)) < 0.1).astype(np.uint8) for s in ("train", "valid", "test")}
    np.savez(path, **splits)
    return path


def test_which_runs_take_the_kernels():
    from inference.contrastive import SPARSE_DENSITY, _use_sparse_kernels
    from inference.runs import RunError
    from ppl_models.rbm import RBM

    rbm, sparse, dense = RBM(10, 4), torch.zeros(8, 10), torch.ones(8, 10)
    sparse[:, 0] = 1  # 10% ones
    assert float(sparse.mean()) <= SPARSE_DENSITY < float(dense.mean())
    assert _use_sparse_kernels(None, sparse, rbm) and not _use_sparse_kernels(None, dense, rbm)
    assert _use_sparse_kernels(True, dense, rbm) and not _use_sparse_kernels(False, sparse, rbm)
    assert not _use_sparse_kernels(None, sparse, rbm.double())  # torch's products serve float64
    with pytest.raises(RunError, match="the RBM is torch.float64, not float32"):
        _use_sparse_kernels(True, sparse, rbm.double())
