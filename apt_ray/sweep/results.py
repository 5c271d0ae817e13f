"""A sweep's results, read back from its MLflow child runs; the Pareto front and figures logged on the parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apt_ray.sweep.pareto import pareto_front
from apt_ray.tasks import SCORE_KEY, read_metric
from apt_ray.tracking.mlflow import STATUS_TAG, TRIAL_TAG, Tracker

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


def row_of(run: Any) -> dict[str, Any]:
    """One trial as a flat row: id, status, knobs, last metrics, run id."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    row: dict[str, Any] = {"trial": tags.get(TRIAL_TAG, run.info.run_name), "status": tags.get(STATUS_TAG, "unknown"),
                           "run_status": run.info.status, "run_id": run.info.run_id}
    row.update({k: _value(params.get(k)) for k in KNOBS})
    row.update({k: read_metric(metrics, k) for k in METRICS})  # runs of older versions: val_score under its old name
    if tags.get("failure_reason"):
        row["reason"] = tags["failure_reason"]
    return row


def collect_rows(tracker: Tracker, experiment_id: str, parent_run_id: str) -> list[dict[str, Any]]:
    """Every child run of the sweep, oldest first."""
    runs = sorted(tracker.children(experiment_id, parent_run_id), key=lambda r: r.info.start_time or 0)
    return [row_of(r) for r in runs]


def front_of(rows: list[dict[str, Any]], metrics: list[str], modes: list[str]) -> list[dict[str, Any]]:
    """The Pareto front of the trained trials."""
    return pareto_front([r for r in rows if r["status"] in TRAINED], metrics, modes)


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def log_summary(tracker: Tracker, parent_run_id: str, rows: list[dict[str, Any]], front: list[dict[str, Any]], figures_dir: Path) -> list[Path]:
    """Trials and front tables, the figures, and count metrics on the parent run; returns the figure paths."""
    from apt_ray.sweep.figures import plot_front, plot_score_vs_prompts  # matplotlib (Agg) only when figures are drawn

    tracker.log_table(parent_run_id, rows, "trials.json")
    tracker.log_table(parent_run_id, front, "pareto_front.json")
    figures = [plot_front([r for r in rows if r["status"] in TRAINED], front, figures_dir / "pareto_front.png"),
               plot_score_vs_prompts([r for r in rows if r["status"] in TRAINED], figures_dir / "score_vs_prompts.png")]
    for path in figures:
        tracker.log_file(parent_run_id, path, "figures")
    tally = counts(rows)
    scores = [r[SCORE_KEY] for r in rows if r["status"] in TRAINED and isinstance(r.get(SCORE_KEY), float)]
    summary = {f"trials_{k}": v for k, v in tally.items()}
    summary.update({"trials_total": len(rows), "pareto_size": len(front)})
    if scores:
        summary[f"best_{SCORE_KEY}"] = max(scores)
    tracker.log_metrics(parent_run_id, summary)
    return figures
