"""IWAE-5000 evaluation of binarized MNIST test images: throughput, peak memory, FLOP rate.

Runs ``elbolab evaluate RUN --k 5000`` in a child process (so that its peak
resident memory is its own), compiled or eager, and compares the
floating-point rate it reaches in the network's matrix products with what
this CPU does in a plain matrix product of the same shapes and in a 1024^3
product (the ceiling), both measured in this process.

    python benchmarks/bench_iwae_eval.py [--run runs/mnist-iwae50] [--limit 1000]
        [--modes compiled,eager] [--repeats 1] [--name iwae_eval]

With ``--repeats R`` the modes' runs are interleaved R times, each with its
own ceiling measured right after it; the summary gives the medians (the
machine's speed drifts by several percent between minutes).

Without a trained run, an untrained 784-200-200-50 VAE is written to a
temporary run directory (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, matmul_ceiling, matmul_rate, network_flops, save, untrained_run

from inference.runs import build, read_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "mnist-iwae50")
    parser.add_argument("--limit", type=int, default=1000, help="test images (10000 = all)")
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--modes", default="compiled", help="comma-separated: compiled, eager")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each mode")
    parser.add_argument("--name", default="iwae_eval", help="results/NAME.json (default iwae_eval)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in ("compiled", "eager"):
            sys.exit(f"--modes: {mode!r} is not compiled or eager")

    run = args.run
    if not (run / "checkpoint.pt").exists():
        run = untrained_run(Path(tempfile.mkdtemp()) / "untrained")
    _, model = build(read_config(run))
    hidden, z_dim = list(model.hidden), model.z_dim
    rows = 2_000  # evaluate_bounds' rows per vectorised pass
    decoder = [z_dim, *hidden[::-1], 784]
    results = []
    for mode in modes * args.repeats:
        peak_before = matmul_rate(rows, decoder)
        ks = ",".join(str(k) for k in sorted({1, 50, args.k}))
        cmd = [sys.executable, "-m", "inference.commands.cli", "evaluate", str(run), "--k", ks,
               "--limit", str(args.limit), "--no-progress",
               "--compile" if mode == "compiled" else "--no-compile"]  # fmt: skip
        tic = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - tic
        if done.returncode:
            sys.exit(done.stderr)
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        report = json.loads((run / "eval.json").read_text())
        matmul = max(peak_before, matmul_rate(rows, decoder))
        ceiling = matmul_ceiling()
        eval_seconds = report["seconds"]
        flops = args.limit * network_flops(784, hidden, z_dim, args.k)
        rate = flops / eval_seconds
        result = {
            "mode": mode,
            "compiled": report.get("compiled", False),
            "k": args.k,
            "datapoints": args.limit,
            "run": str(run),
            "command_seconds": seconds,
            "eval_seconds": eval_seconds,
            "datapoints_per_s": args.limit / eval_seconds,
            "peak_rss_mb": report["peak_rss_mb"],  # the evaluation process's own
            "peak_rss_with_children_mb": peak_rss / 2**20,  # with the compiler's processes
            "achieved_gflops": rate / 1e9,
            "matmul_gflops": matmul / 1e9,
            "fraction_of_matmul": rate / matmul,
            "ceiling_gflops": ceiling / 1e9,
            "fraction_of_ceiling": rate / ceiling,
            "log_px": report["log_px"],
            "full_test_set_estimate_s": eval_seconds * 10_000 / args.limit,
        }
        results.append(result)
        print(
            f"IWAE-{args.k} {mode} on {args.limit} test images: {eval_seconds:.1f} s "
            f"({result['datapoints_per_s']:.1f} images/s; full test set ~"
            f"{result['full_test_set_estimate_s']:.0f} s), peak RSS {result['peak_rss_mb']:.0f} "
            f"MB (with the compiler's child processes, the most of the runs so far: "
            f"{result['peak_rss_with_children_mb']:.0f} MB), "
            f"{result['achieved_gflops']:.1f} GFLOP/s = {100 * result['fraction_of_matmul']:.0f}% "
            f"of a plain matmul of the same shapes ({result['matmul_gflops']:.0f}), "
            f"{100 * result['fraction_of_ceiling']:.0f}% of the 1024^3 ceiling "
            f"({result['ceiling_gflops']:.0f}); log p(x) {report['log_px']['mean']:.3f}",
            flush=True,
        )
    medians = {}
    for mode in modes:
        rows_of = [r for r in results if r["mode"] == mode]
        medians[mode] = {
            key: statistics.median(r[key] for r in rows_of)
            for key in ("eval_seconds", "achieved_gflops", "ceiling_gflops",
                        "fraction_of_ceiling", "peak_rss_mb")
        }  # fmt: skip
        m = medians[mode]
        each = ", ".join(f"{100 * r['fraction_of_ceiling']:.0f}%" for r in rows_of)
        print(f"{mode}, median of {len(rows_of)}: {m['eval_seconds']:.1f} s, "
              f"{100 * m['fraction_of_ceiling']:.0f}% of the ceiling (each run against its "
              f"own: {each}), peak RSS {m['peak_rss_mb']:.0f} MB")  # fmt: skip
    result = {"rows": results, "medians": medians}
    print(f"written {save(args.name, result)}")


if __name__ == "__main__":
    main()
