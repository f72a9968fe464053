"""What every report records of how its numbers were made, and the checks that read it back.

A number in a report is worth as much as what it can be traced to: the
checkpoint it was computed from (its SHA-256 and epoch), the exact datapoints
(a hash of their indices and one of their values), every setting and seed,
the threads and processes, and the versions of elbolab, torch and Pyro.
:func:`record` gathers these into a report's ``provenance`` entry;
:func:`stale` tells whether a report still describes its run's current
checkpoint.
"""

from __future__ import annotations

import datetime
import hashlib
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__

CHECKPOINT = "checkpoint.pt"


def versions() -> dict:
    """Versions of Python, elbolab, torch, Pyro and numpy in this process."""
    import pyro

    return {
        "elbolab": __version__,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(tensor: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and values (contiguous, on the CPU)."""
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else tensor
    array = np.ascontiguousarray(array)
    head = f"{array.dtype.str}{array.shape}".encode()
    return hashlib.sha256(head + array.tobytes()).hexdigest()


def datapoints(
    x: torch.Tensor, *, split: str, total: int, every: int = 1, limit: int | None = None
) -> dict:
    """The exact datapoints of an evaluation: which rows of ``split`` and what they hold.

    ``indices_sha256`` hashes the row numbers (every ``every``-th of the
    ``total`` rows, the first ``limit`` of them); ``values_sha256`` hashes
    the data themselves, so that two runs evaluated on the same data share it
    and runs on other data (another vocabulary, another file) do not.
    """
    indices = np.arange(total, dtype=np.int64)[::every][:limit]
    return {
        "split": split,
        "count": int(x.shape[0]),
        "every": every,
        "limit": limit,
        "indices_sha256": tensor_sha256(indices),
        "values_sha256": tensor_sha256(x),
    }


def checkpoint_identity(state: dict, sha256: str) -> dict:
    """A loaded checkpoint as a report names it: its SHA-256 and the epochs it holds."""
    epoch = state.get("epoch") if isinstance(state, dict) else None
    return {"sha256": sha256, "epoch": int(epoch) if isinstance(epoch, int) else None}


def record(
    command: str,
    *,
    settings: dict,
    seed: int | None,
    started: float,
    world_size: int = 1,
    checkpoint: dict | None = None,
    datapoints: dict | None = None,
    model_files: dict | None = None,
) -> dict:
    """A report's ``provenance`` entry.

    Parameters
    ----------
    command : str
        The command (or function) that made the report.
    settings : dict
        Every setting that shapes its numbers.
    seed : int or None
        The seed of its random numbers.
    started : float
        ``time.time()`` when the work began: the entry records it and the wall time.
    world_size : int
        Processes that shared the work (torchrun).
    checkpoint : dict, optional
        :func:`checkpoint_identity` of the run's checkpoint that was read.
    datapoints : dict, optional
        :func:`datapoints` of the data evaluated.
    model_files : dict, optional
        SHA-256 of each file of a user's model code.
    """
    entry = {
        "command": command,
        "settings": settings,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "wall_seconds": round(time.time() - started, 3),
        "versions": versions(),
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else [],
    }
    if checkpoint is not None:
        entry["checkpoint"] = checkpoint
    if datapoints is not None:
        entry["datapoints"] = datapoints
    if model_files:
        entry["model_files"] = model_files
    return entry


def stale(report: dict, run_dir: str | Path) -> str | None:
    """Why ``report`` no longer describes ``run_dir``'s checkpoint, or None when it does.

    A report without provenance (written by an older elbolab) cannot be
    checked, and says so.
    """
    recorded = (
        (report.get("provenance") or {}).get("checkpoint") if isinstance(report, dict) else None
    )
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        return "it records no checkpoint (written by an older elbolab); evaluate again"
    path = Path(run_dir) / CHECKPOINT
    try:
        now = file_sha256(path)
    except OSError:
        return f"the run has no readable {CHECKPOINT} now"
    if now == recorded["sha256"]:
        return None
    epoch = recorded.get("epoch")
    then = f"epoch {epoch}'s checkpoint" if epoch is not None else "an earlier checkpoint"
    return f"it was computed from {then}; the run has been trained since: evaluate again"


def settings(arguments: dict, *, leave_out: tuple[str, ...] = ("run_dir", "progress")) -> dict:
    """A function's arguments (``locals()`` on entry) as a report's settings, JSON-ready."""

    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set):
            return [plain(v) for v in value]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        return repr(value)

    return {k: plain(v) for k, v in arguments.items() if k not in leave_out}


def of_run(command: str, model, config, *, settings: dict, seed, started: float, **extra) -> dict:
    """:func:`record` for a report on a run loaded by :func:`inference.runs.load_run`."""
    return record(
        command, settings=settings, seed=seed, started=started,
        checkpoint=getattr(model, "elbolab_checkpoint", None),
        model_files=getattr(config, "model_files", None), **extra,
    )  # fmt: skip
