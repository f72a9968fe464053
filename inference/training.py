"""The one training skeleton: epochs, progress, NaN guard, metrics, checkpoints, exact resume.

SVI (:mod:`inference.svi`) and contrastive divergence
(:mod:`inference.contrastive`) supply what differs (how to start, one epoch
of updates, what the checkpoint holds); this module does the rest the same
way for both. After every epoch a line is appended to ``metrics.jsonl`` and
then ``checkpoint.pt`` is written, both atomically: metrics first, so that a
line beyond the checkpoint's epoch (an interrupted epoch) is dropped on
resume, and resuming reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .distributed import SINGLE, World, on_main
from .runs import (
    CHECKPOINT,
    CONFIG,
    STATUS,
    RunError,
    load_checkpoint,
    read_metrics,
    read_status,
    run_lock,
    save_checkpoint,
    write_json,
    write_metrics,
)


class TrainingDiverged(RunError):
    """The loss or the parameters became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM; the message says what is kept and how to resume."""


@dataclass
class Trainer:
    """What one kind of training supplies to :func:`fit`.

    Attributes
    ----------
    start : callable
        ``start(state)``: restore from a checkpoint's ``state`` (resume), or,
        with ``None``, initialise a new run (before ``config.json`` is written).
    epoch : callable
        ``epoch(index, bar)``: one epoch of updates (``bar.update(1)`` per
        step); returns the epoch's metrics (``epoch``, ``seconds`` and
        ``elapsed`` are added).
    state : callable
        ``state()``: what the checkpoint holds besides the epoch number.
    steps_per_epoch : int
        Updates per epoch, for the progress bar.
    desc : str
        Progress bar label.
    """

    start: Callable[[dict | None], None]
    epoch: Callable[[int, tqdm], dict]
    state: Callable[[], dict]
    steps_per_epoch: int
    desc: str


def diverged(out: Path, epoch: int, detail: str, *, step: int | None = None) -> TrainingDiverged:
    """The error for a non-finite loss or parameter in ``epoch`` (0-based), naming what is kept."""
    where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
    kept = (
        f"the last good checkpoint (epoch {epoch}) is kept in {out}"
        if epoch
        else "no epoch had completed, so no checkpoint was written"
    )
    return TrainingDiverged(f"training diverged at {where}: {detail}; {kept}; try a smaller --lr")


def check_finite(value, out: Path, epoch: int, detail: str, *, step: int | None = None) -> None:
    """Raise :class:`TrainingDiverged` unless ``value`` (a number or tensor) is finite."""
    finite = bool(value.isfinite().all()) if hasattr(value, "isfinite") else math.isfinite(value)
    if not finite:
        raise diverged(out, epoch, detail, step=step)


# A bound per datapoint beyond this many nats is no number a model can have: divergence.
ABSURD = 1e12
# Or beyond this factor of the first epoch's (and at least 1e6 nats).
ABSURD_FACTOR = 1e3


def absurd(key: str, value, first) -> str | None:
    """Why a training metric says that training diverged, or None."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if not math.isfinite(value):
        return f"the {key.replace('_', ' ')} is {value}"
    if abs(value) > ABSURD:
        return f"the {key.replace('_', ' ')} is {value:.3g} nats, beyond any model's"
    if (
        isinstance(first, int | float)
        and math.isfinite(first)
        and abs(value) > 1e6
        and (abs(value) > ABSURD_FACTOR * max(abs(first), 1.0))
    ):
        return f"the {key.replace('_', ' ')} went from {first:.4g} to {value:.3g} nats"
    return None


# The metrics whose size says whether training diverged (bounds and likelihoods, in nats).
WATCHED = ("train_bound", "_elbo", "log_likelihood")


def _check_metrics(row: dict, metrics: list[dict], out: Path, epoch: int) -> None:
    """Raise :class:`TrainingDiverged` when an epoch's metrics are non-finite or absurd."""
    for key, value in row.items():
        first = metrics[0].get(key) if metrics else None
        why = absurd(key, value, first) if key.endswith(WATCHED) else None
        if why:
            raise diverged(out, epoch, why)


def choose_shards(out: Path, world: World, shards: int | None, resume: bool) -> int:
    """The pieces each global batch is split into (see :func:`inference.svi.train`).

    Given: as given. A resume keeps the run's own (a single process computes
    2 pieces as 2 processes do: the uninterrupted run's numbers, exactly),
    unless more processes than pieces run now: then it warns that the
    resumed run will not reproduce an uninterrupted one, and config.json
    records it.
    """
    if shards is not None:
        return shards
    recorded = read_status(out).get("shards") if resume else None
    if isinstance(recorded, int) and recorded >= world.size:
        return recorded
    if isinstance(recorded, int) and world.is_main:
        warnings.warn(
            f"{out} split each batch into {recorded} piece(s), which {world.size} processes "
            f"cannot share: it continues in {world.size} pieces, with other random streams, so "
            "it will not equal an uninterrupted run (recorded in config.json)",
            stacklevel=2,
        )
    return world.size


def fit(
    trainer: Trainer,
    config,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    world: World = SINGLE,
    shards: int = 1,
) -> list[dict]:
    """Run ``trainer`` from its first (or checkpointed) epoch to ``config.epochs``.

    In a job of several processes (``world``) every rank trains and rank 0
    alone holds the lock and writes ``config.json``, metrics and checkpoints.

    After every checkpoint ``config.json`` is rewritten with what the run
    now is: the epochs asked, and under ``trained`` the epochs done, the
    pieces of each batch (``shards``) and each stretch of training with its
    number of processes.

    Returns
    -------
    list of dict
        Every epoch's metrics, as in ``metrics.jsonl`` (rank 0's).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out) if world.is_main else nullcontext():
        return _fit_locked(trainer, config, out, resume=resume, progress=progress, world=world,
                           shards=shards)  # fmt: skip


def _fit_locked(trainer: Trainer, config, out: Path, *, resume: bool, progress: bool, world,
                shards: int):  # fmt: skip
    start_epoch, metrics = 0, []
    writes = world.is_main
    stretches = []
    if resume:
        state = load_checkpoint(out)
        start_epoch = state["epoch"]
        if config.epochs <= start_epoch:
            raise RunError(
                f"--epochs {config.epochs}: {out} has trained {start_epoch} epochs already; "
                f"ask for more (--epochs {start_epoch + 10}, say) to continue it"
            )
        trainer.start(state)
        # Lines written after the checkpoint (an interrupted epoch) are dropped.
        metrics = [row for row in read_metrics(out) if row["epoch"] <= start_epoch]
        stretches = [s for s in read_status(out).get("stretches", []) if isinstance(s, dict)]
    else:
        trainer.start(None)
    stretch = {"from_epoch": start_epoch, "to_epoch": start_epoch, "processes": world.size,
               "shards": shards, "threads": torch.get_num_threads()}  # fmt: skip

    def record(done: int) -> None:
        stretch["to_epoch"] = done
        status = {"epochs_done": done, "shards": shards, "stretches": [*stretches, stretch]}
        write_json(out / CONFIG, {**config.to_dict(), STATUS: status})

    if writes:
        record(start_epoch)  # the epochs asked now (a resume may ask for more)
    elapsed = metrics[-1]["elapsed"] if metrics else 0.0
    done = start_epoch
    bar = tqdm(
        total=(config.epochs - start_epoch) * trainer.steps_per_epoch,
        disable=not progress or not writes,
        desc=trainer.desc,
        unit="step",
    )
    try:
        with bar:
            for epoch in range(start_epoch, config.epochs):
                tic = time.perf_counter()
                row = trainer.epoch(epoch, bar)
                # Rank 0 judges its metrics; every rank stops with it.
                on_main(world, lambda r=row, e=epoch: _check_metrics(r, metrics, out, e))
                seconds = time.perf_counter() - tic
                elapsed += seconds
                metrics.append({"epoch": epoch + 1, **row, "seconds": seconds, "elapsed": elapsed})
                if writes:
                    write_metrics(out, metrics)
                    save_checkpoint(out, {"epoch": epoch + 1, **trainer.state()})
                    record(epoch + 1)
                done = epoch + 1
    except KeyboardInterrupt:
        # Checkpoints are written atomically: the last complete one is intact. The signal
        # may come between its rename and the count above: the file says which it is.
        if writes and (out / CHECKPOINT).exists():
            done = _checkpoint_epoch(out, done)
        kept = (
            f"the checkpoint of epoch {done} is kept in {out}; continue with --resume (same --out)"
            if done
            else "no epoch had completed, so no checkpoint was written"
        )
        raise TrainingInterrupted(f"interrupted in epoch {done + 1}; {kept}") from None
    return metrics


def _checkpoint_epoch(out: Path, default: int) -> int:
    try:
        return int(load_checkpoint(out)["epoch"])
    except Exception:  # unreadable: say what this process last knew
        return default
