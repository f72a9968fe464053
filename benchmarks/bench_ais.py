"""AIS on binarized-MNIST test images: seconds per datapoint, peak memory, matrix-product rate.

Runs ``elbolab evaluate RUN --k 1 --ais`` in a child process (its peak
resident memory is its own) for each number of temperatures and each mode
(the model's evaluation compiled, or eager), and compares the floating-point
rate of the network's products (decoder forward, and backward to z, for
every chain and evaluation: one per leapfrog step, and one at the start)
with a plain matrix product of the same shapes and with the machine's
ceiling (a 1024^3 product), both measured in this process.

    python benchmarks/bench_ais.py [--run runs/mnist-iwae50] [--temperatures 1000]
        [--limit 100] [--chains 16] [--leapfrog 10] [--modes compiled,eager]

Without a trained run an untrained 784-200-200-50 VAE is used (the cost does
not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, matmul_ceiling, matmul_rate, network_flops, save, untrained_run

from inference.runs import build, read_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "mnist-iwae50")
    parser.add_argument("--temperatures", default="1000", help="comma-separated, e.g. 1000,10000")
    parser.add_argument("--limit", type=int, default=100, help="test images")
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--leapfrog", type=int, default=10)
    parser.add_argument("--modes", default="compiled", help="comma-separated: compiled, eager")
    parser.add_argument("--name", default="ais", help="results/NAME.json (default ais)")
    args = parser.parse_args()

    run = args.run
    if not (run / "checkpoint.pt").exists():
        run = untrained_run(Path(tempfile.mkdtemp()) / "untrained")
    _, model = build(read_config(run))
    hidden, z_dim = list(model.hidden), model.z_dim
    decoder = [z_dim, *hidden[::-1], 784]
    rows = []
    for temps in (int(t) for t in args.temperatures.split(",")):
        for mode in args.modes.split(","):
            rows.append(measure(run, args, temps, mode, hidden, z_dim, decoder))
    print(f"written {save(args.name, {'run': str(run), 'chains': args.chains, 'rows': rows})}")


def measure(run: Path, args, temps: int, mode: str, hidden, z_dim, decoder) -> dict:
    if mode not in ("compiled", "eager"):
        sys.exit(f"--modes: {mode!r} is not compiled or eager")
    flag = "--ais-compile" if mode == "compiled" else "--no-ais-compile"
    cmd = [sys.executable, "-m", "inference.commands.cli", "evaluate", str(run), "--k", "1",
           "--limit", str(args.limit), "--ais", "--ais-temperatures", str(temps),
           "--ais-chains", str(args.chains), "--ais-leapfrog", str(args.leapfrog), flag,
           "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(done.stderr)
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    ais = json.loads((run / "eval.json").read_text())["ais"]
    # per datapoint: one evaluation at the start and one per leapfrog step of each of the
    # temperatures - 1 transitions, each the decoder forward and backward to z (as many
    # products) for every chain; the guide's network runs once per batch (not counted)
    evals = 1 + (temps - 1) * args.leapfrog
    decoder_flops = network_flops(784, hidden, z_dim, 1) - network_flops(784, hidden, z_dim, 0)
    flops = args.limit * evals * 2 * args.chains * decoder_flops
    same_shapes = matmul_rate(args.chains * min(args.limit, 100), decoder)
    ceiling = matmul_ceiling()
    rate = flops / ais["seconds"]
    row = {
        "mode": mode,
        "compiled": ais.get("compiled", False),
        "temperatures": temps,
        "datapoints": args.limit,
        "seconds": ais["seconds"],
        "seconds_per_datapoint": ais["seconds"] / args.limit,
        "peak_rss_mb": peak_rss / 2**20,
        "achieved_gflops": rate / 1e9,
        "matmul_gflops": same_shapes / 1e9,
        "fraction_of_matmul": rate / same_shapes,
        "ceiling_gflops": ceiling / 1e9,
        "fraction_of_ceiling": rate / ceiling,
        "acceptance": ais["acceptance"],
        "log_px": ais["mean"],
    }
    print(
        f"AIS-{temps} {mode} ({args.chains} chains, {args.leapfrog} leapfrog) on {args.limit} "
        f"test images: {row['seconds_per_datapoint']:.3f} s per image, peak RSS "
        f"{row['peak_rss_mb']:.0f} MB, {row['achieved_gflops']:.1f} GFLOP/s = "
        f"{100 * row['fraction_of_matmul']:.0f}% of a plain matmul of the same shapes "
        f"({row['matmul_gflops']:.0f}), {100 * row['fraction_of_ceiling']:.0f}% of the 1024^3 "
        f"ceiling ({row['ceiling_gflops']:.0f}); log p(x) {row['log_px']:.3f}",
        flush=True,
    )
    return row


if __name__ == "__main__":
    main()
