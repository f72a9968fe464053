"""The training loop: minibatch SVI with any objective, atomic checkpoints and exact resume.

Each epoch shuffles the training split with a dedicated generator, takes one
Adam step per minibatch on ``objective.differentiable_loss(model.model,
model.guide, x_batch, num_data=N)``, evaluates the held-out ELBO, appends a
line to ``metrics.jsonl`` and writes a checkpoint that holds the parameters,
the optimiser state and both random states. Resuming from it therefore
reproduces an uninterrupted run with the same seed exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from .bounds import elbo_bound, log_importance_weights
from .objectives import make_objective
from .runs import (
    CONFIG,
    TrainConfig,
    build,
    load_checkpoint,
    prepare_run,
    read_metrics,
    restore_rng,
    rng_state,
    save_checkpoint,
    write_json,
    write_metrics,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@torch.no_grad()
def heldout_elbo(model, x: torch.Tensor, *, batch_size: int = 1000) -> float:
    """Single-sample ELBO averaged over ``x`` (nats per datapoint)."""
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        log_w = log_importance_weights(model.model, model.guide, xb, num_particles=1)
        total += float(elbo_bound(log_w).value.sum())
    return total / x.shape[0]


def make_optimizer(model: torch.nn.Module, *, lr: float) -> torch.optim.Optimizer:
    """Adam; the fused implementation where the device has one (same update, fewer kernels)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(model.parameters(), lr=lr)


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.nn.Module:
    """Train ``config``'s model on its data, writing the run directory ``out``.

    Parameters
    ----------
    config : TrainConfig
        What to train; validated here.
    out : path-like
        Run directory (created).
    resume : bool
        Continue the run in ``out`` from its checkpoint up to ``config.epochs``.
    progress : bool
        Show a progress bar.
    on_step : callable, optional
        Called as ``on_step(epoch, step, loss)`` after every step (for tests).

    Returns
    -------
    torch.nn.Module
        The trained model.

    Raises
    ------
    TrainingDiverged
        When a loss is NaN or infinite. Parameters from the last completed
        epoch stay in ``out/checkpoint.pt``.
    """
    out = Path(out)
    config = prepare_run(config.validate(), out, resume, changeable=("epochs", "device"))
    device = torch.device(config.device)
    pyro.set_rng_seed(config.seed)  # before the model's initialisation
    dataset, model = build(config)
    model.to(device)
    x_train = dataset.split("train").to(device)
    x_heldout = dataset.split(dataset.heldout_split).to(device)
    num_data = x_train.shape[0]
    optimizer = make_optimizer(model, lr=config.lr)
    objective = make_objective(config.objective, num_particles=config.num_particles)
    shuffle = torch.Generator().manual_seed(config.seed)
    start_epoch = 0
    metrics: list[dict] = []

    if resume:
        state = load_checkpoint(out)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], shuffle)
        start_epoch = state["epoch"]
        # Lines written after the checkpoint (an interrupted epoch) are dropped.
        metrics = [row for row in read_metrics(out) if row["epoch"] <= start_epoch]
    else:
        if hasattr(model, "init_from_data"):
            model.init_from_data(x_train)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, config.to_dict())

    steps_per_epoch = math.ceil(num_data / config.batch_size)
    bar = tqdm(
        total=(config.epochs - start_epoch) * steps_per_epoch,
        disable=not progress,
        desc=f"{config.model}/{config.objective}",
        unit="step",
    )
    elapsed = metrics[-1]["elapsed"] if metrics else 0.0
    model.train()
    with pyro.validation_enabled(False), bar:
        for epoch in range(start_epoch, config.epochs):
            tic = time.perf_counter()
            order = torch.randperm(num_data, generator=shuffle).to(device)
            total = 0.0
            for step, begin in enumerate(range(0, num_data, config.batch_size)):
                xb = x_train[order[begin : begin + config.batch_size]]
                loss = objective.differentiable_loss(
                    model.model, model.guide, xb, num_data=num_data
                )
                if not torch.isfinite(loss):
                    kept = (
                        f"the last good checkpoint (epoch {epoch}) is kept in {out}"
                        if epoch
                        else "no epoch had completed, so no checkpoint was written"
                    )
                    raise TrainingDiverged(
                        f"training diverged at epoch {epoch + 1}, step {step + 1}: the "
                        f"{config.objective} loss is {float(loss.detach())}; {kept}; "
                        "try a smaller --lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                if on_step is not None:
                    on_step(epoch, step, loss)
                bar.update(1)
            model.eval()
            heldout = heldout_elbo(model, x_heldout)
            model.train()
            seconds = time.perf_counter() - tic
            elapsed += seconds
            row = {
                "epoch": epoch + 1,
                "objective": config.objective,
                "num_particles": config.num_particles,
                "train_bound": -total / steps_per_epoch / num_data,
                f"{dataset.heldout_split}_elbo": heldout,
                "seconds": seconds,
                "elapsed": elapsed,
            }
            metrics.append(row)
            bar.set_postfix(bound=f"{row['train_bound']:.2f}", heldout=f"{heldout:.2f}")
            state = {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng_state(shuffle, device),
            }
            # Metrics first: a line beyond the checkpoint's epoch is dropped on resume.
            write_metrics(out, metrics)
            save_checkpoint(out, state)
    return model.eval()
