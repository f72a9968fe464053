import os
from pathlib import Path

import pyro
import pytest
import torch

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "binarized_mnist.npz"


@pytest.fixture(autouse=True)
def _seed_and_validate():
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    pyro.clear_param_store()


@pytest.fixture
def float64():
    """Estimator tests compare against closed forms to 1e-6: work in float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def mnist_path() -> Path:
    """The shared binarized MNIST; missing is a failure in CI, a skip elsewhere."""
    if not MNIST.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the shared data file {MNIST}")
        pytest.skip(f"{MNIST} not present on this machine")
    return MNIST
