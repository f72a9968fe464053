"""Data sets: sklearn digits (the offline default), binarized MNIST, synthetic linear-Gaussian.

Every loader returns a :class:`Dataset` of float tensors whose values have
been checked: finite, the expected width, binary where the likelihood is
Bernoulli, and no empty split. Problems raise :class:`DataError` with a
message that names the data set, the split and the problem.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ppl_models import LinearGaussian

DATASETS = ("digits", "binarized-mnist", "synthetic")
DATA_ENV = "ELBOLAB_DATA"
MNIST_WIDTH = 784
MNIST_AMAT = {
    "train": "binarized_mnist_train.amat",
    "valid": "binarized_mnist_valid.amat",
    "test": "binarized_mnist_test.amat",
}
SPLIT_SEED = 0  # the digits and synthetic splits are fixed, whatever the training seed


class DataError(ValueError):
    """Bad or missing input data; the message names the problem."""


@dataclass
class Dataset:
    """Named splits of one data set, as float tensors of shape (N, x_dim).

    Splits are loaded and checked when first used (a command that evaluates
    the test split never holds the training split in memory).
    """

    name: str
    loaders: dict[str, Callable[[], torch.Tensor]]
    likelihood: str
    binarization: str
    x_dim: int
    truth: object = field(default=None, repr=False)  # generating model, when known
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.loaders)

    def split(self, name: str) -> torch.Tensor:
        if name not in self.loaders:
            raise DataError(
                f"{self.name} has no split {name!r}; available: {', '.join(self.loaders)}"
            )
        if name not in self._cache:
            self._cache[name] = self.loaders[name]()
        return self._cache[name]

    @property
    def heldout_split(self) -> str:
        """The split used for per-epoch held-out bounds: valid if present, else test."""
        return "valid" if "valid" in self.loaders else "test"


def check_array(
    x: np.ndarray, *, name: str, split: str, binary: bool, width: int | None = None
) -> np.ndarray:
    """Check one split and return it as float32; raise :class:`DataError` naming the problem."""
    where = f"{name} {split} split"
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{where}: expected a 2-D array (N, D), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{where} is empty")
    if width is not None and x.shape[1] != width:
        raise DataError(f"{where}: expected width {width}, got {x.shape[1]}")
    if not np.issubdtype(x.dtype, np.number) and x.dtype != np.bool_:
        raise DataError(f"{where}: expected numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise DataError(f"{where}: {bad} rows contain NaN or infinite values")
    if binary:
        nonbinary = (x != 0) & (x != 1)
        if nonbinary.any():
            value = x[nonbinary][0]
            raise DataError(
                f"{where}: a Bernoulli likelihood needs 0/1 data, found {value:g} "
                f"({int(nonbinary.any(1).sum())} rows); binarise it first"
            )
    return x


def _to_dataset(name, arrays, *, likelihood, binarization, width=None, truth=None) -> Dataset:
    """A data set from in-memory arrays, or from callables that read one split each."""
    binary = likelihood == "bernoulli"
    if width is None:  # small data: check every split now and take the width from them
        checked = {s: check_array(x, name=name, split=s, binary=binary) for s, x in arrays.items()}
        widths = {x.shape[1] for x in checked.values()}
        if len(widths) > 1:
            raise DataError(f"{name}: splits have different widths {sorted(widths)}")
        arrays, width = checked, widths.pop()

    def loader(split):
        def load():
            x = arrays[split]() if callable(arrays[split]) else arrays[split]
            checked = check_array(x, name=name, split=split, binary=binary, width=width)
            return torch.from_numpy(checked)

        return load

    loaders = {split: loader(split) for split in arrays}
    return Dataset(name, loaders, likelihood, binarization, width, truth)


def load_digits(*, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 digits (1797 x 64), pixels > 7 of 16 set to 1; fixed seeded split."""
    from sklearn.datasets import load_digits as sk_digits  # on first use: 1.5 s of imports

    pixels = sk_digits().data
    x = (pixels > 7).astype(np.float32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    arrays = {"train": x[order[n_test:]], "test": x[order[:n_test]]}
    return _to_dataset(
        "digits", arrays, likelihood="bernoulli", binarization="static threshold: pixel > 7/16"
    )


def resolve_data_path(path: str | os.PathLike | None) -> Path:
    """``path``, else the ``ELBOLAB_DATA`` environment variable; error if neither is set."""
    chosen = path if path is not None else os.environ.get(DATA_ENV)
    if not chosen:
        raise DataError(
            f"binarized-mnist needs a file: pass --data-path FILE (.npz or a folder of the "
            f"three .amat files) or set {DATA_ENV}"
        )
    return Path(chosen).expanduser()


def load_binarized_mnist(path: str | os.PathLike | None = None) -> Dataset:
    """Statically binarised MNIST (Larochelle & Murray 2011), 50k/10k/10k.

    Parameters
    ----------
    path : path-like, optional
        A ``.npz`` with arrays ``train``, ``valid``, ``test``; or a folder (or
        one of the files) holding ``binarized_mnist_{train,valid,test}.amat``.
        Default: the ``ELBOLAB_DATA`` environment variable.
    """
    where = resolve_data_path(path)
    if not where.exists():
        raise DataError(f"binarized-mnist: no such file or folder: {where}")

    def reading(read: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
        def guarded():
            try:
                return read()
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
                raise DataError(f"binarized-mnist: cannot read {where}: {err}") from err

        return guarded

    arrays: dict[str, Callable[[], np.ndarray]] = {}
    if where.is_file() and where.suffix == ".npz":
        files = reading(lambda: np.load(where, allow_pickle=False).files)()
        missing = [s for s in MNIST_AMAT if s not in files]
        if missing:
            raise DataError(
                f"binarized-mnist: {where} lacks array(s) {', '.join(missing)} "
                f"(has {', '.join(files) or 'none'})"
            )

        def from_npz(split):
            def read():
                with np.load(where, allow_pickle=False) as npz:
                    return npz[split]

            return reading(read)

        arrays = {split: from_npz(split) for split in MNIST_AMAT}
    else:
        folder = where if where.is_dir() else where.parent
        for split, filename in MNIST_AMAT.items():
            file = folder / filename
            if not file.exists():
                raise DataError(f"binarized-mnist: missing {file}")
            arrays[split] = reading(lambda file=file: np.loadtxt(file, dtype=np.float32, ndmin=2))
    return _to_dataset(
        "binarized-mnist",
        arrays,
        likelihood="bernoulli",
        binarization="static (Larochelle & Murray 2011)",
        width=MNIST_WIDTH,
    )


def load_synthetic(
    *, x_dim: int = 16, z_dim: int = 4, num_train: int = 2000, num_test: int = 500
) -> Dataset:
    """Draws from a fixed LinearGaussian (seeded), whose exact log p(x) is ``truth``'s."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    truth = LinearGaussian(x_dim, z_dim)
    truth.set_params(
        weight=torch.randn(x_dim, z_dim, generator=gen),
        loc=torch.randn(x_dim, generator=gen),
        scale=0.5,
    )
    truth.requires_grad_(False)
    with torch.no_grad():
        chol = torch.linalg.cholesky(truth.marginal().covariance_matrix)
        eps = torch.randn(num_train + num_test, x_dim, generator=gen)
        x = (truth.loc + eps @ chol.T).numpy()
    arrays = {"train": x[:num_train], "test": x[num_train:]}
    return _to_dataset("synthetic", arrays, likelihood="normal", binarization="none", truth=truth)


def load_dataset(name: str, *, path: str | os.PathLike | None = None) -> Dataset:
    """Load a data set by its command-line name (see ``DATASETS``)."""
    if name == "digits":
        return load_digits()
    if name == "binarized-mnist":
        return load_binarized_mnist(path)
    if name == "synthetic":
        return load_synthetic()
    raise DataError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
