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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .distributed import SINGLE, World
from .runs import (
    CHECKPOINT,
    CONFIG,
    RunError,
    load_checkpoint,
    read_metrics,
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


def fit(
    trainer: Trainer, config, out: Path, *, resume: bool, progress: bool, world: World = SINGLE
) -> list[dict]:
    """Run ``trainer`` from its first (or checkpointed) epoch to ``config.epochs``.

    In a job of several processes (``world``) every rank trains and rank 0
    alone holds the lock and writes ``config.json``, metrics and checkpoints.

    Returns
    -------
    list of dict
        Every epoch's metrics, as in ``metrics.jsonl`` (rank 0's).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out) if world.is_main else nullcontext():
        return _fit_locked(trainer, config, out, resume=resume, progress=progress, world=world)


def _fit_locked(trainer: Trainer, config, out: Path, *, resume: bool, progress: bool, world):
    start_epoch, metrics = 0, []
    writes = world.is_main
    if resume:
        state = load_checkpoint(out)
        trainer.start(state)
        start_epoch = state["epoch"]
        # Lines written after the checkpoint (an interrupted epoch) are dropped.
        metrics = [row for row in read_metrics(out) if row["epoch"] <= start_epoch]
    else:
        trainer.start(None)
        if writes:
            write_json(out / CONFIG, config.to_dict())
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
                seconds = time.perf_counter() - tic
                elapsed += seconds
                metrics.append({"epoch": epoch + 1, **row, "seconds": seconds, "elapsed": elapsed})
                if writes:
                    write_metrics(out, metrics)
                    save_checkpoint(out, {"epoch": epoch + 1, **trainer.state()})
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
