"""Training steps per second: elbolab against a hand-written PyTorch VAE, same process.

The reference is the VAE a person writes by hand in plain PyTorch: the same
784-200-200-50 tanh architecture and initial weights, the reparameterised
single-sample ELBO (or IWAE-K) as one expression, ``torch.optim.Adam`` with
its defaults. elbolab's step is what ``elbolab train`` runs:
``make_objective(...).differentiable_loss(vae.model, vae.guide, x, num_data=N)``,
backward and its optimiser, with Pyro's validation off; and the same step
compiled (``elbolab train --compile``: :class:`inference.compiled.CompiledStep`,
its compilation done before the timing and reported apart), and replayed
(the captured step run as recorded, as runs of 500-3000 steps at K <= 10 do: the eager
step's numbers bit for bit). DReG is timed
against IWAE at the same K. Pyro's own ``Trace_ELBO`` step is timed too.
Runs are interleaved; medians are reported.

    python benchmarks/bench_train_step.py [--rounds 9] [--steps 20] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import copy

import pyro
import torch
from common import interleaved, mnist_split, save
from hand_written_vae import hand_written_bound
from pyro.infer import Trace_ELBO

from inference.compiled import CompiledStep
from inference.objectives import make_objective
from inference.svi import make_optimizer
from ppl_models import VAE


def hand_written_loss(vae: VAE, x: torch.Tensor, k: int, num_data: int) -> torch.Tensor:
    """Negative ELBO (k = 1) or IWAE-k bound, written directly in torch, scaled by N/B."""
    bound = hand_written_bound(vae.encoder, vae.decoder, vae.z_dim, x, k)
    return -bound.sum() * num_data / x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    pyro.set_rng_seed(0)
    x_all = mnist_split("train")
    num_data, batch = x_all.shape[0], args.batch_size
    base = VAE(784)
    base.init_from_data(x_all)
    counter = {"i": 0}

    def batch_of_data():
        counter["i"] = (counter["i"] + 1) % (num_data // batch)
        return x_all[counter["i"] * batch : (counter["i"] + 1) * batch]

    def stepper(loss_fn, optimizer_factory):
        vae = copy.deepcopy(base)
        opt = optimizer_factory(vae)

        def step():
            loss = loss_fn(vae, batch_of_data())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def adam(vae):
        return torch.optim.Adam(vae.parameters(), lr=1e-3)

    def elbolab_opt(vae):
        return make_optimizer(vae, lr=1e-3)

    def objective(name, k):
        obj = make_objective(name, num_particles=k)
        return lambda vae, x: obj.differentiable_loss(vae.model, vae.guide, x, num_data=num_data)

    compile_seconds = {}

    def compiled(name, k, backend="inductor"):
        vae = copy.deepcopy(base)
        opt = make_optimizer(vae, lr=1e-3)
        step_fn = CompiledStep(vae, make_objective(name, num_particles=k), {"num_data": num_data},
                               backend=backend)  # fmt: skip
        step_fn(batch_of_data())  # capture and compile, outside the timing
        assert step_fn.fallback is None, step_fn.fallback
        compile_seconds[f"{name} K={k} {backend}"] = step_fn.compile_seconds
        opt.step()

        def step():
            opt.zero_grad(set_to_none=True)
            step_fn(batch_of_data())
            opt.step()

        return step

    trace_elbo = Trace_ELBO(num_particles=1, vectorize_particles=True)
    results = {}
    with pyro.validation_enabled(False):
        for k in (1, 5, 50):
            name = "elbo" if k == 1 else "iwae"
            candidates = {
                "hand-written": stepper(
                    lambda v, x, k=k: hand_written_loss(v, x, k, num_data), adam
                ),
                "hand-written, fused Adam": stepper(
                    lambda v, x, k=k: hand_written_loss(v, x, k, num_data), elbolab_opt
                ),
                f"elbolab {name}": stepper(objective(name, k), elbolab_opt),
                f"elbolab {name}, replayed": compiled(name, k, "replay"),
                f"elbolab {name}, compiled": compiled(name, k),
            }
            if k > 1:
                candidates["elbolab dreg"] = stepper(objective("dreg", k), elbolab_opt)
                candidates["elbolab dreg, compiled"] = compiled("dreg", k)
            if k == 1:
                candidates["pyro Trace_ELBO"] = stepper(
                    lambda v, x: trace_elbo.differentiable_loss(
                        v.model, v.guide, x, num_data=num_data
                    ),
                    adam,
                )
            medians = interleaved(candidates, rounds=args.rounds, steps=args.steps)
            ref = medians["hand-written"]
            results[f"K={k}"] = {
                name: {"ms_per_step": 1e3 * t, "steps_per_s": 1 / t, "ratio": t / ref}
                for name, t in medians.items()
            }
    print(f"batch {batch}, 784-200-200-50 tanh VAE, binarized MNIST; ratio = time / hand-written")
    for setting, rows in results.items():
        for name, row in rows.items():
            print(
                f"{setting:<5} {name:<26} {row['steps_per_s']:8.1f} steps/s"
                f"  {row['ms_per_step']:7.2f} ms  ratio {row['ratio']:.3f}"
            )
    for setting, seconds in compile_seconds.items():
        print(f"compilation (once per run, not in the step times): {setting} {seconds:.1f} s")
    path = save(
        f"train_step_b{batch}",
        {
            "batch_size": batch,
            "rounds": args.rounds,
            "results": results,
            "compile_seconds": compile_seconds,
        },
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
