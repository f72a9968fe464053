"""Evaluations of a run, each under a name of its own, each report one unit with its arrays.

``elbolab evaluate`` writes ``evals/NAME.json`` (the report) and
``evals/NAME.<sha>.npz`` (its per-datapoint arrays), and copies the report
to ``eval.json`` (the latest evaluation, for a quick look). The name is given
(``--name``) or derived from the settings (:func:`evaluation_name`), so an
evaluation of 20 datapoints never replaces one of the whole split.

A report and its arrays are always both old or both new, whenever the writer
stops (kill -9 included): the arrays file is named by its SHA-256 and
written first, under a new name; the report that names it (and its hash) is
then renamed into place; the arrays the old report named are removed last,
once nothing names them. A reader opens the file the report names, and
checks its hash.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import provenance
from ..runs import RunError, atomic_write, write_json

EVAL = "eval.json"
EVALS = "evals"
LEGACY_DATAPOINTS = (
    "eval_datapoints.npz"  # written beside eval.json by elbolab before named evaluations
)
ORPHAN_AGE = 600.0  # seconds after which an arrays file no report names is removed
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Called after each step of a write with the step's name (a test stops the writer there).
_on_step: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _on_step is not None:
        _on_step(name)


def check_name(name: str) -> str:
    """``name`` if it can name an evaluation (letters, digits, ``.``, ``_``, ``-``; up to 64)."""
    if not _NAME.fullmatch(name) or name.endswith(".npz"):
        raise RunError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, starting with "
            "a letter or digit)"
        )
    return name


def evaluation_name(
    split: str, *, count: int, every: int, limit: int | None, k: int, ais: dict | None
) -> str:
    """The name an evaluation gets from its settings: ``test-k1000``, ``test-first20-k10``, ..."""
    parts = [split]
    if limit is not None:
        parts.append(f"first{count}")
    if every > 1:
        parts.append(f"every{every}")
    parts.append(f"k{k}")
    if ais is not None:
        t = ais.get("num_temperatures")
        parts.append("ais-adaptive" if ais.get("schedule") == "adaptive" else f"ais{t}")
    return check_name("-".join(parts))


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as a compressed .npz, byte for byte the same for the same arrays.

    (numpy's own savez stamps each member with the time of writing.)
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()


def write_evaluation(run_dir: Path, name: str, report: dict, arrays: dict) -> dict:
    """Write an evaluation as one unit (see the module's notes); returns the report as written."""
    run_dir, folder = Path(run_dir), Path(run_dir) / EVALS
    before = _named_files(run_dir)
    data = _npz_bytes(arrays)
    digest = provenance.bytes_sha256(data)
    arrays_name = f"{name}.{digest[:16]}.npz"
    report = {**report, "name": name, "datapoints_file": f"{EVALS}/{arrays_name}",
              "datapoints_file_sha256": digest}  # fmt: skip
    atomic_write(folder / arrays_name, lambda tmp: tmp.write_bytes(data))
    _step("arrays")
    write_json(folder / f"{name}.json", report)
    _step("report")
    write_json(run_dir / EVAL, report)
    _step("latest")
    _collect(run_dir, superseded=before)
    _step("collected")
    return report


def _named_files(run_dir: Path) -> set[str]:
    """The arrays files that some report of ``run_dir`` names."""
    named = set()
    for path in [Path(run_dir) / EVAL, *sorted((Path(run_dir) / EVALS).glob("*.json"))]:
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(values, dict) and isinstance(values.get("datapoints_file"), str):
            named.add(Path(values["datapoints_file"]).name)
    return named


def _collect(run_dir: Path, *, superseded: set[str] = frozenset()) -> None:
    """Remove the arrays files that no report names.

    At once those in ``superseded`` (named by the reports this write
    replaced); others (a writer in another process may not have named its
    file yet) and temporaries of killed writers once older than
    :data:`ORPHAN_AGE`.
    """
    named = _named_files(run_dir)
    now = time.time()
    folder = Path(run_dir) / EVALS
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name in named or not path.is_file():
            continue
        if path.name in superseded:
            path.unlink(missing_ok=True)
        elif (path.suffix == ".npz" or path.name.startswith(".")) and (
            now - path.stat().st_mtime > ORPHAN_AGE
        ):
            path.unlink(missing_ok=True)
    legacy = Path(run_dir) / LEGACY_DATAPOINTS
    latest = _load_json(Path(run_dir) / EVAL, quiet=True)
    if legacy.exists() and isinstance(latest, dict) and "datapoints_file" in latest:
        legacy.unlink(missing_ok=True)  # the report it belonged to is gone


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

_ENTRY_KEYS = ("mean", "stderr")


def _load_json(path: Path, *, quiet: bool = False):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        if quiet:
            return None
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise RunError(f"{path} is damaged ({detail}); evaluate the run again") from None


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_report(report, path: Path) -> dict:
    """``report`` if it has what the commands read from an evaluation, else one-line RunError."""
    problem = None
    if not isinstance(report, dict):
        problem = f"a JSON {type(report).__name__}, not an evaluation report"
    elif not isinstance(report.get("split"), str) or not _number(report.get("num_datapoints")):
        problem = "no split or number of datapoints"
    else:
        entries = {"elbo": report.get("elbo"), "log_px": report.get("log_px")}
        iwae = report.get("iwae")
        if not isinstance(iwae, dict):
            problem = "'iwae' is not a table of bounds"
        else:
            entries.update({f"iwae {k}": v for k, v in iwae.items()})
            for key, entry in entries.items():
                if not isinstance(entry, dict) or not all(
                    _number(entry.get(f)) for f in _ENTRY_KEYS
                ):
                    problem = f"{key!r} is not a bound with a mean and a standard error"
                    break
    if problem:
        raise RunError(f"{path} is damaged: {problem}; evaluate the run again")
    return report


def read_report(path: Path) -> dict:
    """One evaluation report, checked (:func:`check_report`)."""
    return check_report(_load_json(Path(path)), Path(path))


def evaluations(run_dir: Path) -> dict[str, dict]:
    """Every readable evaluation of ``run_dir`` by name, oldest first.

    A damaged report is left out with a warning that names it (a run keeps
    its other evaluations); when none is left, the damage is the error. A run
    evaluated only by an older elbolab has its ``eval.json`` under the name
    ``eval`` (no provenance: :func:`inference.provenance.stale` says so).
    """
    run_dir = Path(run_dir)
    folder = run_dir / EVALS
    found, damaged = {}, []
    paths = (
        sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    )
    for path in paths:
        if path.is_file() and not path.name.startswith("."):
            try:
                found[path.stem] = read_report(path)
            except RunError as err:
                damaged.append(str(err))
    if not found and not damaged and (run_dir / EVAL).is_file():
        report = read_report(run_dir / EVAL)
        found[report.get("name", "eval")] = report
    if not found and damaged:
        raise RunError(damaged[0])
    if not found:
        raise RunError(f"{run_dir} has no evaluation: run elbolab evaluate {run_dir} first")
    for problem in damaged:
        warnings.warn(f"{problem}; that evaluation is left out", stacklevel=2)
    return found


def read_arrays(run_dir: Path, report: dict) -> dict[str, np.ndarray]:
    """The per-datapoint arrays of ``report``: the file it names, its hash checked.

    Each array holds one number per datapoint; a damaged or foreign file is a
    one-line RunError.
    """
    run_dir = Path(run_dir)
    named = report.get("datapoints_file")
    path = run_dir / named if isinstance(named, str) else run_dir / LEGACY_DATAPOINTS
    if isinstance(named, str) and (Path(named).is_absolute() or ".." in Path(named).parts):
        raise RunError(f"{run_dir}: a report names {named!r}, outside the run; evaluate again")
    if not path.is_file():
        raise RunError(f"{path} is missing: the report's per-datapoint values; evaluate again")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunError(f"cannot read {path}: {err.strerror or err}") from None
    expected = report.get("datapoints_file_sha256")
    if expected is not None and provenance.bytes_sha256(data) != expected:
        raise RunError(f"{path} is not the file its report names (hash differs); evaluate again")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as err:  # a damaged zip, object arrays, a wrong header: one line
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise RunError(f"{path} is damaged ({detail}); evaluate the run again") from None
    n = int(report["num_datapoints"])
    for key, value in arrays.items():
        if value.dtype.kind not in "fiub" or value.shape[:1] != (n,):
            raise RunError(
                f"{path}: {key!r} is not one number per datapoint ({value.dtype}, "
                f"shape {value.shape}, {n} datapoints); evaluate the run again"
            )
    return arrays


def headline_key(report: dict) -> str:
    """The array of per-datapoint log p(x) estimates behind the report's headline."""
    if "ais" in report:
        return "ais"
    return f"iwae{report['log_px'].get('k', '')}"


def paired_difference(a: np.ndarray, b: np.ndarray, mc_a: float, mc_b: float) -> dict:
    """mean(a - b) over the same datapoints, with its paired s.e. and its Monte Carlo s.e.

    The paired s.e. is the std of the differences / sqrt(N) (over datapoints);
    the Monte Carlo s.e. is that of the two averages, ``mc_a`` and ``mc_b``.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    return {
        "mean": float(d.mean()),
        "paired_stderr": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf,
        "mc_stderr": float(math.hypot(mc_a, mc_b)),
        "num_datapoints": int(n),
    }
