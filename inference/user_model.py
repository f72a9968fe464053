"""Bring your own model: a factory ``path/to/file.py:make_model`` or ``package.module:make_model``.

The factory returns a ``torch.nn.Module`` (a ``PyroModule``, or a module
whose ``model`` and ``guide`` call ``pyro.module`` as Pyro's examples do)
with methods ``model(x)`` and ``guide(x)``. It is called with those of
``x_dim``, ``likelihood``, ``hidden``, ``z_dim`` and ``activation`` that its
signature names (all of them if it takes ``**kwargs``). A run records the
reference and the SHA-256 of the file that defines the factory; a run whose
file has changed since is refused, and so is a reference into the run
directory itself, so that a shared run directory never brings code of its own.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import torch

OPTIONS = ("x_dim", "likelihood", "hidden", "z_dim", "activation")


class ModelError(ValueError):
    """A user model reference that cannot be used; the message says why."""


def is_reference(name: str) -> bool:
    """Whether ``name`` names a factory (``FILE.py:NAME`` or ``MODULE:NAME``), not a built-in."""
    return ":" in name


def _split(reference: str) -> tuple[str, str]:
    target, _, attr = reference.rpartition(":")
    if not target or not attr.isidentifier():
        raise ModelError(
            f"--model {reference!r}: expected FILE.py:FACTORY or MODULE:FACTORY "
            "(for example models/vae.py:make_model)"
        )
    return target, attr


def resolve(reference: str) -> str:
    """The reference with a file path made absolute, so that the run works from anywhere."""
    target, attr = _split(reference)
    if target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{attr}"
    return reference


def _module(target: str):
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"--model: no such file {path}")
        name = f"_elbolab_user_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise ModelError(
                f"--model: importing {path} failed: {type(err).__name__}: {err}"
            ) from err
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as ``python -m`` would, for a package here
    try:
        return importlib.import_module(target)
    except Exception as err:
        raise ModelError(
            f"--model: importing {target} failed: {type(err).__name__}: {err}"
        ) from err


def source_file(reference: str) -> Path | None:
    """The file that defines the factory (None for a module without one)."""
    target, _ = _split(reference)
    if target.endswith(".py"):
        return Path(target)
    spec = importlib.util.find_spec(target)
    return Path(spec.origin) if spec is not None and spec.origin else None


def digest(reference: str) -> str | None:
    """SHA-256 of the factory's source file."""
    path = source_file(reference)
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_unchanged(reference: str, recorded: str | None, *, run_dir: Path | None = None) -> None:
    """Refuse a model file inside ``run_dir``, or one whose SHA-256 is not ``recorded``."""
    path = source_file(reference)
    if run_dir is not None and path is not None:
        inside = Path(path).resolve().is_relative_to(Path(run_dir).resolve())
        if inside:
            raise ModelError(
                f"{run_dir}: its model file {path} lies inside the run directory; elbolab runs "
                "no code that comes with a run"
            )
    now = digest(reference)
    if recorded is not None and now != recorded:
        raise ModelError(
            f"the model file {path} has changed since the run was trained (SHA-256 "
            f"{recorded[:12]}... then, {str(now)[:12]}... now); restore it or train again"
        )


def load_object(reference: str) -> Callable:
    """The callable a ``FILE.py:NAME`` or ``MODULE:NAME`` reference names."""
    target, attr = _split(reference)
    obj = getattr(_module(target), attr, None)
    if not callable(obj):
        raise ModelError(f"--model: {target} defines no callable {attr!r}")
    return obj


def build_user_model(reference: str, **options) -> torch.nn.Module:
    """Call the factory with the ``options`` its signature accepts; check what it returns."""
    factory = load_object(reference)
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in options.items() if k in OPTIONS and (takes_all or k in params)}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("x_dim", "likelihood")}
    model = factory(**kwargs)
    missing = [m for m in ("model", "guide") if not callable(getattr(model, m, None))]
    if not isinstance(model, torch.nn.Module) or missing:
        raise ModelError(
            f"--model: {reference} returned {type(model).__name__}, not a torch.nn.Module with "
            "model(x) and guide(x) methods"
        )
    return model


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (or ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
