"""RBM training against scikit-learn's BernoulliRBM: seconds per epoch and log-likelihood.

Same data (the first --train binarized MNIST training images), same hidden
size, batch size, learning rate and number of epochs, persistent CD-1 in both.
Runs alternate (sklearn, elbolab, sklearn, ...) and the medians of the
seconds per epoch are reported. Both trained models are then scored by
elbolab: BernoulliRBM's ``components_``, ``intercept_visible_`` and
``intercept_hidden_`` are loaded into an elbolab RBM, and the test
log-likelihood is estimated by AIS with its reverse-AIS bracket.

    python benchmarks/bench_rbm.py [--hidden 500] [--epochs 5] [--train 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED_MNIST, mnist_split, save
from sklearn.neural_network import BernoulliRBM

from inference.contrastive import RBMConfig, ais_bracket, train_rbm
from inference.partition import ais_log_partition
from inference.runs import read_metrics
from ppl_models.rbm import RBM


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ais-chains", type=int, default=100)
    parser.add_argument("--ais-betas", type=int, default=10_000)
    args = parser.parse_args()

    train = mnist_split("train")[: args.train]
    test = mnist_split("test")
    x_np = train.numpy()
    sk_times, our_times = [], []
    sk_model = ours = None
    for repeat in range(args.repeats):
        sk_model = BernoulliRBM(n_components=args.hidden, learning_rate=args.lr,
                                batch_size=args.batch_size, n_iter=args.epochs,
                                random_state=repeat)  # fmt: skip
        tic = time.perf_counter()
        sk_model.fit(x_np)
        sk_times.append((time.perf_counter() - tic) / args.epochs)

        out = Path(tempfile.mkdtemp()) / "rbm"
        config = RBMConfig(data="binarized-mnist", data_path=str(SHARED_MNIST), hidden=args.hidden,
                           method="pcd", cd_steps=1, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, momentum=0.0,
                           weight_decay=0.0, seed=repeat, train_limit=args.train)  # fmt: skip
        ours = train_rbm(config, out, progress=False)
        our_times.append(statistics.median(r["seconds"] for r in read_metrics(out)))

    sk_rbm = RBM(784, args.hidden).requires_grad_(False)
    with torch.no_grad():
        sk_rbm.W.copy_(torch.as_tensor(sk_model.components_.T))
        sk_rbm.b_v.copy_(torch.as_tensor(sk_model.intercept_visible_))
        sk_rbm.b_h.copy_(torch.as_tensor(sk_model.intercept_hidden_))
    scores = {
        name: log_likelihood(model, test, train, chains=args.ais_chains, betas=args.ais_betas)
        for name, model in (("sklearn BernoulliRBM", sk_rbm), ("elbolab PCD-1", ours))
    }
    result = {
        "settings": vars(args),
        "seconds_per_epoch": {
            "sklearn BernoulliRBM": statistics.median(sk_times),
            "elbolab PCD-1": statistics.median(our_times),
        },
        "speedup": statistics.median(sk_times) / statistics.median(our_times),
        "test_log_likelihood": scores,
    }
    for name, seconds in result["seconds_per_epoch"].items():
        s = scores[name]
        low, high = s["bracket"]
        print(f"{name:<22} {seconds:6.3f} s/epoch  test log p(v) {s['ais']:8.2f} "
              f"(+- {s['ais_stderr']:.2f}; bracket {low:.2f} .. {high:.2f})")  # fmt: skip
    print(f"speed-up {result['speedup']:.2f}x; written {save('rbm', result)}")


if __name__ == "__main__":
    main()
