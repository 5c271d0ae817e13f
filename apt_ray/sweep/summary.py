"""A sweep's trials as rows (read back from their MLflow child runs), their Pareto front, and the summary logged on the
parent run: tables, figures and counts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from apt_ray.tasks import SCORE_KEY, read_metric
from apt_ray.tracking.mlflow import STATUS_TAG, TRIAL_TAG

Row = dict[str, Any]
TRAINED = ("finished", "stopped_early")
KNOBS = ("method", "num_prompts", "rank", "depth", "placement", "lr", "seed", "epochs", "workers")
METRICS = (SCORE_KEY, "additional_gmacs", "updated_params", "train_loss", "samples_per_s", "step_time_ms")


def _value(text: str | None) -> Any:
    if text is None or text == "None":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def row_of(run: Any) -> Row:
    """One trial as a flat row: id, status, knobs, last metrics, run id."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    row: Row = {"trial": tags.get(TRIAL_TAG, run.info.run_name), "status": tags.get(STATUS_TAG, "unknown"),
                "run_status": run.info.status, "run_id": run.info.run_id, "start_time": run.info.start_time or 0}
    row.update({k: _value(params.get(k)) for k in KNOBS})
    row.update({k: read_metric(metrics, k) for k in METRICS})  # runs of older versions: val_score under its old name
    if tags.get("failure_reason"):
        row["reason"] = tags["failure_reason"]
    return row


def counts(rows: list[Row]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


# -- the Pareto front -------------------------------------------------------------------

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


def front_of(rows: list[Row], metrics: list[str], modes: list[str]) -> list[Row]:
    """The Pareto front of the trained trials."""
    return pareto_front([r for r in rows if r["status"] in TRAINED], metrics, modes)


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


# -- the parent run's summary ----------------------------------------------------------------

def log_summary(writer: Any, parent: str, rows: list[Row], front: list[Row], figures_dir: Path) -> list[Path]:
    """Trials and front tables, the figures (those of ``apt_ray.analysis.plots``) and count metrics on the parent run
    (key ``parent`` of ``writer``); returns the figure paths."""
    import matplotlib

    matplotlib.use("Agg")  # the driver draws into files only
    import matplotlib.pyplot as plt
    import pandas as pd

    from apt_ray.analysis import plots

    writer.table(parent, rows, "trials.json")
    writer.table(parent, front, "pareto_front.json")
    trained = pd.DataFrame([r for r in rows if r["status"] in TRAINED], columns=[*KNOBS, *METRICS])
    drawn = {"pareto_front.png": plots.pareto(trained, pd.DataFrame(front, columns=trained.columns)),
             "score_vs_prompts.png": plots.score_by_knob(trained) or plots.score_vs_prompts(trained)}
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, fig in drawn.items():
        fig.savefig(figures_dir / name)
        plt.close(fig)
        writer.file(parent, figures_dir / name, "figures")
        figures.append(figures_dir / name)
    scores = trained[SCORE_KEY].dropna()
    summary: dict[str, Any] = {f"trials_{k}": v for k, v in counts(rows).items()}
    summary.update({"trials_total": len(rows), "pareto_size": len(front)})
    if len(scores):
        summary[f"best_{SCORE_KEY}"] = float(scores.max())
    writer.metrics(parent, summary)
    return figures
