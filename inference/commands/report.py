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
    """Rows ``name, mean, MC s.e.`` of report entries ``{"mean": .., "stderr": ..}``.

    ``stderr`` is the Monte Carlo error (:meth:`~inference.bounds.Bound.summary`);
    where every entry also has ``datapoint_stderr`` (the error over datapoints)
    it gets a column of its own.
    """
    name, nats, err = widths
    columns = [(title, f"<{name}"), ("nats", f">{nats}.3f"), ("MC s.e.", f">{err}.3f")]
    both = all("datapoint_stderr" in v for v in entries.values())
    if both:
        columns.append(("data s.e.", f">{err + 1}.3f"))
    return table(columns, ((k, v["mean"], v["stderr"], *([v["datapoint_stderr"]] if both else []))
                           for k, v in entries.items()))  # fmt: skip


def plus_minus(entry: dict, *, digits: int = 3) -> str:
    """``"mean +- stderr"`` of a report entry; ``n/a`` when the mean is not a number."""
    if math.isnan(entry["mean"]):
        return "n/a"
    return f"{entry['mean']:.{digits}f} +- {entry['stderr']:.{digits}f}"
