"""The one table writer behind every command's printed report."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence


def _width(spec: str) -> str:
    """The alignment and width of a format spec (``">12.3f"`` -> ``">12"``)."""
    return re.match(r"[<>^]?\d*", spec).group(0)


def table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence]) -> list[str]:
    """A fixed-width table as lines: the header, then one line per row.

    Parameters
    ----------
    columns : sequence of (title, format spec)
        For example ``("nats", ">12.3f")``. Titles and string cells take the
        spec's alignment and width only; numbers take the whole spec.
    rows : iterable of sequences
        One cell per column.
    """
    lines = ["".join(f"{title:{_width(spec)}}" for title, spec in columns)]
    for row in rows:
        cells = []
        for value, (_, spec) in zip(row, columns, strict=True):
            cells.append(f"{value:{_width(spec) if isinstance(value, str) else spec}}")
        lines.append("".join(cells))
    return lines


def bound_table(
    entries: dict[str, dict], *, title: str = "bound", widths: tuple[int, int, int] = (14, 12, 10)
) -> list[str]:
    """Rows ``name, mean, stderr`` of report entries ``{"mean": .., "stderr": ..}``.

    The errors are Monte Carlo ones (:meth:`~inference.bounds.Bound.summary`).
    """
    name, nats, err = widths
    columns = [(title, f"<{name}"), ("nats", f">{nats}.3f"), ("MC s.e.", f">{err}.3f")]
    return table(columns, ((k, v["mean"], v["stderr"]) for k, v in entries.items()))


def plus_minus(entry: dict, *, digits: int = 3) -> str:
    """``"mean +- stderr"`` of a report entry; ``n/a`` when the mean is not a number."""
    if math.isnan(entry["mean"]):
        return "n/a"
    return f"{entry['mean']:.{digits}f} +- {entry['stderr']:.{digits}f}"
