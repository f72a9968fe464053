"""RBM training against scikit-learn's BernoulliRBM: seconds per epoch and log-likelihood.

Same data (the first --train binarized MNIST training images), same hidden
size, batch size, learning rate and number of epochs, persistent CD-1 in both.
scikit-learn runs twice per round: on the data as float64, which is what
``BernoulliRBM().fit`` makes of the uint8 arrays in the npz file, and on
float32, its fastest setting. Runs alternate (sklearn float64, sklearn float32, elbolab, ...) and
the medians of the seconds per epoch are reported: for elbolab the epoch's
updates alone (``update_seconds`` in ``metrics.jsonl``), as BernoulliRBM's
``fit`` does nothing else, and, apart, the whole epoch with elbolab's
held-out metrics on the 10,000 validation images. The five matrix products
of a PCD-1 update (p(h|v) of the data, p(v|h) and p(h|v) of the chains, and
the two statistics) are set against a 1024^3 float32 product measured in the
same run. Both trained models are then scored by
elbolab: BernoulliRBM's ``components_``, ``intercept_visible_`` and
``intercept_hidden_`` are loaded into an elbolab RBM, and the test
log-likelihood of every seed's model is estimated by AIS (with its
reverse-AIS bracket in the JSON). After a few epochs at this learning rate
the seed-to-seed spread is several nats, far above the AIS error, so the
mean and spread over seeds are what to compare.

    python benchmarks/bench_rbm.py [--hidden 500] [--epochs 5] [--train 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import SHARED_MNIST, matmul_ceiling, mnist_split, save
from sklearn.neural_network import BernoulliRBM

from inference.contrastive import RBMConfig, train_rbm
from inference.partition import ais_bracket, ais_log_partition
from inference.runs import read_metrics
from ppl_models.rbm import RBM

SK64 = "sklearn BernoulliRBM float64"
SK32 = "sklearn BernoulliRBM float32"
OURS = "elbolab PCD-1"


def to_elbolab(model: BernoulliRBM, hidden: int) -> RBM:
    """BernoulliRBM's fitted parameters in an elbolab RBM (same energy function)."""
    rbm = RBM(784, hidden).requires_grad_(False)
    with torch.no_grad():
        rbm.W.copy_(torch.as_tensor(model.components_.T))
        rbm.b_v.copy_(torch.as_tensor(model.intercept_visible_))
        rbm.b_h.copy_(torch.as_tensor(model.intercept_hidden_))
    return rbm


def log_likelihood(rbm: RBM, test, train, *, chains: int, betas: int) -> dict:
    with torch.no_grad():
        neg_free = float(-rbm.free_energy(test).double().mean())
    forward = ais_log_partition(rbm, num_chains=chains, num_betas=betas, data=train, seed=0)
    reverse = ais_log_partition(
        rbm, num_chains=chains, num_betas=betas, data=train, seed=1, reverse=True
    )
    return {
        "ais": neg_free - forward.log_z,
        "ais_stderr": forward.stderr,
        "bracket": ais_bracket(neg_free, forward, reverse),
    }


def products(args, seconds_per_epoch: float) -> dict:
    """FLOP/s of the PCD-1 updates' five matrix products against the 1024^3 ceiling."""
    steps = -(-args.train // args.batch_size)
    flops = steps * 5 * 2 * args.batch_size * 784 * args.hidden
    rate = flops / seconds_per_epoch
    ceiling = matmul_ceiling()
    return {
        "gflops_per_epoch": flops / 1e9,
        "gflop_per_s": rate / 1e9,
        "ceiling_gflop_per_s": ceiling / 1e9,
        "fraction_of_ceiling": rate / ceiling,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ais-chains", type=int, default=100)
    parser.add_argument("--ais-betas", type=int, default=3000)
    args = parser.parse_args()

    train = mnist_split("train")[: args.train]
    test = mnist_split("test")
    inputs = {SK64: train.numpy().astype(np.float64), SK32: train.numpy()}
    times: dict[str, list[float]] = {SK64: [], SK32: [], OURS: []}
    models: dict[str, list[RBM]] = {name: [] for name in times}
    whole: list[float] = []  # elbolab's epochs with its held-out metrics (sklearn computes none)
    for repeat in range(args.repeats):
        for name, x_np in inputs.items():
            sk_model = BernoulliRBM(n_components=args.hidden, learning_rate=args.lr,
                                           batch_size=args.batch_size, n_iter=args.epochs,
                                           random_state=repeat)  # fmt: skip
            tic = time.perf_counter()
            sk_model.fit(x_np)
            times[name].append((time.perf_counter() - tic) / args.epochs)
            models[name].append(to_elbolab(sk_model, args.hidden))

        out = Path(tempfile.mkdtemp()) / "rbm"
        config = RBMConfig(data="binarized-mnist", data_path=str(SHARED_MNIST), hidden=args.hidden,
                           method="pcd", cd_steps=1, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, momentum=0.0,
                           weight_decay=0.0, lr_schedule="constant", seed=repeat,
                           train_limit=args.train)  # fmt: skip
        models[OURS].append(train_rbm(config, out, progress=False))
        rows = read_metrics(out)
        times[OURS].append(statistics.median(r["update_seconds"] for r in rows))
        whole.append(statistics.median(r["seconds"] for r in rows))

    scores = {
        name: [
            log_likelihood(model, test, train, chains=args.ais_chains, betas=args.ais_betas)
            for model in runs
        ]
        for name, runs in models.items()
    }
    summary = {
        name: {
            "mean": statistics.mean(s["ais"] for s in runs),
            "sd_over_seeds": statistics.stdev(s["ais"] for s in runs) if len(runs) > 1 else 0.0,
            "max_ais_stderr": max(s["ais_stderr"] for s in runs),
        }
        for name, runs in scores.items()
    }
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "settings": vars(args),
        "seconds_per_epoch": seconds,
        "speedup": {name: seconds[name] / seconds[OURS] for name in (SK64, SK32)},
        "elbolab_epoch_with_heldout_metrics": {
            "seconds": statistics.median(whole),
            "speedup_over_sklearn_float32": seconds[SK32] / statistics.median(whole),
            "note": "the epoch's updates and the held-out reconstruction error and "
            "pseudo-log-likelihood on the 10,000 validation images",
        },
        "products": products(args, seconds[OURS]),
        "test_log_likelihood": summary,
        "per_seed": scores,
    }
    for name in times:
        s = summary[name]
        per_seed = " ".join(f"{run['ais']:.2f}" for run in scores[name])
        print(f"{name:<30} {seconds[name]:6.3f} s/epoch  test log p(v) {s['mean']:8.2f} "
              f"(sd over seeds {s['sd_over_seeds']:.2f}; AIS s.e. <= {s['max_ais_stderr']:.2f}; "
              f"seeds: {per_seed})")  # fmt: skip
    speedup = ", ".join(f"{result['speedup'][name]:.2f}x over {name}" for name in (SK64, SK32))
    rate = result["products"]
    print(f"products: {rate['gflop_per_s']:.0f} GFLOP/s, {rate['fraction_of_ceiling']:.0%} of the "
          f"1024^3 float32 product ({rate['ceiling_gflop_per_s']:.0f} GFLOP/s)")  # fmt: skip
    print(f"speed-up {speedup}; written {save('rbm', result)}")


if __name__ == "__main__":
    main()
