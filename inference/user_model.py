"""Bring your own model: a factory ``path/to/file.py:make_model`` or ``package.module:make_model``.

The factory returns a ``torch.nn.Module`` (a ``PyroModule``, or a module
whose ``model`` and ``guide`` call ``pyro.module`` as Pyro's examples do)
with methods ``model(x)`` and ``guide(x)``. It is called with those of
``x_dim``, ``likelihood``, ``hidden``, ``z_dim`` and ``activation`` that its
signature names (all of them if it takes ``**kwargs``). A run records the
reference and the SHA-256 of the file that defines the factory and of the
user's own files that it imports (:func:`source_files`); a run whose code
has changed since is refused, and so is a reference into the run
directory itself, so that a shared run directory never brings code of its own.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import sys
import sysconfig
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


def _environment_roots() -> list[Path]:
    """Where the environment's own code lies: the standard library, packages, elbolab.

    Code anywhere else is the user's and is covered by a model's hash.
    """
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    here = Path(__file__).resolve().parents[1]
    roots |= {str(here / "inference"), str(here / "ppl_models")}
    return [Path(r).resolve() for r in roots]


def _imported_names(path: Path, package: str | None) -> list[str]:
    """The modules that the source of ``path`` imports, read from it, not run.

    Absolute names; relative imports are resolved against ``package``.
    """
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if not package:
                    continue
                parts = package.split(".")
                if node.level > len(parts) + 1:
                    continue
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return [n for n in names if n]


def _origin(name: str) -> tuple[Path, str | None] | None:
    """The source file of module ``name`` and the package its relative imports start from."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None or not spec.origin or not spec.has_location:
        return None
    origin = Path(spec.origin)
    if origin.suffix != ".py" or not origin.is_file():
        return None
    package = name if spec.submodule_search_locations is not None else name.rpartition(".")[0]
    return origin, package


def source_files(reference: str) -> list[Path]:
    """The factory's file and every file of the user's that it imports, directly or not.

    Imports are read from the source (``import helpers``, ``from .nets import
    Encoder``); modules of the standard library, of installed packages and of
    elbolab are the environment's and left out. An import made at run time
    (``importlib.import_module`` with a computed name) is not seen.
    """
    first = source_file(reference)
    if first is None or not first.is_file():
        return []
    target, _ = _split(reference)
    roots = _environment_roots()
    package = None if target.endswith(".py") else (_origin(target) or (None, None))[1]
    seen: dict[Path, None] = {first.resolve(): None}
    queue = [(first, package)]
    while queue:
        path, package = queue.pop()
        for name in _imported_names(path, package):
            found = _origin(name)
            if found is None:
                continue
            origin = found[0].resolve()
            if origin in seen or any(origin.is_relative_to(root) for root in roots):
                continue
            seen[origin] = None
            queue.append((origin, found[1]))
    return list(seen)


def file_digests(reference: str) -> dict[str, str]:
    """SHA-256 of each of :func:`source_files`, by path."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in source_files(reference)}


def digest(reference: str) -> str | None:
    """One SHA-256 over the factory's file and the user's files it imports (:func:`source_files`).

    A factory that imports none of the user's files keeps the hash of its file alone.
    """
    files = file_digests(reference)
    if not files:
        return None
    if len(files) == 1:
        return next(iter(files.values()))
    joined = "\n".join(f"{Path(p).name}:{h}" for p, h in sorted(files.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


def check_unchanged(
    reference: str,
    recorded: str | None,
    *,
    run_dir: Path | None = None,
    recorded_files: dict[str, str] | None = None,
) -> None:
    """Refuse a model file inside ``run_dir``, or model code whose SHA-256 is not ``recorded``.

    ``recorded_files`` (each file's hash, as :func:`file_digests` gave them at
    training) names the file that changed.
    """
    path = source_file(reference)
    if run_dir is not None:
        for each in [path, *source_files(reference)]:
            if each is not None and Path(each).resolve().is_relative_to(Path(run_dir).resolve()):
                raise ModelError(
                    f"{run_dir}: its model file {each} lies inside the run directory; elbolab runs "
                    "no code that comes with a run"
                )
    if recorded is None:
        return
    now = digest(reference)
    if now == recorded:
        return
    if recorded_files is None and path is not None and path.is_file():
        # A run trained before imports were hashed recorded the factory's file alone.
        if hashlib.sha256(path.read_bytes()).hexdigest() == recorded:
            return
    changed = [str(path)]
    if recorded_files:
        current = file_digests(reference)
        changed = [f for f in sorted(set(recorded_files) | set(current))
                   if recorded_files.get(f) != current.get(f)] or changed  # fmt: skip
    what = "the model file" if changed == [str(path)] else "the model's code"
    raise ModelError(
        f"{what} has changed since the run was trained ({', '.join(changed)}; SHA-256 "
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
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)  # fmt: skip
    needed = [name for name, p in params.items() if name not in kwargs
              and p.default is inspect.Parameter.empty and p.kind in kinds]  # fmt: skip
    if needed:
        given = ", ".join(kwargs) or "nothing"
        raise ModelError(
            f"--model {reference}: the factory needs {', '.join(needed)}, which elbolab cannot "
            f"give (it passes {given}, of {', '.join(OPTIONS)}); give it a default"
        )
    try:
        model = factory(**kwargs)
    except Exception as err:  # the factory's own error: one line, --debug shows the traceback
        raise ModelError(
            f"--model {reference}: the factory raised {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else '(no message)'}"
        ) from err
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
