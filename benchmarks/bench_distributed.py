"""Scaling on torch.distributed: an IWAE K=50 training epoch and IWAE-5000 evaluation.

Binarized MNIST (50,000 images), 784-200-200-50 tanh, batch 100, one epoch,
as ``elbolab train`` runs it: one process with one thread, the same under
``torchrun --nproc-per-node 2`` (one thread each), and one process with two
threads (what the machine gives a single process). The epoch's seconds come
from ``metrics.jsonl`` (start-up excluded); runs are interleaved, medians
reported. The communication share is the time of the per-step all-reduce
(a buffer of the model's size, timed alone between the same two
processes) times the steps, over the 2-process epoch.

Evaluation: ``elbolab evaluate --k 5000`` on the first 2,000 test images
(batches of 100, dealt to the ranks), the same three set-ups; its seconds
come from ``eval.json`` (start-up excluded; the gathering of the results
included). The communication share is the time of that gathering (the
same results, gathered alone) over the 2-process evaluation.

    python benchmarks/bench_distributed.py [--rounds 2] [--part train|evaluate|both]
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
EVALUATE = ["evaluate", "--k", "1,50,5000", "--limit", "2000", "--batch-size", "100",
            "--no-progress"]  # fmt: skip
SETUPS = {"1 process, 1 thread": (1, 1), "2 processes, 1 thread each": (2, 1),
          "1 process, 2 threads": (1, 2)}  # fmt: skip


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


def evaluate_seconds(run: Path, procs: int, threads: int) -> tuple[float, float, dict]:
    """(evaluation seconds from eval.json, whole command seconds, the report)."""
    tic = time.perf_counter()
    _launch(["inference.commands.cli", *EVALUATE, str(run)], procs=procs, threads=threads)
    wall = time.perf_counter() - tic
    report = json.loads((run / "eval.json").read_text())
    return report["seconds"], wall, report


def gather_seconds() -> float:
    """Seconds of gathering 2,000 images' evaluation results between 2 gloo processes."""
    done = _launch([Path(__file__).stem, "--time-gather"], procs=2, threads=1)
    return float(done.stdout.strip().splitlines()[-1])


def _time_gather(repeats: int = 20) -> None:  # run by each rank under torchrun
    import torch

    from inference import distributed

    world = distributed.current()
    names = ["elbo", "elbo_se", "iwae1", "iwae1_se", "iwae50", "iwae50_se", "iwae5000",
             "iwae5000_se", "statistics/khat", "statistics/is_ess", "decomposition/kl",
             "decomposition/reconstruction", "decomposition/entropy"]  # fmt: skip

    def batch(u: int) -> dict:  # what evaluate_bounds returns for a batch of 100
        return {name: torch.randn(100) for name in names} | {"kl_analytic": torch.ones(1)}

    distributed.map_units(20, batch, seed=(0, 0), world=world, progress=False)
    tic = time.perf_counter()
    for _ in range(repeats):
        distributed.map_units(20, batch, seed=(0, 0), world=world, progress=False)
    seconds = (time.perf_counter() - tic) / repeats
    if world.is_main:
        print(seconds)
    distributed.shutdown()


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
    parser.add_argument("--part", choices=("train", "evaluate", "both"), default="both")
    parser.add_argument("--time-all-reduce", action="store_true")
    parser.add_argument("--time-gather", action="store_true")
    args = parser.parse_args()
    if args.time_all_reduce:
        return _time_all_reduce()
    if args.time_gather:
        return _time_gather()
    if args.part in ("train", "both"):
        bench_training(args.rounds)
    if args.part in ("evaluate", "both"):
        bench_evaluation(args.rounds)


def _medians(times: dict[str, list[tuple]], key: str) -> dict:
    return {
        name: {key: statistics.median(t[0] for t in ts),
               "command_seconds": statistics.median(t[1] for t in ts)}
        for name, ts in times.items()
    }  # fmt: skip


def bench_training(rounds: int) -> None:
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in SETUPS}
    for _ in range(rounds):
        for name, (procs, threads) in SETUPS.items():
            times[name].append(epoch_seconds(procs, threads))
            print(f"{name}: epoch {times[name][-1][0]:.1f} s, command {times[name][-1][1]:.1f} s")
    medians = _medians(times, "epoch_seconds")
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
        "rounds": rounds,
    }
    print(json.dumps(result, indent=2))
    print("written", save("distributed", result))


def bench_evaluation(rounds: int) -> None:
    from common import untrained_run

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in SETUPS}
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = untrained_run(Path(tmp) / "run", hidden=[200, 200], z_dim=50)
        for _ in range(rounds):
            for name, (procs, threads) in SETUPS.items():
                seconds, wall, reports[name] = evaluate_seconds(run, procs, threads)
                times[name].append((seconds, wall))
                print(f"{name}: evaluation {seconds:.1f} s, command {wall:.1f} s")
    medians = _medians(times, "evaluation_seconds")
    one, two = medians["1 process, 1 thread"], medians["2 processes, 1 thread each"]
    threaded = medians["1 process, 2 threads"]
    # the same numbers whatever the number of processes (threads may round differently)
    same = reports["1 process, 1 thread"]["iwae"] == reports["2 processes, 1 thread each"]["iwae"]
    gather = gather_seconds()
    result = {
        "setting": "elbolab evaluate --k 1,50,5000 on the first 2,000 binarized-MNIST test "
        "images, batch 100, 784-200-200-50 (untrained weights: the same work)",
        "medians": medians,
        "speedup_2_processes": one["evaluation_seconds"] / two["evaluation_seconds"],
        "speedup_2_threads": one["evaluation_seconds"] / threaded["evaluation_seconds"],
        "images_per_second_2_processes": 2000 / two["evaluation_seconds"],
        "gather_seconds": gather,
        "communication_share": gather / two["evaluation_seconds"],
        "same_numbers_1_and_2_processes": same,
        "iwae5000": reports["2 processes, 1 thread each"]["iwae"]["5000"],
        "rounds": rounds,
    }
    print(json.dumps(result, indent=2))
    print("written", save("distributed_evaluate", result))


if __name__ == "__main__":
    main()
