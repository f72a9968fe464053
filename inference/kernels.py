"""Compiled C kernels: matrix products with a mostly-zero factor (an RBM's binary units).

The products of a PCD/CD update multiply binary matrices: the data, the
chains' visible samples. On binarized MNIST 13% of the entries are ones, so a
product that visits only the nonzeros does about an eighth of a dense
product's multiply-adds. Torch's sparse formats do not pay off at these sizes
(converting a 100 x 784 batch costs as much as the product), so the two
products an update needs are written in C (``csrc/sparse_products.c``):

- :func:`sparse_times_dense`: ``bias + a @ w``, the hidden units' input;
- :func:`sparse_outer_add`: ``w <- beta w + alpha1 a1.T @ p1 + alpha2 a2.T @ p2``,
  both phases of the contrastive statistics added into ``w`` in one pass.

The library is built on first use with the machine's C compiler (``$CC``,
else ``cc`` or ``gcc``; the one torch's inductor uses), ``-O3 -march=native``
and OpenMP when torch runs on GNU OpenMP (the process then shares torch's
thread pool), and kept under ``$XDG_CACHE_HOME/elbolab/kernels`` (default
``~/.cache``) with a name that hashes the source, the compiler, its flags and
the CPU: a build takes about 0.2 s, once per machine. Nothing is loaded that
this user did not build: the cache folder must be the user's own and closed
to others (else a private folder of the process's own is used), and a
library is loaded only when its SHA-256 matches the one recorded when it was
built (a truncated or replaced library is built again). Where no compiler works,
:func:`available` is False, :func:`unavailable_reason` says why, and callers
use torch's dense products.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "sparse_products.c"
_library: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False
_fallback: Path | None = None  # this process's own cache when the user's is unusable


def cpu_fields() -> dict[str, str]:
    """The first core's fields of /proc/cpuinfo (every core reports the same); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_signature() -> str:
    """The CPU model and flags, where the OS gives them (-march=native depends on them)."""
    fields = cpu_fields()
    if not fields:
        return platform.processor() or platform.machine()
    return " ".join(fields.get(key, "") for key in ("model name", "flags", "Features"))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class CacheError(OSError):
    """A cache folder or library that this user may not trust; the message says why."""


def _private_dir(path: Path) -> Path:
    """``path`` created with mode 0700, or checked: a real folder, ours, nobody else may write.

    A folder another user owns, or one that group or others can write into,
    could hold a library planted there; it is refused, never used.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise CacheError(f"{path} is not a folder")
    if info.st_uid != os.getuid():
        raise CacheError(f"{path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & 0o022:
        raise CacheError(f"{path} can be written by other users (mode {info.st_mode & 0o777:o})")
    return path


def _cache_dir() -> Path:
    """``$XDG_CACHE_HOME/elbolab/kernels`` (default ``~/.cache``), private to this user.

    Where that cannot be used, a new folder of this process's own (random name,
    mode 0700) under the temporary directory: the kernels are then built
    again by each process (0.2 s), and no name another user could predict,
    and create first, is ever used.
    """
    global _fallback
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    try:
        path = _private_dir(Path(base) / "elbolab" / "kernels")
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    if _fallback is None or not _fallback.is_dir():
        _fallback = Path(tempfile.mkdtemp(prefix="elbolab-kernels-"))  # mode 0700, random
    return _fallback


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path) -> bool:
    """Whether ``target`` is the library this user built.

    That is a plain file of ours whose SHA-256 matches the one recorded beside
    it when it was built (a truncated or replaced library fails, and is built
    again).
    """
    record = target.with_name(target.name + ".sha256")
    try:
        info = os.lstat(target)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return False
        return record.read_text().strip() == _sha256(target)
    except OSError:
        return False


def _install(partial: Path, target: Path) -> None:
    """Move a freshly built library into place, with its SHA-256 recorded first."""
    record = target.with_name(target.name + ".sha256")
    record_tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    record_tmp.write_text(_sha256(partial) + "\n")
    os.replace(record_tmp, record)
    os.replace(partial, target)


def _uses_gnu_openmp() -> bool:
    """Whether torch's threads are GNU OpenMP's, so that our OpenMP code shares its pool."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libgomp" in maps and "OpenMP" in torch.__config__.parallel_info()


def _build() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler found ($CC, cc or gcc)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    source = SOURCE.read_bytes()
    attempts = [["-march=native"], []]  # -march=native is unknown to some compilers/targets
    if _uses_gnu_openmp():
        attempts = [["-fopenmp", *flags] for flags in attempts] + attempts
    errors = []
    for flags in attempts:
        command = [compiler, "-O3", "-shared", "-fPIC", *flags]
        parts = [source, version.encode(), " ".join(command).encode(), _cpu_signature().encode()]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
        target = _cache_dir() / f"sparse_products-{key}.so"
        if not _verified(target):
            # Built under a temporary name and renamed: processes that build at once
            # (torchrun ranks) never load a half-written library; a damaged one is replaced.
            partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            done = subprocess.run([*command, "-o", str(partial), str(SOURCE)],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                partial.unlink(missing_ok=True)
                errors.append(f"{' '.join(command)}: {done.stderr.strip()[-300:]}")
                continue
            _install(partial, target)
            if not _verified(target):  # another process replaced it in between
                raise CacheError(f"{target} changed while it was installed")
        library = ctypes.CDLL(str(target))
        pointer, size, real = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
        library.sparse_times_dense.argtypes = [pointer, size, size, pointer, size, pointer, pointer]
        library.sparse_times_dense.restype = ctypes.c_int
        library.sparse_outer_add.argtypes = [pointer, size, size, real, pointer, pointer, real,
                                             size, pointer, pointer, real, size]  # fmt: skip
        library.sparse_outer_add.restype = ctypes.c_int
        return library
    raise OSError("the C compiler failed: " + "; ".join(errors))


def _load() -> ctypes.CDLL | None:
    global _library, _reason, _loaded
    if not _loaded:
        _loaded = True
        try:
            _library = _build()
        except OSError as error:
            _reason = str(error)
    return _library


def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _reason


def _check(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        raise ValueError(f"{name} must be float32 on the CPU, not {tensor.dtype}, {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")


def _library_or_raise() -> ctypes.CDLL:
    library = _load()
    if library is None:
        raise RuntimeError(f"the sparse-product kernels are not available: {_reason}")
    return library


def sparse_times_dense(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``bias + a @ w`` for ``a`` (n, d) mostly zero, ``w`` (d, h), ``bias`` (h,): float32, CPU.

    Costs about nnz(a) * h multiply-adds; equal to ``torch.addmm(bias, a, w)``
    to float rounding, and the same for any number of threads.
    """
    library = _library_or_raise()
    n, d = a.shape
    h = w.shape[1]
    _check("a", a, (n, d))
    _check("w", w, (d, h))
    _check("bias", bias, (h,))
    out = torch.empty(n, h)
    if not library.sparse_times_dense(a.data_ptr(), n, d, w.data_ptr(), h, bias.data_ptr(),
                                      out.data_ptr()):  # fmt: skip
        raise MemoryError("sparse_times_dense: out of memory")
    return out


def sparse_outer_add(
    w: torch.Tensor,
    a1: torch.Tensor,
    p1: torch.Tensor,
    a2: torch.Tensor,
    p2: torch.Tensor,
    *,
    beta: float = 1.0,
    alpha1: float = 1.0,
    alpha2: float = 1.0,
) -> torch.Tensor:
    """``w <- beta w + alpha1 a1.T @ p1 + alpha2 a2.T @ p2`` in place, ``a1``, ``a2`` mostly zero.

    ``w`` (d, h), ``a1`` (n1, d), ``p1`` (n1, h), ``a2`` (n2, d), ``p2`` (n2, h),
    float32, CPU. Equal to ``w.mul_(beta).addmm_(a1.T, p1, alpha=alpha1)
    .addmm_(a2.T, p2, alpha=alpha2)`` to float rounding (``beta`` multiplies
    ``w`` even when 0). Returns ``w``.
    """
    library = _library_or_raise()
    d, h = w.shape
    n1, n2 = a1.shape[0], a2.shape[0]
    _check("w", w, (d, h))
    _check("a1", a1, (n1, d))
    _check("p1", p1, (n1, h))
    _check("a2", a2, (n2, d))
    _check("p2", p2, (n2, h))
    if not library.sparse_outer_add(w.data_ptr(), d, h, beta, a1.data_ptr(), p1.data_ptr(), alpha1,
                                    n1, a2.data_ptr(), p2.data_ptr(), alpha2, n2):  # fmt: skip
        raise MemoryError("sparse_outer_add: out of memory")
    return w
