"""AIS on binarized-MNIST test images: seconds per datapoint, peak memory, matrix-product rate.

Runs ``elbolab evaluate RUN --k 1 --ais`` in a child process (its peak
resident memory is its own) for each number of temperatures, and compares
the floating-point rate of the network's products (decoder forward and
backward for every chain and leapfrog step, encoder forward once per
evaluation) with a plain matrix product of the same shapes in this process.

    python benchmarks/bench_ais.py [--run runs/mnist-iwae50] [--temperatures 1000]
        [--limit 100] [--chains 16] [--leapfrog 10]

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

from common import ROOT, matmul_rate, network_flops, save, untrained_run

from inference.runs import TrainConfig, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "mnist-iwae50")
    parser.add_argument("--temperatures", default="1000", help="comma-separated, e.g. 1000,10000")
    parser.add_argument("--limit", type=int, default=100, help="test images")
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--leapfrog", type=int, default=10)
    args = parser.parse_args()

    run = args.run
    if not (run / "checkpoint.pt").exists():
        run = untrained_run(Path(tempfile.mkdtemp()) / "untrained")
    config = json.loads((run / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("kind", "elbolab")}
    _, model = build(TrainConfig(**config))
    hidden, z_dim = list(model.hidden), model.z_dim
    decoder = [z_dim, *hidden[::-1], 784]
    rows = []
    for temps in (int(t) for t in args.temperatures.split(",")):
        cmd = [sys.executable, "-m", "inference.commands.cli", "evaluate", str(run), "--k", "1",
               "--limit", str(args.limit), "--ais", "--ais-temperatures", str(temps),
               "--ais-chains", str(args.chains), "--ais-leapfrog", str(args.leapfrog),
               "--no-progress"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            sys.exit(done.stderr)
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        ais = json.loads((run / "eval.json").read_text())["ais"]
        # per datapoint: (leapfrog + 1) gradient evaluations and one weight update per
        # temperature; decoder forward + backward (about twice the forward) per chain
        evals = temps * (args.leapfrog + 2)
        flops = (
            args.limit
            * evals
            * (
                2 * network_flops(784, hidden, z_dim, args.chains)
                - network_flops(784, hidden, z_dim, 0)
            )
        )
        ceiling = matmul_rate(args.chains * min(args.limit, 100), decoder)
        rows.append({
            "temperatures": temps,
            "datapoints": args.limit,
            "seconds": ais["seconds"],
            "seconds_per_datapoint": ais["seconds"] / args.limit,
            "peak_rss_mb": peak_rss / 2**20,
            "achieved_gflops": flops / ais["seconds"] / 1e9,
            "matmul_gflops": ceiling / 1e9,
            "fraction_of_matmul": flops / ais["seconds"] / ceiling,
            "acceptance": ais["acceptance"],
            "log_px": ais["mean"],
        })  # fmt: skip
        r = rows[-1]
        print(
            f"AIS-{temps} ({args.chains} chains, {args.leapfrog} leapfrog) on {args.limit} test "
            f"images: {r['seconds_per_datapoint']:.2f} s per image, peak RSS "
            f"{r['peak_rss_mb']:.0f} MB, {r['achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * r['fraction_of_matmul']:.0f}% of plain matmul ({r['matmul_gflops']:.1f})"
        )
    print(f"written {save('ais', {'run': str(run), 'chains': args.chains, 'rows': rows})}")


if __name__ == "__main__":
    main()
