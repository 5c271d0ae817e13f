"""Pareto front of finished trials over the study's objectives, and its text table."""

from __future__ import annotations

import math
from typing import Any, Sequence

Row = dict[str, Any]


def _finite(row: Row, metrics: Sequence[str]) -> bool:
    values = [row.get(m) for m in metrics]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def dominates(a: Row, b: Row, metrics: Sequence[str], modes: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    better = False
    for m, mode in zip(metrics, modes):
        x, y = (a[m], b[m]) if mode == "max" else (-a[m], -b[m])
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_front(rows: Sequence[Row], metrics: Sequence[str], modes: Sequence[str]) -> list[Row]:
    """Rows no other row dominates (rows missing an objective are left out), sorted by the first objective, best first."""
    if len(metrics) != len(modes) or not metrics:
        raise ValueError("need one mode per metric and at least one metric")
    candidates = [r for r in rows if _finite(r, metrics)]
    front = [r for r in candidates if not any(dominates(o, r, metrics, modes) for o in candidates if o is not r)]
    sign = -1 if modes[0] == "max" else 1
    return sorted(front, key=lambda r: (sign * r[metrics[0]], *(r[m] if md == "min" else -r[m] for m, md in zip(metrics[1:], modes[1:]))))


COLUMNS = (
    ("trial", "trial", "{}"),
    ("p", "num_prompts", "{}"),
    ("r", "rank", "{}"),
    ("depth", "depth", "{}"),
    ("placement", "placement", "{}"),
    ("lr", "lr", "{:.2e}"),
    ("val score", "val_score", "{:.2f}"),
    ("+GMACs", "additional_gmacs", "{:.4f}"),
)


def _cell(row: Row, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(rows: Sequence[Row], columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    """A plain-text table of ``rows`` with right-aligned columns."""
    cells = [[title for title, _, _ in columns]] + [[_cell(r, key, fmt) for _, key, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
