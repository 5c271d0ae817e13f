"""Sweep-level figures (matplotlib, Agg backend): the Pareto front and score against prompt count."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Row = dict[str, Any]


def _has(row: Row, *keys: str) -> bool:
    return all(isinstance(row.get(k), (int, float)) for k in keys)


def plot_front(rows: Sequence[Row], front: Sequence[Row], path: str | Path, x: str = "additional_gmacs", y: str = "val_score",
               y_label: str | None = None) -> Path:
    """Every finished trial as a point, the front as a highlighted step line; writes a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    pts = [r for r in rows if _has(r, x, y)]
    ax.scatter([r[x] for r in pts], [r[y] for r in pts], s=22, color="0.6", label="trials")
    fr = sorted((r for r in front if _has(r, x, y)), key=lambda r: r[x])
    if fr:
        ax.step([r[x] for r in fr], [r[y] for r in fr], where="post", color="tab:red", lw=1.2)
        ax.scatter([r[x] for r in fr], [r[y] for r in fr], s=40, color="tab:red", label="Pareto front", zorder=3)
        for r in fr:
            ax.annotate(f"p={r.get('num_prompts', '-')} r={r.get('rank', '-')} d={r.get('depth', '-')}", (r[x], r[y]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("additional GMACs (1 multiply-add = 1 FLOP)" if x == "additional_gmacs" else x)
    ax.set_ylabel(y_label or _label(y))
    ax.set_title("accuracy vs additional computation")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _label(y: str) -> str:
    return "validation score" if y == "val_score" else y


def plot_score_vs_prompts(rows: Sequence[Row], path: str | Path, y: str = "val_score", y_label: str | None = None) -> Path:
    """Validation score against prompt count (log axis): one line per method (mean over repeats) when the sweep
    compares methods, else points coloured by depth; writes a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    pts = [r for r in rows if _has(r, "num_prompts", y)]
    methods = sorted({str(r.get("method")) for r in pts})
    if len(methods) > 1:
        for method in methods:
            by_p: dict[float, list[float]] = {}
            for r in pts:
                if str(r.get("method")) == method:
                    by_p.setdefault(r["num_prompts"], []).append(r[y])
            xs = sorted(by_p)
            ax.plot(xs, [sum(by_p[x]) / len(by_p[x]) for x in xs], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    elif pts:
        depth = [r.get("depth") if isinstance(r.get("depth"), (int, float)) else 0 for r in pts]
        sc = ax.scatter([r["num_prompts"] for r in pts], [r[y] for r in pts], c=depth, cmap="viridis", s=28)
        if any(depth):
            fig.colorbar(sc, ax=ax, label="depth (layers with prompts)")
        ax.set_xscale("log", base=2)
    ax.set_xlabel("prompts per site (p)")
    ax.set_ylabel(y_label or _label(y))
    ax.set_title("score vs prompt count")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
