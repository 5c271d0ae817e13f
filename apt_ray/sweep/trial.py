"""The Tune trial function: one configuration trained by ``apt_ray.train``'s loop.

A one-worker trial runs the loop in the trial's own process
(``TuneSession``): no Train controller or worker processes to start, and Tune
retries a failed trial from its last checkpoint. A multi-worker trial builds a
Ray Train ``TorchTrainer`` (DDP over its workers; Ray Train restarts them from
their last checkpoint) and forwards rank 0's reports to Tune. Either way the
trial writes nothing to MLflow: the driver's callback records what Tune hears.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from apt_ray.sweep.search import COST_KEY

# What a multi-worker trial's own process holds: no CPU (even 0.01 CPU would leave a node of N CPUs unable to host a
# worker that needs N, e.g. 8-CPU GPU nodes with 8 CPUs per worker), only memory; its workers hold the rest.
COORDINATOR_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a sweep shares (plain data: it travels to trial processes on any node)."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0
    train_storage: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def worker_resources(self) -> dict[str, float]:
        res = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker:
            res["GPU"] = float(self.gpus_per_worker)
        return res

    def trial_resources(self) -> dict[str, float]:
        """A one-worker trial is its own worker; a multi-worker trial only coordinates."""
        return self.worker_resources() if self.workers == 1 else dict(COORDINATOR_RESOURCES)


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """One Tune trial (use through ``tune.with_parameters(run_trial, plan=...)``)."""
    from apt_ray.train.distributed import FORWARDED_ENV

    for key in FORWARDED_ENV:  # exactly the driver's settings (a reused process may hold an earlier trial's)
        os.environ.pop(key, None)
    os.environ.update(plan.env)
    if plan.workers == 1:
        from apt_ray.train.loop import train_loop_per_worker

        train_loop_per_worker({**config, "_tune": True})
        return
    _run_trainer(config, plan)


def _run_trainer(config: dict[str, Any], plan: TrialPlan) -> None:
    import ray
    from ray import tune
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from apt_ray.train.distributed import _worker_error, make_trainer

    class Forward(TuneReportCallback):
        """Rank 0's end-of-epoch reports, with the trial's cost, to Tune (mid-epoch checkpoints stay with Ray Train)."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if "partial_epoch" not in metrics[0]:
                super().after_report(run_context, [{**constants, **metrics[0]}], checkpoint)

    constants = {**config.get(COST_KEY, {}), "ray_node_id": ray.get_runtime_context().get_node_id()}

    trainer = make_trainer({k: v for k, v in config.items() if k != COST_KEY}, workers=plan.workers,
                           use_gpu=plan.gpus_per_worker > 0, storage_path=plan.train_storage, name=tune.get_context().get_trial_id(),
                           resources_per_worker=plan.worker_resources(), max_failures=plan.max_failures, callbacks=[Forward()])
    try:
        trainer.fit()
    except TrainingFailedError as e:
        cause = _worker_error(e)  # a worker's own error (e.g. Diverged) says more than Ray Train's wrapper
        raise (cause or e) from None
