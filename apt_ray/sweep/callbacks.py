"""Driver-side MLflow hooks of a sweep.

``RejectedRunLogger`` gives an over-budget proposal its child run (KILLED,
status ``over_budget``: never trained). ``RunCloser`` is a Tune callback that
closes child runs their trial could not close: trials stopped early by ASHA
(their process is ended by Tune) and trials whose process died.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback

from apt_ray.sweep.budget import Verdict
from apt_ray.config import TrainConfig
from apt_ray.sweep.trial import SweepContext, child_tags, trial_params
from apt_ray.tracking.mlflow import STATUS_TAG, Tracker

log = logging.getLogger("apt_ray.sweep")


def trial_error(trial: Any) -> str:
    """The last line of a Tune trial's error (its exception message), or a generic phrase."""
    try:
        text = str(trial.get_error() or "")
    except Exception:  # noqa: BLE001 - the error file may be missing or unreadable
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:1000] if lines else "the trial process ended with an error"


class RejectedRunLogger:
    """Records one over-budget proposal as a child run with its params and closed-form cost."""

    def __init__(self, ctx: SweepContext, base_config: dict[str, Any]) -> None:
        self.ctx, self.base = ctx, dict(base_config)

    def __call__(self, number: int, params: dict[str, Any], verdict: Verdict) -> None:
        tracker = Tracker(self.ctx.tracking_uri)
        trial_id = f"over_budget_{number:04d}"
        try:
            if tracker.find_child(self.ctx.experiment_id, self.ctx.parent_run_id, trial_id) is not None:
                return
            run_id = tracker.create_run(self.ctx.experiment_id, trial_id, child_tags(self.ctx, trial_id, "over_budget"))
            tracker.log_params(run_id, trial_params(TrainConfig.model_validate({**self.base, **params}), self.ctx))
            tracker.log_metrics(run_id, {"additional_gmacs": verdict.additional_gmacs, "updated_params": verdict.updated_params})
            tracker.set_tags(run_id, {"failure_reason": verdict.reason, "optuna_trial_number": number})
            tracker.finish(run_id, "KILLED")
        except Exception as e:  # noqa: BLE001 - the search goes on without this record
            log.warning("could not record over-budget proposal %d in MLflow: %s", number, e)


class RunCloser(Callback):
    """Closes a trial's child run when the trial ended but the run is still RUNNING: Tune (ASHA) stopped it,
    after all ``epochs`` (``finished``) or before (``stopped_early``), or its process died (``failed``)."""

    def __init__(self, ctx: SweepContext, epochs: int) -> None:
        self.ctx, self.epochs = ctx, epochs

    def _close(self, trial: Any, status: str, run_status: str, reason: str | None = None) -> None:
        tracker = Tracker(self.ctx.tracking_uri)
        try:
            run = tracker.find_child(self.ctx.experiment_id, self.ctx.parent_run_id, trial.trial_id)
            if run is None or run.info.status != "RUNNING":
                return
            tags = {STATUS_TAG: status}
            if reason:
                tags["failure_reason"] = reason
            tracker.set_tags(run.info.run_id, tags)
            tracker.finish(run.info.run_id, run_status)
        except Exception as e:  # noqa: BLE001 - never break the sweep over bookkeeping
            log.warning("could not close the MLflow run of trial %s: %s", trial.trial_id, e)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch", 0)
        self._close(trial, "finished" if epoch >= self.epochs else "stopped_early", "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "failed", "FAILED", trial_error(trial))


class ProgressLine(Callback):
    """One line per trial start and end on the driver's stdout (Tune's own tables are switched off)."""

    KNOBS = (("num_prompts", "p"), ("rank", "r"), ("depth", "depth"), ("placement", ""), ("lr", "lr"))

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def _knobs(self, config: dict[str, Any]) -> str:
        parts = []
        for key, short in self.KNOBS:
            if key in config:
                v = config[key]
                v = f"{v:.2e}" if isinstance(v, float) else v
                parts.append(f"{short}={v}" if short else str(v))
        return " ".join(parts)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} started: {self._knobs(trial.config)}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        r = trial.last_result or {}
        score = r.get("val_score")
        text = f"val score {score:.2f}, +GMACs {r.get('additional_gmacs', float('nan')):.4g}, {r.get('epoch', 0)} epochs" if score is not None else "no result"
        print(f"trial {trial.trial_id} done ({self.done}/{self.total}): {text}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        print(f"trial {trial.trial_id} failed ({self.done}/{self.total}): {trial_error(trial)[:300]}", flush=True)
