"""Scaling on torch.distributed: an IWAE K=50 training epoch with 1 and 2 processes.

Binarized MNIST (50,000 images), 784-200-200-50 tanh, batch 100, one epoch,
as ``elbolab train`` runs it: one process with one thread, the same under
``torchrun --nproc-per-node 2`` (one thread each), and one process with two
threads (what the machine gives a single process). The epoch's seconds come
from ``metrics.jsonl`` (start-up excluded); runs are interleaved, medians
reported. The communication share is the time of the per-step all-reduce
(a buffer of the model's size, timed alone between the same two
processes) times the steps, over the 2-process epoch.

    python benchmarks/bench_distributed.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED_MNIST, save

TRAIN = ["train", "--data", "binarized-mnist", "--objective", "iwae", "--num-particles", "50",
         "--epochs", "1", "--batch-size", "100", "--hidden", "200,200", "--z-dim", "50",
         "--no-progress"]  # fmt: skip


def _launch(module_args: list[str], *, procs: int, threads: int) -> subprocess.CompletedProcess:
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ELBOLAB_DATA": str(SHARED_MNIST),
           "PYTHONPATH": path}  # fmt: skip
    if procs == 1:
        command = [sys.executable, "-m", *module_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(procs), "-m", *module_args]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return done


def epoch_seconds(procs: int, threads: int) -> tuple[float, float]:
    """(epoch seconds from metrics.jsonl, whole command seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        tic = time.perf_counter()
        _launch(["inference.commands.cli", *TRAIN, "--out", str(out)], procs=procs, threads=threads)
        wall = time.perf_counter() - tic
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return row["seconds"], wall


def all_reduce_seconds() -> float:
    """Seconds of one all-reduce of the VAE's gradients between 2 gloo processes."""
    done = _launch([Path(__file__).stem, "--time-all-reduce"], procs=2, threads=1)
    return float(done.stdout.strip().splitlines()[-1])


def _time_all_reduce(repeats: int = 200) -> None:  # run by each rank under torchrun
    import torch

    from inference import distributed
    from ppl_models import VAE

    world = distributed.current()
    grads = [torch.randn_like(p) for p in VAE(784).parameters()] + [torch.zeros(())]
    for _ in range(10):
        distributed.all_reduce_sum(grads)
    tic = time.perf_counter()
    for _ in range(repeats):
        distributed.all_reduce_sum(grads)
    seconds = (time.perf_counter() - tic) / repeats
    if world.is_main:
        print(seconds)
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--time-all-reduce", action="store_true")
    args = parser.parse_args()
    if args.time_all_reduce:
        return _time_all_reduce()
    setups = {"1 process, 1 thread": (1, 1), "2 processes, 1 thread each": (2, 1),
              "1 process, 2 threads": (1, 2)}  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, (procs, threads) in setups.items():
            times[name].append(epoch_seconds(procs, threads))
            print(f"{name}: epoch {times[name][-1][0]:.1f} s, command {times[name][-1][1]:.1f} s")
    medians = {
        name: {"epoch_seconds": statistics.median(e for e, _ in ts),
               "command_seconds": statistics.median(w for _, w in ts)}
        for name, ts in times.items()
    }  # fmt: skip
    one, two = medians["1 process, 1 thread"], medians["2 processes, 1 thread each"]
    threaded = medians["1 process, 2 threads"]
    steps = 50_000 // 100
    reduce = all_reduce_seconds()
    result = {
        "setting": "binarized MNIST train split, IWAE K=50, batch 100, 784-200-200-50, 1 epoch",
        "medians": medians,
        "speedup_2_processes": one["epoch_seconds"] / two["epoch_seconds"],
        "speedup_2_threads": one["epoch_seconds"] / threaded["epoch_seconds"],
        "all_reduce_seconds": reduce,
        "communication_share": reduce * steps / two["epoch_seconds"],
        "rounds": args.rounds,
    }
    print(json.dumps(result, indent=2))
    print("written", save("distributed", result))


if __name__ == "__main__":
    main()
