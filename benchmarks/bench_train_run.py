"""A whole training run: ``elbolab train`` against the same run hand-written, wall clock.

Binarized MNIST, 784-200-200-50 tanh VAE, batch 128, 3 epochs, each command
a fresh process (start-up, imports, data loading, compilation included):
``elbolab train`` as it chooses (at 3 epochs, 1170 steps, it replays its
captured step; from 3000 steps, 8 epochs here, it compiles), with
``--no-compile`` and with ``--compile``. The
reference, ``hand_written_vae.py`` here, is what a person writes in plain
PyTorch for the same job: the model, the reparameterised ELBO (or IWAE-K)
as one expression, Adam, a shuffled loop, the held-out ELBO after every
epoch and the weights saved at the end. elbolab does more per epoch (an
atomic checkpoint with optimiser and random states, metrics.jsonl). Runs
are interleaved; medians reported.

    python benchmarks/bench_train_run.py [--rounds 3] [--epochs 3] [--k 1]
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

HERE = Path(__file__).resolve().parent


def _run(command: list[str]) -> float:
    env = {**os.environ, "ELBOLAB_DATA": str(SHARED_MNIST)}
    tic = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--k", type=int, default=1, help="particles: 1 is the ELBO, more IWAE")
    args = parser.parse_args()
    objective = "elbo" if args.k == 1 else "iwae"
    common = ["--data", "binarized-mnist", "--epochs", str(args.epochs), "--batch-size", "128",
              "--num-particles", str(args.k), "--objective", objective,
              "--no-progress"]  # fmt: skip
    elbolab = [sys.executable, "-m", "inference.commands.cli", "train", *common]
    hand = [sys.executable, str(HERE / "hand_written_vae.py"), "--epochs", str(args.epochs),
            "--k", str(args.k)]  # fmt: skip
    variants = {"elbolab": [], "elbolab --no-compile": ["--no-compile"],
                "elbolab --compile": ["--compile"]}  # fmt: skip
    times: dict[str, list[float]] = {"hand-written": [], **{name: [] for name in variants}}
    steps: dict[str, str] = {}
    compile_seconds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times["hand-written"].append(_run([*hand, "--out", f"{tmp}/hand{r}.pt"]))
            for i, (name, flags) in enumerate(variants.items()):
                run = Path(tmp) / f"elbolab{i}-{r}"
                times[name].append(_run([*elbolab, *flags, "--out", str(run)]))
                first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
                steps[name] = next((k for k in ("compiled", "replayed") if first.get(k)), "eager")
                compile_seconds[name].append(first.get("compile_seconds", 0.0))
            print({name: f"{ts[-1]:.1f} s" for name, ts in times.items()})
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ref = medians["hand-written"]
    result = {
        "setting": f"binarized MNIST, 784-200-200-50, batch 128, K={args.k}, {args.epochs} epochs",
        "seconds": medians,
        "ratio": {name: t / ref for name, t in medians.items()},
        "step": steps,  # what each command's step was: compiled, replayed or eager
        "compile_seconds_median": {n: statistics.median(s) for n, s in compile_seconds.items()},
        "rounds": args.rounds,
    }
    print(json.dumps(result, indent=2))
    suffix = "" if args.epochs == 3 else f"_e{args.epochs}"
    print("written", save(f"train_run_k{args.k}{suffix}", result))


if __name__ == "__main__":
    main()
