"""Run directories: configuration, atomic checkpoints, metrics, and loading a trained run.

A run directory holds ``config.json``, ``checkpoint.pt``, ``metrics.jsonl``
and whatever evaluations wrote; every later command needs nothing else.
Files are written to a temporary name and renamed, so that an interrupted
write never leaves a truncated file behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ppl_models import MODELS, build_model

from .data import DATASETS, Dataset, load_dataset
from .objectives import OBJECTIVES

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class RunError(ValueError):
    """A run directory or configuration that cannot be used; the message says why."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``)."""

    model: str = "vae"
    data: str = "digits"
    data_path: str | None = None
    objective: str = "iwae"
    num_particles: int = 5
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    hidden: list[int] | None = None
    z_dim: int | None = None
    activation: str = "tanh"
    guide_type: str | None = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        """Raise :class:`RunError` naming the first bad value."""
        choices = {"model": MODELS, "data": DATASETS, "objective": OBJECTIVES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise RunError(f"--{key} {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        positive = ("num_particles", "epochs", "batch_size")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise RunError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise RunError(f"--lr must be > 0, got {self.lr}")
        if self.hidden is not None and (not self.hidden or min(self.hidden) < 1):
            raise RunError(f"--hidden needs positive layer sizes, got {self.hidden}")
        from ppl_models.nets import ACTIVATIONS

        if self.activation not in ACTIVATIONS:
            raise RunError(
                f"--activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if self.z_dim is not None and self.z_dim < 1:
            raise RunError(f"--z-dim must be >= 1, got {self.z_dim}")
        return self

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise RunError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**values)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """Write JSON atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write ``checkpoint.pt`` atomically."""
    atomic_write(Path(run_dir) / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise RunError(
            f"{run_dir} has no {CHECKPOINT}: train first (elbolab train --out {run_dir})"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged file can fail in many ways inside torch.load
        raise RunError(f"cannot read {path}: {err}") from err


def read_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise RunError(f"no such run directory: {run_dir}")
    if not path.exists():
        raise RunError(f"{run_dir} is not a run directory: it has no {CONFIG}")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is not valid JSON: {err}") from err


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` atomically with ``rows``."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(Path(run_dir) / METRICS, lambda tmp: tmp.write_text(text))


def build(config: TrainConfig) -> tuple[Dataset, torch.nn.Module]:
    """The data set and a freshly initialised model for ``config``."""
    dataset = load_dataset(config.data, path=config.data_path)
    model = build_model(
        config.model,
        x_dim=dataset.x_dim,
        likelihood=dataset.likelihood,
        hidden=config.hidden,
        z_dim=config.z_dim,
        activation=config.activation if config.model == "vae" else None,
        guide_type=config.guide_type,
    )
    return dataset, model


def load_run(run_dir: Path, *, device: str = "cpu") -> tuple[TrainConfig, Dataset, torch.nn.Module]:
    """Configuration, data set and trained model of a run directory."""
    config = read_config(run_dir)
    dataset, model = build(config)
    model.load_state_dict(load_checkpoint(run_dir)["model"])
    return config, dataset, model.to(device).eval()
