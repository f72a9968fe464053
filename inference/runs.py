"""Run directories: configuration, atomic checkpoints, metrics, and loading a trained run.

A run directory holds ``config.json``, ``checkpoint.pt``, ``metrics.jsonl``
and whatever evaluations wrote; every later command needs nothing else.
Files are written to a temporary name and renamed, so that an interrupted
write never leaves a truncated file behind.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ppl_models import MODELS, build_model
from ppl_models.hierarchical import TEXT_CORRUPTIONS, parse_corruption
from ppl_models.nets import ACTIVATIONS

from . import __version__, provenance, user_model
from .data import DATASETS, TEXT_DATASETS, Dataset, load_dataset
from .inspection import check_per_datapoint
from .objectives import OBJECTIVES

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["TrainConfig", "load_run"]

CONFIG = "config.json"
STATUS = "trained"  # config.json's record of what the run now is (see inference.training)
MARKER = "elbolab"  # config.json's key for the version of elbolab that wrote the run
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOCK = "train.lock"  # holds the pid of the process that trains into the run
EVALS = "evals"  # named evaluations (inference.commands.store)


class RunError(ValueError):
    """A run directory or configuration that cannot be used; the message says why."""


_JSON_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict}


def _check_type(name: str, value, annotation: str):
    """``value`` of a config.json entry checked against its field's annotation (a string).

    Returns the value (ints become floats where a float is expected); raises
    :class:`RunError` naming the key.
    """
    options = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in options:
        return None
    for option in options:
        if option.startswith("list[") and isinstance(value, list):
            inner = _JSON_TYPES[option[5:-1]]
            if all(isinstance(v, inner) and not isinstance(v, bool) for v in value):
                return value
        elif option in _JSON_TYPES and isinstance(value, _JSON_TYPES[option]):
            if isinstance(value, bool) and option != "bool":
                continue  # JSON true is no number
            return float(value) if option == "float" else value
    raise RunError(f"{name!r} must be {' or '.join(options)}, got {json.dumps(value)[:40]}")


# Upper limits of the sizes in a configuration: far above any use here, and far below
# what would exhaust memory (a 10^9-wide layer) or run for ever.
SIZE_LIMITS = {
    "hidden": 16_384, "z_dim": 16_384, "layers": 16, "num_particles": 1_000_000,
    "batch_size": 10_000_000, "epochs": 1_000_000, "cd_steps": 10_000,
    "max_vocab": 1_000_000,
}  # fmt: skip
# The configuration fields that only some built-in models take.
MODEL_FIELDS = {"guide_type": ("linear-gaussian",), "layers": ("hvae",), "corruption": ("hvae",),
                "hidden": ("vae", "hvae")}  # fmt: skip


class RunConfig:
    """Shared by run configurations: ``kind`` names the trainer; JSON round trip."""

    kind: ClassVar[str] = "run"

    @classmethod
    def from_dict(cls, values: dict):
        """A configuration from config.json's values: keys, types and ranges checked."""
        if not isinstance(values, dict):
            raise RunError(f"expected a JSON object, got {type(values).__name__}")
        values = {k: v for k, v in values.items() if k not in ("kind", MARKER, STATUS)}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(fields)
        if unknown:
            raise RunError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        checked = {k: _check_type(k, v, str(fields[k].type)) for k, v in values.items()}
        return cls(**checked).validate()

    def to_dict(self) -> dict:
        return {"kind": self.kind, MARKER: __version__, **dataclasses.asdict(self)}

    def validate(self):
        """Raise :class:`RunError` naming the first bad value; return ``self``."""
        return self

    def check_positive(self, *names: str) -> None:
        """Raise :class:`RunError` for the first of ``names`` out of its range.

        Integers (and each entry of a list) must be >= 1 and at most their
        :data:`SIZE_LIMITS` entry, which keeps memory sane; floats must be
        finite and > 0. ``None`` is left alone (a default).
        """
        for name in names:
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            if value is None:
                continue
            if isinstance(value, float):
                if not (math.isfinite(value) and value > 0):
                    raise RunError(f"{flag} must be finite and > 0, got {value}")
                continue
            high = SIZE_LIMITS.get(name)
            for item in value if isinstance(value, list) else [value]:
                if item < 1:
                    raise RunError(f"{flag} must be >= 1, got {value}")
                if high is not None and item > high:
                    raise RunError(f"{flag} must be at most {high:,}, got {value}")


@dataclass
class TrainConfig(RunConfig):
    """Everything that defines a training run (saved as ``config.json``).

    Examples
    --------
    >>> from inference import TrainConfig
    >>> config = TrainConfig(model="vae", objective="dreg", num_particles=5, epochs=2)
    >>> config.validate().objective
    'dreg'
    """

    kind: ClassVar[str] = "svi"
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
    layers: int | None = None
    corruption: str | None = None
    min_count: int | None = None  # text data: vocabulary options (see inference.data)
    max_vocab: int | None = None
    device: str = "cpu"
    # The training step captured and compiled (inference.compiled); None: when the run is long
    # enough to pay for it (inference.svi.COMPILE_MIN_STEPS). config.json records the decision.
    compile: bool | None = None
    model_sha256: str | None = None  # of a user model's code (see inference.user_model)
    model_files: dict | None = None  # the SHA-256 of each file of that code
    extra: dict = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        """Raise :class:`RunError` naming the first bad value."""
        choices = {"data": DATASETS, "objective": OBJECTIVES}
        if self.model not in MODELS and not user_model.is_reference(self.model):
            raise RunError(
                f"--model {self.model!r} is not one of {', '.join(MODELS)}, nor a factory "
                "FILE.py:NAME or MODULE:NAME"
            )
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise RunError(f"--{key} {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        self.check_positive("num_particles", "epochs", "batch_size", "lr", "hidden", "z_dim")
        if self.hidden is not None and not self.hidden:
            raise RunError("--hidden needs at least one layer size")
        if self.model in MODELS:
            for name, models in MODEL_FIELDS.items():
                if getattr(self, name) is not None and self.model not in models:
                    raise RunError(
                        f"--{name.replace('_', '-')} needs --model {' or '.join(models)}, "
                        f"not {self.model}"
                    )
        if self.activation not in ACTIVATIONS:
            raise RunError(
                f"--activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        self.check_positive("layers")
        if self.corruption is not None:
            try:
                parse_corruption(self.corruption)
            except ValueError as err:
                raise RunError(f"--corruption: {err}") from None
            if self.model != "hvae":
                raise RunError("--corruption needs --model hvae (it is the encoder's first layer)")
            if self.layers is not None and self.layers < 2:
                raise RunError("--corruption is the first of at least 2 layers: use --layers 2+")
            text = self.corruption.partition(":")[0] in TEXT_CORRUPTIONS
            if text != (self.data in TEXT_DATASETS):
                needs = "text data" if text else "image data"
                raise RunError(f"--corruption {self.corruption} needs {needs}, not {self.data}")
        self.check_positive("min_count", "max_vocab")
        if self.data not in TEXT_DATASETS:
            for name in ("min_count", "max_vocab"):
                if getattr(self, name) is not None:
                    raise RunError(
                        f"--{name.replace('_', '-')} shapes a vocabulary: it needs text data "
                        f"({', '.join(TEXT_DATASETS)}), not {self.data}"
                    )
        return self


def check_device(device: str) -> None:
    """Raise :class:`RunError` unless torch can use ``device`` here."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise RunError(f"--device {device!r}: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {device!r}: this machine has no CUDA device; use cpu")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    An interrupted or failed write (a full disk, a signal) leaves ``path`` as
    it was; a failure of the file system is a :class:`RunError` that says so.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        interrupt = _interruption(err)
        if interrupt is not None:  # a writer whose cleanup failed because a signal stopped it
            raise interrupt from None
        if isinstance(err, OSError):
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            raise RunError(f"cannot write {path}: {err.strerror or err}; {kept}") from None
        raise


def _interruption(err: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind ``err``, if any: ``err`` itself or what it was raised during.

    torch.save stopped by a signal fails again while closing its zip file, and
    that error would hide the interruption (and print a traceback).
    """
    while err is not None and not isinstance(err, KeyboardInterrupt):
        err = err.__context__
    return err


def write_json(path: Path, obj) -> None:
    """Write JSON atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write ``checkpoint.pt`` atomically."""
    atomic_write(Path(run_dir) / CHECKPOINT, lambda tmp: _save_tensors(state, tmp))


def _save_tensors(state: dict, path: Path) -> None:
    with open(path, "wb") as f:  # a Python file: a full disk is an OSError, not torch's own
        torch.save(state, f)


def load_checkpoint(run_dir: Path) -> dict:
    """The run's ``checkpoint.pt`` (tensors and plain values only)."""
    return read_checkpoint(run_dir)[0]


def read_checkpoint(run_dir: Path) -> tuple[dict, dict]:
    """The run's checkpoint and its identity (:func:`inference.provenance.checkpoint_identity`).

    The file is read once: the SHA-256 is of the very bytes loaded, even while
    a training process writes the next checkpoint.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise RunError(
            f"{run_dir} has no {CHECKPOINT}: train first (elbolab train --out {run_dir})"
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        # weights_only: tensors, numbers and plain containers; never code from a shared run.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a foreign object: a damaged file
            raise RunError(f"cannot read {path}: damaged or not a checkpoint") from None
        raise RunError(
            f"refusing to load {path}: it holds pickled objects beyond tensors and plain values "
            "(elbolab writes none), and loading them could run code"
        ) from None
    except Exception as err:  # a damaged file can fail in many ways inside torch.load
        raise RunError(f"cannot read {path}: {err}") from err
    if not isinstance(state, dict):
        raise RunError(f"cannot read {path}: not a checkpoint")
    return state, provenance.checkpoint_identity(state, provenance.bytes_sha256(data))


def read_status(run_dir: Path) -> dict:
    """What config.json records of the run's training so far (empty for older runs)."""
    try:
        values = json.loads((Path(run_dir) / CONFIG).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    status = values.get(STATUS) if isinstance(values, dict) else None
    return status if isinstance(status, dict) else {}


def read_config(run_dir: Path, cls=None):
    """The run's configuration, as ``cls`` (default :class:`TrainConfig`)."""
    cls = cls or TrainConfig
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise RunError(f"no such run directory: {run_dir}")
    if not path.exists():
        raise RunError(f"{run_dir} is not a run directory: it has no {CONFIG}")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not valid JSON: {err}") from err
    kind = values.get("kind", "svi") if isinstance(values, dict) else None
    if isinstance(values, dict) and kind != cls.kind:
        command = "elbolab rbm evaluate" if kind == "rbm" else "elbolab evaluate"
        raise RunError(f"{run_dir} is a {kind} run; use {command}")
    try:
        return cls.from_dict(values)
    except RunError as err:
        raise RunError(f"{path}: {err}") from None


def config_differences(saved, config, *, ignore: Sequence[str] = ()) -> str:
    """The fields in which two configurations differ, as text ("" when none).

    ``data_path`` (where the same data lies), ``extra`` and a user model's
    recorded hash (checked on its own) never count.
    """
    changed = {
        f.name: (getattr(saved, f.name), getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name not in ignore
        and f.name not in ("data_path", "extra", "model_sha256", "model_files")
        and getattr(saved, f.name) != getattr(config, f.name)
    }  # fmt: skip
    return ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in changed.items())


def prepare_run(config, out: Path, resume: bool, *, overwrite=False, changeable=("epochs",)):
    """The configuration to train with.

    ``config`` for a new run in ``out``; for ``--resume`` the saved one, in
    which only the ``changeable`` fields may differ from ``config``. A new
    run needs a new or empty ``out`` (:func:`check_output_dir`); with
    ``overwrite``, an earlier elbolab run there loses the files elbolab wrote
    (:func:`clear_run`) and anything else in it stays.
    """
    out = Path(out)
    if resume and overwrite:
        raise RunError("--resume continues the run in --out and --overwrite replaces it: pick one")
    if is_elbolab_run(out) and not (out / CHECKPOINT).exists() and _lock_owner(out) is None:
        # Stopped before its first checkpoint: nothing to continue, and nothing to lose.
        if resume:
            raise RunError(
                f"{out} never completed an epoch (it has no {CHECKPOINT}), so there is nothing "
                "to resume; run the same command without --resume to start it"
            )
        clear_run(out)
        return config
    if resume:
        saved = read_config(out, type(config))
        detail = config_differences(saved, config, ignore=changeable)
        if detail:
            raise RunError(f"--resume keeps the run's configuration; differs in {detail}")
        for name in changeable:
            if getattr(config, name) is not None:  # None: left to the run (compile)
                setattr(saved, name, getattr(config, name))
        return saved
    if overwrite:
        clear_run(out)
        return config
    if is_elbolab_run(out):
        raise RunError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to replace "
            "it, or choose another --out"
        )
    check_output_dir(out)
    return config


# ---------------------------------------------------------------------------
# What elbolab may write, and remove
# ---------------------------------------------------------------------------

# Every file elbolab writes into a run directory (a test keeps this list complete).
RUN_FILES = frozenset({
    CONFIG, CHECKPOINT, METRICS, LOCK, "eval.json", "eval_datapoints.npz", "gaps.json", "gaps.png",
    "diagnose.json", "diagnose.nc", "diagnose_pairs.png", "diagnose_marginals.png",
    "rbm_eval.json", "rbm_eval.png",
    "bdmc.json", "bdmc.png", EVALS,
    "iwae_ladder.png", "training.png", "reconstructions.png", "samples.png",
})  # fmt: skip
# An output folder that is not a run (compare, experiment) carries this marker file.
FOLDER_MARKER = "elbolab.json"


def _is_temporary(name: str) -> bool:
    """A temporary file of :func:`atomic_write` that an interrupted write left behind."""
    return any(name.startswith(f".{known}.") for known in (*RUN_FILES, FOLDER_MARKER))


def is_elbolab_dir(path: Path, *, markers=(CONFIG, FOLDER_MARKER)) -> bool:
    """Whether elbolab wrote ``path``.

    That is a run whose config.json carries the marker, or an output folder
    with :data:`FOLDER_MARKER`.
    """
    path = Path(path)
    for name in markers:
        try:
            values = json.loads((path / name).read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(values, dict) and MARKER in values:
            return True
    return False


def is_elbolab_run(path: Path) -> bool:
    """Whether ``path`` is a run directory that elbolab wrote (config.json with the marker)."""
    return is_elbolab_dir(path, markers=(CONFIG,))


def _protected(path: Path) -> str | None:
    """Why ``path`` may never be an output directory, or None."""
    resolved = path.expanduser().resolve()
    checkout = Path(__file__).resolve().parents[1]
    if resolved == Path(resolved.anchor):
        return "the file system's root"
    if resolved == Path.home().resolve():
        return "your home directory"
    if resolved == checkout:
        return "elbolab's own checkout"
    return None


def check_output_dir(out: Path, *, ours_ok: bool = False) -> None:
    """Refuse an ``--out`` that elbolab may not write into.

    Allowed: a new or empty directory, and with ``ours_ok`` one that elbolab
    wrote (:func:`is_elbolab_dir`). Refused with one line: a file, the root,
    the home directory, elbolab's checkout, and any other non-empty folder.
    """
    out = Path(out)
    why = _protected(out)
    if why:
        raise RunError(f"--out {out} is {why}; choose a new directory for elbolab's files")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; choose a new directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if ours_ok and is_elbolab_dir(out):
        return
    shown = sorted(p.name for p in out.iterdir())
    listing = ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else "")
    kind = "an elbolab directory of another kind" if is_elbolab_dir(out) else "not elbolab's"
    raise RunError(
        f"--out {out} is not empty and {kind} (it holds {listing}); choose a new or empty directory"
    )


def mark_folder(out: Path, kind: str) -> None:
    """Make ``out`` an elbolab output folder (see :func:`check_output_dir`)."""
    check_output_dir(out, ours_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / FOLDER_MARKER).exists():
        write_json(out / FOLDER_MARKER, {"kind": kind, MARKER: __version__})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _lock_owner(out: Path) -> int | None:
    """The pid of a live process holding ``out``'s lock, or None."""
    try:
        pid = int((Path(out) / LOCK).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and pid != os.getpid() and _pid_alive(pid) else None


def check_unlocked(out: Path) -> None:
    """Raise :class:`RunError` when another live process trains into ``out``."""
    pid = _lock_owner(out)
    if pid is not None:
        raise RunError(
            f"{out} is being written by another elbolab process (pid {pid}); wait for it to "
            f"finish, or remove {Path(out) / LOCK} if that process is not elbolab"
        )


@contextmanager
def run_lock(out: Path):
    """Hold ``out/train.lock`` (our pid) while training; a stale lock (dead pid) is taken over."""
    path = Path(out) / LOCK
    check_unlocked(out)
    path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # another process won the race between the check and here
        check_unlocked(out)
        raise RunError(f"{out} is being written by another elbolab process") from None
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def clear_run(out: Path) -> list[str]:
    """Make ``out`` ready for a new run; returns the names removed.

    Nothing to do when it is new or empty, else :func:`remove_run_files`
    (an elbolab run only).
    """
    check_output_dir(out, ours_ok=True)
    if not Path(out).exists() or not any(Path(out).iterdir()):
        return []
    check_unlocked(out)
    return remove_run_files(out)


def remove_run_files(run_dir: Path) -> list[str]:
    """Delete the files elbolab wrote in a marked run directory; everything else stays.

    Returns the names removed. A directory without elbolab's marker is an error.
    """
    run_dir = Path(run_dir)
    why = _protected(run_dir)
    if why or not is_elbolab_run(run_dir):
        raise RunError(
            f"--overwrite: {run_dir} is {why or 'not an elbolab run directory'}; "
            "elbolab removes only files it wrote, in runs it marked"
        )
    removed = run_files_in(run_dir)
    for path in removed:
        path.unlink()
    evals = run_dir / EVALS
    if evals.is_dir() and not evals.is_symlink() and not any(evals.iterdir()):
        evals.rmdir()
    return [str(path.relative_to(run_dir)) for path in removed]


def run_files_in(run_dir: Path) -> list[Path]:
    """The files of ``run_dir`` that elbolab wrote (:data:`RUN_FILES` and temporaries)."""
    if not Path(run_dir).is_dir():
        return []
    files = [
        path
        for path in sorted(Path(run_dir).iterdir())
        if path.is_file()
        and not path.is_symlink()
        and (path.name in RUN_FILES or _is_temporary(path.name))
    ]
    evals = Path(run_dir) / EVALS
    if evals.is_dir() and not evals.is_symlink():  # named evaluations: reports, arrays, temporaries
        for path in sorted(evals.iterdir()):
            ours = path.suffix in (".json", ".npz") or path.name.startswith(".")
            if ours and path.is_file() and not path.is_symlink():
                files.append(path)
    return files


def rng_state(shuffle: torch.Generator, device: torch.device) -> dict:
    """Random states to checkpoint: global torch (and CUDA), and the shuffling generator."""
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, shuffle: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    shuffle.set_state(state["shuffle"])


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
    dataset = load_dataset(
        config.data, path=config.data_path, min_count=config.min_count, max_vocab=config.max_vocab
    )
    if user_model.is_reference(config.model):
        model = user_model.build_user_model(
            config.model, x_dim=dataset.x_dim, likelihood=dataset.likelihood,
            hidden=config.hidden, z_dim=config.z_dim, activation=config.activation,
        )  # fmt: skip
        check_per_datapoint(model.model, model.guide, dataset.split("train")[:2])
        return dataset, model
    try:
        model = _build_builtin(config, dataset)
    except ValueError as err:  # a combination the model cannot take, e.g. images for text
        raise RunError(f"--model {config.model} on {config.data}: {err}") from None
    return dataset, model


def _build_builtin(config: TrainConfig, dataset: Dataset) -> torch.nn.Module:
    return build_model(
        config.model,
        x_dim=dataset.x_dim,
        likelihood=dataset.likelihood,
        hidden=config.hidden,
        z_dim=config.z_dim,
        activation=config.activation if config.model != "linear-gaussian" else None,
        guide_type=config.guide_type,
        layers=config.layers,
        corruption=config.corruption,
        word_counts=dataset.word_counts if config.corruption else None,
    )


def load_run(run_dir: Path, *, device: str = "cpu") -> tuple[TrainConfig, Dataset, torch.nn.Module]:
    """Configuration, data set and trained model of a run directory.

    Examples
    --------
    >>> import tempfile
    >>> from inference import TrainConfig, load_run, train
    >>> out = tempfile.mkdtemp() + "/run"
    >>> _ = train(TrainConfig(epochs=1, hidden=[8], z_dim=2, batch_size=512), out, progress=False)
    >>> config, dataset, model = load_run(out)
    >>> config.epochs, dataset.name
    (1, 'digits')
    """
    config = read_config(run_dir)
    if user_model.is_reference(config.model):
        user_model.check_unchanged(config.model, config.model_sha256, run_dir=run_dir,
                                   recorded_files=config.model_files)  # fmt: skip
    state, identity = read_checkpoint(run_dir)
    dataset, model = build(config)
    load_weights(model, state["model"], run_dir)
    model.elbolab_checkpoint = identity  # what reports computed from this model record
    return config, dataset, model.to(device).eval()


def checkpoint_of(model) -> dict | None:
    """The checkpoint identity :func:`load_run` gave ``model`` (None for a model built here)."""
    return getattr(model, "elbolab_checkpoint", None)


def load_weights(model: torch.nn.Module, weights: dict, run_dir: Path) -> None:
    """``model.load_state_dict(weights)``, a mismatch named in one line."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else type(err).__name__
        raise RunError(
            f"{run_dir}: the checkpoint does not match the configured model ({detail})"
        ) from None
