"""The Ray Train callback of a trial: per-epoch metrics to the MLflow child run, and on to Tune.

It runs in the Ray Train controller (any node), so it holds only picklable
state: the tracking URI and run id, and the trial's constant metrics (its FLOPs
profile), which it adds to every report so Tune and Optuna can optimise them.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from apt_ray.tasks.base import SCORE_KEY
from apt_ray.tracking.mlflow import Tracker

log = logging.getLogger("apt_ray.sweep")
EPOCH_KEYS = ("train_loss", SCORE_KEY, "samples_per_s", "step_time_ms", "lr", "global_step")


def epoch_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """What is logged per epoch: :data:`EPOCH_KEYS` and the task's own metrics (every ``val_*`` key)."""
    return {k: v for k, v in report.items() if k in EPOCH_KEYS or k.startswith("val_")}


class TrialReporter(TuneReportCallback):
    """Forward rank 0's end-of-epoch reports to Tune (with ``constants`` added) and log them to MLflow."""

    def __init__(self, tracker: Tracker, run_id: str, constants: dict[str, float], logged_epochs: int = 0) -> None:
        super().__init__()  # must be built inside the Tune trial (it checks for a Tune session)
        self.tracker, self.run_id, self.constants = tracker, run_id, dict(constants)
        self.logged_epochs = logged_epochs  # a resumed trial does not log its earlier epochs twice

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        report = dict(metrics[0])
        if SCORE_KEY not in report:
            return  # a mid-epoch checkpoint: no score yet, nothing for Tune or the metric history
        epoch = int(report.get("epoch", 0))
        if epoch > self.logged_epochs:
            try:
                self.tracker.log_metrics(self.run_id, epoch_metrics(report), step=epoch)
                self.logged_epochs = epoch
            except Exception as e:  # noqa: BLE001 - tracking trouble must not stop training
                log.warning("could not log epoch %d of run %s to MLflow: %s", epoch, self.run_id, str(e).splitlines()[0][:200])
        report.update(self.constants)
        super().after_report(run_context, [report], checkpoint)
