"""``elbolab gaps`` on the binarized MNIST test set: wall time and peak memory.

A two-layer encoder (784-200-200-(h: 100)-(z: 50), with its reverse model),
K = 1000 particles for log p(x) and L_aux / L_h, S = 1, 10, 100 inner samples
for L_marg on 10 outer draws per datapoint. The goal is under 10 minutes on
the 2-core machine with bounded memory. Without --run, an untrained model is
used (speed does not depend on the weights).

    python benchmarks/bench_gaps.py [--run RUN] [--limit 10000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save, untrained_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=1000)
    args = parser.parse_args()
    run = args.run or untrained_run(
        Path(tempfile.mkdtemp()) / "hvae", model="hvae", layers=2, hidden=[200, 200], z_dim=50
    )
    cmd = [sys.executable, "-m", "inference.commands.cli", "gaps", str(run), "--k", str(args.k),
           "--inner-samples", "1,10,100", "--limit", str(args.limit), "--no-progress"]  # fmt: skip
    tic = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - tic
    if done.returncode:
        sys.exit(done.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = json.loads((run / "gaps.json").read_text())
    result = {"datapoints": args.limit, "k": args.k, "seconds": seconds, "peak_rss_mb": peak,
              "bounds": report["bounds"]}  # fmt: skip
    print(f"elbolab gaps, {args.limit} test images, K={args.k}, S=1,10,100: {seconds:.0f} s, "
          f"peak RSS {peak:.0f} MB")  # fmt: skip
    print(f"written {save('gaps', result)}")


if __name__ == "__main__":
    main()
