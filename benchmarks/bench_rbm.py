"""RBM training against scikit-learn's BernoulliRBM: seconds per epoch and log-likelihood.

Same data (the first --train binarized MNIST training images), same hidden
size, batch size, learning rate and number of epochs, persistent CD-1 in both.
scikit-learn runs twice per round: on the data as float64, which is what
``BernoulliRBM().fit`` makes of the uint8 arrays in the npz file, and on
float32, its fastest setting. elbolab runs twice too: with its sparse
kernels (the default on this data, 13% ones: the products with a binary
factor over its nonzeros, :mod:`inference.kernels`) and with torch's dense
products (``sparse_kernels=False``). Runs alternate (sklearn float64,
sklearn float32, elbolab, elbolab dense, ...) and the medians of the seconds
per epoch are reported: for elbolab the epoch's updates alone
(``update_seconds`` in ``metrics.jsonl``), as BernoulliRBM's ``fit`` does
nothing else, and, apart, the whole epoch with elbolab's held-out metrics on
the 10,000 validation images. The matrix products of a PCD-1 update (p(h|v)
of the data, p(v|h) and p(h|v) of the chains, and the two statistics) are
timed each way on one minibatch and set against a 1024^3 float32 product
measured in the same run. The trained models are then scored by
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
from common import SHARED_MNIST, interleaved, matmul_ceiling, mnist_split, save
from sklearn.neural_network import BernoulliRBM

from inference import kernels
from inference.contrastive import RBMConfig, train_rbm
from inference.partition import ais_bracket, ais_log_partition
from inference.runs import read_metrics
from ppl_models.rbm import RBM, sample_bernoulli

SK64 = "sklearn BernoulliRBM float64"
SK32 = "sklearn BernoulliRBM float32"
OURS = "elbolab PCD-1"
DENSE = "elbolab PCD-1, dense products"


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


def products(rbm: RBM, x: torch.Tensor, args, seconds_per_epoch: float) -> dict:
    """What an update's matrix products cost, each way, against the 1024^3 product.

    Timed on one minibatch of the data with a trained RBM (interleaved, medians):
    p(h|v) of the data and of the chains' visibles (sampled from p(v|h), h ~
    p(h|data)), p(v|h) of the chains' hidden samples, and the statistics of both
    phases added into W. Dense: torch's products, 2 * batch * 784 * hidden FLOP
    each. Sparse: the kernels over the binary factor's nonzeros, which do only
    the multiply-adds of the ones; reported as a dense-equivalent rate.
    """
    batch = x[: args.batch_size].contiguous()
    with torch.no_grad():
        ph = torch.sigmoid(rbm.hidden_logits(batch))
        h = sample_bernoulli(ph)
        v_neg = sample_bernoulli(torch.sigmoid(rbm.visible_logits(h)))
        ph_neg = torch.sigmoid(rbm.hidden_logits(v_neg))
    target = rbm.W.detach().clone()
    w, b_h, b_v = rbm.W.detach(), rbm.b_h.detach(), rbm.b_v.detach()
    step = 1e-9  # W barely moves over the repeats
    timed = interleaved(
        {
            "p(h|v) dense": lambda: torch.addmm(b_h, batch, w),
            "p(h|v) sparse": lambda: kernels.sparse_times_dense(batch, w, b_h),
            "p(v|h) dense": lambda: torch.addmm(b_v, h, w.T),
            "statistics dense": lambda: target.addmm_(batch.T, ph, alpha=step).addmm_(
                v_neg.T, ph_neg, alpha=-step
            ),
            "statistics sparse": lambda: kernels.sparse_outer_add(
                target, batch, ph, v_neg, ph_neg, alpha1=step, alpha2=-step
            ),
        },
        rounds=15,
        steps=20,
    )
    ms = {name: 1e3 * seconds for name, seconds in timed.items()}
    dense_ms = 2 * ms["p(h|v) dense"] + ms["p(v|h) dense"] + ms["statistics dense"]
    sparse_ms = 2 * ms["p(h|v) sparse"] + ms["p(v|h) dense"] + ms["statistics sparse"]
    flop = 5 * 2 * args.batch_size * 784 * args.hidden  # five dense products per update
    ones = float(batch.sum() + v_neg.sum())
    sparse_flop = 2 * args.hidden * (2 * ones + args.batch_size * 784)
    ceiling = matmul_ceiling()
    steps = -(-args.train // args.batch_size)
    return {
        "ceiling_gflop_per_s": ceiling / 1e9,
        "ms_per_product": ms,
        "dense": {
            "ms_per_update": dense_ms,
            "gflop_per_s": flop / dense_ms / 1e6,
            "fraction_of_ceiling": flop / dense_ms * 1e3 / ceiling,
        },
        "sparse": {
            "ms_per_update": sparse_ms,
            "dense_equivalent_gflop_per_s": flop / sparse_ms / 1e6,
            "dense_equivalent_fraction_of_ceiling": flop / sparse_ms * 1e3 / ceiling,
            "fraction_of_dense_flop_done": sparse_flop / flop,
            "ones_in_data_and_negatives": ones / (2 * args.batch_size * 784),
        },
        "elbolab_epoch_dense_equivalent_gflop_per_s": steps * flop / seconds_per_epoch / 1e9,
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
    times: dict[str, list[float]] = {SK64: [], SK32: [], OURS: [], DENSE: []}
    models: dict[str, list[RBM]] = {name: [] for name in (SK64, SK32, OURS)}
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

        config = RBMConfig(data="binarized-mnist", data_path=str(SHARED_MNIST), hidden=args.hidden,
                           method="pcd", cd_steps=1, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, momentum=0.0,
                           weight_decay=0.0, lr_schedule="constant", seed=repeat,
                           train_limit=args.train)  # fmt: skip
        for name, sparse in ((OURS, True), (DENSE, False)):
            out = Path(tempfile.mkdtemp()) / "rbm"
            model = train_rbm(config, out, progress=False, sparse_kernels=sparse)
            rows = read_metrics(out)
            times[name].append(statistics.median(r["update_seconds"] for r in rows))
            if sparse:  # the dense path is timed only: the same sampler, rounded differently
                models[name].append(model)
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
        "speedup": {name: seconds[name] / seconds[OURS] for name in (SK64, SK32, DENSE)},
        "dense_products_speedup": {name: seconds[name] / seconds[DENSE] for name in (SK64, SK32)},
        "elbolab_epoch_with_heldout_metrics": {
            "seconds": statistics.median(whole),
            "speedup_over_sklearn_float32": seconds[SK32] / statistics.median(whole),
            "note": "the epoch's updates and the held-out reconstruction error and "
            "pseudo-log-likelihood on the 10,000 validation images",
        },
        "products": products(models[OURS][0], train, args, seconds[OURS]),
        "test_log_likelihood": summary,
        "per_seed": scores,
    }
    for name in times:
        line = f"{name:<32} {seconds[name]:6.3f} s/epoch"
        if name in summary:
            s = summary[name]
            per_seed = " ".join(f"{run['ais']:.2f}" for run in scores[name])
            line += (f"  test log p(v) {s['mean']:8.2f} (sd over seeds {s['sd_over_seeds']:.2f}; "
                     f"AIS s.e. <= {s['max_ais_stderr']:.2f}; seeds: {per_seed})")  # fmt: skip
        print(line)
    speedup = ", ".join(f"{result['speedup'][name]:.2f}x over {name}" for name in result["speedup"])
    rate = result["products"]
    dense, sparse = rate["dense"], rate["sparse"]
    print(f"products per update: dense {dense['ms_per_update']:.2f} ms, "
          f"{dense['gflop_per_s']:.0f} GFLOP/s = {dense['fraction_of_ceiling']:.0%} of the 1024^3 "
          f"float32 product ({rate['ceiling_gflop_per_s']:.0f} GFLOP/s); sparse "
          f"{sparse['ms_per_update']:.2f} ms ({sparse['fraction_of_dense_flop_done']:.0%} of the "
          f"FLOP, {sparse['dense_equivalent_fraction_of_ceiling']:.0%} of the ceiling "
          "dense-equivalent)")  # fmt: skip
    print(f"speed-up {speedup}; written {save('rbm', result)}")


if __name__ == "__main__":
    main()
