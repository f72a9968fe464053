"""Data loaders and the errors they give for bad input."""

import numpy as np
import pytest
import torch

from inference.data import DataError, check_array, load_binarized_mnist, load_dataset


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def good_splits(width=784, n=5):
    rng = np.random.default_rng(0)
    return {s: (rng.random((n, width)) < 0.3).astype(np.uint8) for s in ("train", "valid", "test")}


def test_digits_is_binary_fixed_and_split():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.x_dim == 64 and a.likelihood == "bernoulli"
    assert a.split("train").shape[0] + a.split("test").shape[0] == 1797
    assert torch.equal(a.split("test"), b.split("test"))
    assert set(a.split("train").unique().tolist()) == {0.0, 1.0}
    with pytest.raises(DataError, match="no split 'valid'"):
        a.split("valid")


def test_synthetic_has_its_generating_model():
    data = load_dataset("synthetic")
    assert data.likelihood == "normal" and data.truth is not None
    x = data.split("test")
    # Draws from the truth: their average log-density under it is close to minus its entropy.
    entropy = data.truth.marginal().entropy()
    assert abs(float(data.truth.log_marginal(x).mean()) + float(entropy)) < 0.5


def test_npz_and_amat_give_the_same_data(tmp_path):
    splits = good_splits(n=4)
    npz = load_binarized_mnist(write_npz(tmp_path / "m.npz", **splits))
    for split, x in splits.items():
        np.savetxt(tmp_path / f"binarized_mnist_{split}.amat", x, fmt="%d")
    amat = load_binarized_mnist(tmp_path)
    for split in splits:
        assert torch.equal(npz.split(split), amat.split(split))


def test_data_path_from_environment(tmp_path, monkeypatch):
    path = write_npz(tmp_path / "m.npz", **good_splits())
    monkeypatch.setenv("ELBOLAB_DATA", str(path))
    assert load_dataset("binarized-mnist").split("valid").shape == (5, 784)
    monkeypatch.delenv("ELBOLAB_DATA")
    with pytest.raises(DataError, match="--data-path"):
        load_dataset("binarized-mnist")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.update(train=s["train"].astype(float) * np.nan), "NaN"),
        (lambda s: s.update(test=s["test"][:, :700]), "expected width 784, got 700"),
        (lambda s: s.update(valid=s["valid"] * 3), "Bernoulli likelihood needs 0/1 data, found 3"),
        (lambda s: s.update(test=s["test"][:0]), "test split is empty"),
        (lambda s: s.pop("valid"), "lacks array"),
        (lambda s: s.update(train=np.zeros(784)), "2-D array"),
    ],
)
def test_bad_npz_is_named(tmp_path, mutate, message):
    splits = good_splits()
    mutate(splits)
    path = write_npz(tmp_path / "bad.npz", **splits)
    with pytest.raises(DataError, match=message):  # structure now, contents on first use
        data = load_binarized_mnist(path)
        for split in data.splits:
            data.split(split)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_binarized_mnist(tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="cannot read"):
        load_binarized_mnist(garbage)
    with pytest.raises(DataError, match="missing .*binarized_mnist_train.amat"):
        load_binarized_mnist(tmp_path)
    (tmp_path / "binarized_mnist_train.amat").write_text("0 1 x\n")
    for split in ("valid", "test"):
        (tmp_path / f"binarized_mnist_{split}.amat").write_text("0 1\n")
    with pytest.raises(DataError, match="cannot read"):
        load_binarized_mnist(tmp_path).split("train")


def test_check_array_accepts_real_values_for_normal_likelihood():
    x = check_array(np.array([[0.5, -1.0]]), name="d", split="train", binary=False)
    assert x.dtype == np.float32
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("cifar")


def test_shared_binarized_mnist(mnist_path):
    data = load_binarized_mnist(mnist_path)
    assert {s: tuple(data.split(s).shape) for s in data.splits} == {
        "train": (50000, 784), "valid": (10000, 784), "test": (10000, 784)
    }  # fmt: skip
    assert abs(float(data.split("test").mean()) - 0.13251) < 1e-4
