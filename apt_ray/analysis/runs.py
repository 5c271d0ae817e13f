"""A study's trials read back from MLflow into a pandas DataFrame (one row per trial, as the sweep logged it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from apt_ray.errors import UserError
from apt_ray.sweep.summary import TRAINED, param_value, row_of
from apt_ray.tasks import SCORE_KEY
from apt_ray.tracking import mlflow as mt


@dataclass
class StudyRuns:
    """The trials of one or more sweeps of an MLflow experiment, and what their parent runs say about the study."""

    experiment: str
    experiment_id: str
    tracking_uri: str
    frame: pd.DataFrame
    parents: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trained(self) -> pd.DataFrame:
        """Trials that trained to the end (or were stopped early by the scheduler) and have a score."""
        df = self.frame
        return df[df["status"].isin(TRAINED) & df[SCORE_KEY].notna()].reset_index(drop=True)

    @property
    def parent(self) -> dict[str, Any]:
        """The newest sweep's parent-run facts (run id, study name, storage path, objectives)."""
        return self.parents[0] if self.parents else {}


def _check_uri(uri: str) -> str:
    """The normalized URI; a sqlite file that does not exist is an error here (reading must not create a store)."""
    uri = mt.normalize_uri(uri)
    path = mt.sqlite_path(uri)
    if path is not None and not path.is_file():
        raise UserError(f"there is no MLflow database at {path} (tracking URI {uri}): point tracking_uri at the sqlite file a sweep "
                        "wrote (studies/prompt_length.py and studies/sweep_meter.py default to sqlite:///mlflow.db in the "
                        "directory they ran in).")
    if mt.scheme_of(uri) in ("http", "https", "file"):
        return mt.check_tracking_uri(uri)
    return uri


def _experiment(client: Any, name: str, uri: str) -> Any:
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments(max_results=200))
        have = ", ".join(f"'{n}'" for n in names) or "none"
        raise UserError(f"MLflow experiment '{name}' does not exist at {mt.redact(uri)} (experiments there: {have}). "
                        "Run a study first (e.g. python studies/prompt_length.py --experiment NAME) or set experiment to one of those.")
    return exp


def _parent_facts(run: Any) -> dict[str, Any]:
    params, tags = run.data.params, run.data.tags
    return {"parent_run_id": run.info.run_id, "run_name": run.info.run_name, "study": params.get("name"),
            "objectives": params.get("objectives", ""), "storage_path": tags.get("storage_path"),
            "status": tags.get(mt.STATUS_TAG), "start_time": run.info.start_time or 0}


def load_study_runs(tracking_uri: str, experiment: str, sweep: str = "latest") -> StudyRuns:
    """Trials of ``experiment``: of its newest sweep (``latest``), of every sweep (``all``), or of one parent run id."""
    uri = _check_uri(tracking_uri)
    client = mt.client(uri)
    exp = _experiment(client, experiment, uri)
    query = f"tags.`{mt.KIND_TAG}` = 'sweep'"
    parents = sorted(client.search_runs([exp.experiment_id], filter_string=query, max_results=1000),
                     key=lambda r: r.info.start_time or 0, reverse=True)
    if not parents:
        raise UserError(f"MLflow experiment '{experiment}' holds no sweep (no run tagged {mt.KIND_TAG}=sweep): "
                        "pick the experiment a study logged to.")
    if sweep == "latest":
        parents = parents[:1]
    elif sweep != "all":
        parents = [p for p in parents if p.info.run_id == sweep]
        if not parents:
            raise UserError(f"sweep '{sweep}' is not a sweep parent run of experiment '{experiment}': use latest, all or a parent run id.")
    rows: list[dict[str, Any]] = []
    for parent in parents:
        children = client.search_runs([exp.experiment_id], filter_string=f"tags.`{mt.PARENT_TAG}` = '{parent.info.run_id}'",
                                      max_results=5000)
        for run in sorted(children, key=lambda r: r.info.start_time or 0):
            rows.append({**cost_settings(run), **row_of(run), "parent_run_id": parent.info.run_id})
    frame = pd.DataFrame(rows, columns=_columns(rows))
    return StudyRuns(experiment, exp.experiment_id, uri, frame, [_parent_facts(p) for p in parents])


def cost_settings(run: Any) -> dict[str, Any]:
    """What a trial's closed-form cost depends on (model, input shapes, the method's knobs), from its params: the
    analysis recomputes the cost of one more prompt from them."""
    from apt_ray.analysis.tables import SETTINGS

    params = run.data.params
    return {k: param_value(params[k]) for k in SETTINGS if k in params}


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    from apt_ray.sweep.summary import KNOBS, METRICS

    base = ["trial", "status", "run_status", "run_id", "start_time", *KNOBS, *METRICS, "parent_run_id"]
    extra = [k for r in rows for k in r if k not in base]
    return base + list(dict.fromkeys(extra))


def optuna_storage_of(parent: dict[str, Any]) -> str | None:
    """The Optuna RDB URL a sweep persisted beside its results, when that directory is readable from here."""
    root = parent.get("storage_path")
    if not root:
        return None
    db = Path(root) / "optuna.db"
    return f"sqlite:///{db}" if db.is_file() else None
