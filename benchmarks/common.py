"""Shared helpers for the benchmarks: data, interleaved timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from inference.kernels import cpu_fields
from inference.runs import TrainConfig, build, save_checkpoint, write_json

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "binarized_mnist.npz"
RESULTS = ROOT / "benchmarks" / "results"


def mnist_split(split: str, path: str | None = None) -> torch.Tensor:
    from inference.data import load_binarized_mnist

    return load_binarized_mnist(path or os.environ.get("ELBOLAB_DATA") or SHARED_MNIST).split(split)


def interleaved(candidates: dict[str, Callable[[], None]], *, rounds: int, steps: int) -> dict:
    """Median seconds per call of each candidate, timed in interleaved rounds."""
    for fn in candidates.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            tic = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - tic) / steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_model() -> str:
    """The CPU's name and its widest vector instructions: ratios move between CPUs.

    A CPU with AVX-512 has about twice the float32 product rate of one with
    AVX2 alone, while elementwise work gains less, so a fraction of the
    ceiling measured on one does not carry over to the other.
    """
    fields = cpu_fields()
    if not fields:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    vector = next((isa for isa in ("avx512f", "avx2", "avx") if isa in flags), "no avx")
    return f"{fields.get('model name', platform.machine())} ({vector})"


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
    }


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    return path


def untrained_run(path: Path, **options) -> Path:
    """A run directory holding an untrained model (speed does not depend on the weights)."""
    config = TrainConfig(data="binarized-mnist", data_path=str(SHARED_MNIST), epochs=1, **options)
    _, model = build(config)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", config.to_dict())
    save_checkpoint(path, {"epoch": 0, "model": model.state_dict()})
    return path


def network_flops(x_dim: int, hidden: list[int], z_dim: int, k: int) -> float:
    """Multiply-adds x 2 of one datapoint: encoder once, decoder once per particle."""
    enc = [x_dim, *hidden, 2 * z_dim]
    dec = [z_dim, *hidden[::-1], x_dim]

    def cost(sizes):
        return sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))

    return cost(enc) + k * cost(dec)


def matmul_rate(rows: int, sizes: list[int], repeats: int = 20) -> float:
    """FLOP/s of the decoder's matrix products alone (no bias, no activation)."""
    mats = [torch.randn(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=False)]
    h0 = torch.randn(rows, sizes[0])
    flops = sum(2 * rows * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        h = h0
        for m in mats:
            h = h @ m
        best = min(best, time.perf_counter() - tic)
    return flops / best


def matmul_ceiling(size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a float32 ``size``^3 matrix product (median of ``repeats``): the ceiling."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - tic)
    return 2 * size**3 / statistics.median(times)
