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
KNOBS = ("task", "method", "num_prompts", "rank", "depth", "placement", "lr", "seed", "epochs", "workers")
METRICS = (SCORE_KEY, "additional_gmacs", "additional_pct_of_base", "updated_params", "base_gmacs", "train_loss",
           "samples_per_s", "step_time_ms")  # as metrics, or as params (constants; runs of older versions: metrics)


def param_value(text: str | None) -> Any:
    """An MLflow param back to a value: a number, a boolean or a list (as a tuple); ``None`` for a missing one."""
    import yaml

    if text is None or text == "None":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return tuple(value) if isinstance(value, list) else value if isinstance(value, bool) else text


def row_of(run: Any) -> Row:
    """One trial as a flat row: id, status, knobs, last metrics, run id."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    row: Row = {"trial": tags.get(TRIAL_TAG, run.info.run_name), "name": run.info.run_name, "status": tags.get(STATUS_TAG, "unknown"),
                "run_status": run.info.status, "run_id": run.info.run_id, "start_time": run.info.start_time or 0}
    row.update({k: param_value(params.get(k)) for k in KNOBS})
    for k in METRICS:  # read_metric: runs of older versions logged val_score under its old name
        value = read_metric(metrics, k)
        row[k] = param_value(params.get(k)) if value is None else value
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

OPTUNA_FIGURES_MIN_TRIALS = {"pareto_front": 2, "hypervolume_history": 2, "param_importances": 10}


def study_note(spec: Any, rows: list[Row], front: list[Row], experiment_id: str) -> str:
    """The parent run's Markdown note: objectives and budget, the trial counts, the best trial (linked) and the front."""
    tally = counts(rows)
    budget = f"{spec.max_additional_gmacs:g} additional GMACs" if spec.max_additional_gmacs is not None else "none"
    lines = [f"**Study {spec.name}**: " + ", ".join(f"{o.mode}imise `{o.metric}`" for o in spec.objectives) + f"; FLOPs budget: {budget}.",
             "", "Trials: " + ", ".join(f"{tally.get(k, 0)} {k.replace('_', ' ')}" for k in
                                         ("finished", "stopped_early", "over_budget", "diverged", "failed")) + "."]
    trained = [r for r in rows if r["status"] in TRAINED and isinstance(r.get(SCORE_KEY), float)]
    if trained:
        best = max(trained, key=lambda r: r[SCORE_KEY])
        lines += ["", f"Best trial: [{best['name']}]({run_link(experiment_id, best['run_id'])}), "
                      f"{_cell(best, SCORE_KEY, '{:.2f}')} at {_cell(best, 'additional_gmacs', '{:.4g}')} additional GMACs"
                      f" ({_cell(best, 'additional_pct_of_base', '{:.3g}')}% of the base model)."]
    if front:
        lines += ["", "Pareto front:", "", "| trial | p | r | depth | placement | lr | val score | +GMACs | % of base |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in front:
            cells = [f"[{r['name']}]({run_link(experiment_id, r['run_id'])})", *(_cell(r, k, f) for k, f in NOTE_COLUMNS)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTE_COLUMNS = (("num_prompts", "{}"), ("rank", "{}"), ("depth", "{}"), ("placement", "{}"), ("lr", "{:.2e}"),
                (SCORE_KEY, "{:.2f}"), ("additional_gmacs", "{:.4g}"), ("additional_pct_of_base", "{:.3g}"))


def run_link(experiment_id: str, run_id: str) -> str:
    """A link to a run, relative to the MLflow UI (what a run's note renders)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def optuna_figures(study: Any, metrics: list[str], figures_dir: Path) -> list[Path]:
    """Optuna's own matplotlib figures of the study, each drawn where enough trials finished for it to mean something:
    the Pareto front and the hypervolume history (several objectives), and the parameter importances (fANOVA)."""
    import warnings

    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    drawn: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib figures experimental
        if len(metrics) > 1 and len(done) >= OPTUNA_FIGURES_MIN_TRIALS["pareto_front"]:
            drawn["optuna_pareto_front.png"] = ovm.plot_pareto_front(study, target_names=metrics)
            worst = [min(t.values[i] for t in done) - 1 if d.name == "MAXIMIZE" else max(t.values[i] for t in done) * 1.1 + 1e-12
                     for i, d in enumerate(study.directions)]
            drawn["optuna_hypervolume_history.png"] = ovm.plot_hypervolume_history(study, reference_point=worst)
        if len(done) >= OPTUNA_FIGURES_MIN_TRIALS["param_importances"]:
            drawn["optuna_param_importances.png"] = ovm.plot_param_importances(
                study, target=(lambda t: t.values[0]) if len(metrics) > 1 else None, target_name=metrics[0])
    paths = []
    for name, ax in drawn.items():
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        fig.savefig(figures_dir / name)
        plt.close(fig)
        paths.append(figures_dir / name)
    return paths


def log_summary(writer: Any, parent: str, rows: list[Row], front: list[Row], figures_dir: Path, spec: Any,
                study: Any = None) -> list[Path]:
    """On the parent run (key ``parent`` of ``writer``): the trials and front tables, the figures (those of
    ``apt_ray.analysis.plots``, and Optuna's when ``study`` is given), the Markdown note and count metrics; the best
    child is tagged. Returns the figure paths."""
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
        figures.append(figures_dir / name)
    if study is not None:
        figures += optuna_figures(study, list(spec.metrics), figures_dir)
    for path in figures:
        writer.file(parent, path, "figures")
    writer.tags(parent, {"mlflow.note.content": study_note(spec, rows, front, writer.experiment_id)})
    scores = trained[SCORE_KEY].dropna()
    summary: dict[str, Any] = {f"trials_{k}": v for k, v in counts(rows).items()}
    summary.update({"trials_total": len(rows), "pareto_size": len(front)})
    if len(scores):
        summary[f"best_{SCORE_KEY}"] = float(scores.max())
        best = max((r for r in rows if r["status"] in TRAINED and r.get(SCORE_KEY) == scores.max()), key=lambda r: r["start_time"])
        writer.tags(best["trial"], {"best_trial": "true"})
        writer.tags(parent, {"best_run_id": best["run_id"]})
    writer.metrics(parent, summary)
    return figures
