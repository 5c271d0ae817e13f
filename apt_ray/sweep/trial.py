"""The Tune trial function: an MLflow child run, the FLOPs profile, then a Ray Train TorchTrainer fit.

In Ray Train V2 a ``TorchTrainer`` is not handed to ``tune.Tuner``: each trial
builds its own (``apt_ray.train.distributed.make_trainer``) and forwards the
workers' reports to Tune with a ``TuneReportCallback`` (``TrialReporter``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from apt_ray.config import TrainConfig, build_train_config
from apt_ray.tracking.mlflow import COMMIT_TAG, KIND_TAG, PARENT_TAG, STATUS_TAG, TRIAL_TAG, Tracker

log = logging.getLogger("apt_ray.sweep")
PROFILE_ARTIFACT = "flops_profile.json"
PROFILE_METRICS = ("additional_gmacs", "analytic_additional_gmacs", "measured_additional_gmacs", "base_gmacs",
                   "total_gmacs", "updated_params", "trainable_params", "sites")


class TrialFailed(RuntimeError):
    """A trial ended without finishing; ``status`` is ``diverged`` or ``failed`` (the MLflow tag)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (plain data: it travels to trial processes on any node)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    git_commit: str
    train_storage: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker:
            res["GPU"] = float(self.gpus_per_worker)
        return res

    def resource_params(self) -> dict[str, Any]:
        return {"workers": self.workers, "cpus_per_worker": self.cpus_per_worker, "gpus_per_worker": self.gpus_per_worker}


def child_tags(ctx: SweepContext, trial_id: str, status: str) -> dict[str, str]:
    """Tags of a trial's child run (nesting, trial id, status, code version)."""
    return {PARENT_TAG: ctx.parent_run_id, TRIAL_TAG: trial_id, STATUS_TAG: status, COMMIT_TAG: ctx.git_commit,
            "mlflow.source.git.commit": ctx.git_commit, KIND_TAG: "trial"}


def open_child_run(tracker: Tracker, ctx: SweepContext, trial_id: str, name: str) -> tuple[str, int]:
    """The trial's child run (reopened when a resumed sweep reruns it) and how many epochs it has logged."""
    found = tracker.find_child(ctx.experiment_id, ctx.parent_run_id, trial_id)
    if found is None:
        return tracker.create_run(ctx.experiment_id, name, child_tags(ctx, trial_id, "running")), 0
    run_id = found.info.run_id
    tracker.reopen(run_id)
    tracker.set_tags(run_id, {STATUS_TAG: "running"})
    return run_id, max(0, tracker.last_step(run_id, "val_vqa_score"))


def trial_params(cfg: TrainConfig, ctx: SweepContext) -> dict[str, Any]:
    """What a child run records as params: the full trial config and its resources."""
    return {**{k: v for k, v in cfg.model_dump().items() if v is not None}, **ctx.resource_params()}


def log_profile(tracker: Tracker, run_id: str, cfg: TrainConfig) -> dict[str, float]:
    """Measure the trial's FLOPs profile at its input shapes; log it as metrics and as a JSON artifact."""
    import torch

    from apt_ray.profile import profile

    torch.set_num_threads(1)  # the trial process holds a sliver of a CPU; the workers have the real ones
    ds = cfg.data_spec()
    prof = profile(cfg.model, cfg.method_spec(), text_len=ds.max_text_len, image_hw=(ds.image_size, ds.image_size),
                   num_answers=cfg.answer_top_k)
    data = prof.to_dict()
    data["num_answers_assumed"] = cfg.answer_top_k  # the head width counted in base_gmacs (additional_* do not depend on it)
    metrics = {k: data[k] for k in PROFILE_METRICS}
    tracker.log_metrics(run_id, metrics, step=0)
    tracker.log_json(run_id, data, PROFILE_ARTIFACT)
    return {"additional_gmacs": prof.additional_gmacs, "updated_params": float(prof.updated_params)}


def classify_failure(error: BaseException) -> TrialFailed:
    """``diverged`` when a worker raised ``Diverged``, else ``failed`` with the first line of the cause."""
    from apt_ray.train.loop import Diverged

    causes: list[BaseException] = []
    for exc in (getattr(error, "worker_failures", None) or {}).values():
        causes += [e for e in (exc, getattr(exc, "cause", None), exc.__cause__) if e is not None]
    causes.append(error)
    for e in causes:
        if isinstance(e, Diverged):
            return TrialFailed("diverged", str(Diverged(e.step, e.loss)) if hasattr(e, "step") else str(e))
    first = causes[0]
    text = str(getattr(first, "cause", None) or first).strip().splitlines()
    last = [line for line in text if line.strip()]
    return TrialFailed("failed", f"{type(first).__name__}: {last[-1] if last else ''}"[:1000])


def run_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    """One Tune trial (use through ``tune.with_parameters(run_trial, ctx=...)``)."""
    from ray import tune

    from apt_ray.train.distributed import make_trainer

    os.environ.update(ctx.env)  # the data cache and offline switches of the driver, on any node
    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    cfg = build_train_config(overrides={k: v for k, v in config.items() if not k.startswith("_")})
    tracker = Tracker(ctx.tracking_uri)
    run_id, logged = open_child_run(tracker, ctx, trial_id, trial_name)
    try:
        import ray

        tracker.set_tags(run_id, {"ray_node_id": ray.get_runtime_context().get_node_id()})
        tracker.log_params(run_id, trial_params(cfg, ctx))
        constants = log_profile(tracker, run_id, cfg)
        from apt_ray.sweep.reporter import TrialReporter

        trainer = make_trainer(
            cfg.model_dump(), workers=ctx.workers, use_gpu=ctx.gpus_per_worker > 0, storage_path=ctx.train_storage,
            name=trial_id, resources_per_worker=ctx.resources_per_worker(),
            callbacks=[TrialReporter(tracker, run_id, constants, logged)],
        )
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - every failure is recorded on the run, then re-raised for Tune
        failure = e if isinstance(e, TrialFailed) else classify_failure(e)
        _record_failure(tracker, run_id, failure)
        raise failure from None
    tracker.set_tags(run_id, {STATUS_TAG: "finished"})
    tracker.finish(run_id, "FINISHED")


def _record_failure(tracker: Tracker, run_id: str, failure: TrialFailed) -> None:
    try:
        tracker.set_tags(run_id, {STATUS_TAG: failure.status, "failure_reason": failure.reason})
        tracker.finish(run_id, "FAILED")
    except Exception as e:  # noqa: BLE001 - the trial's own error matters more
        log.warning("could not mark run %s as failed in MLflow: %s", run_id, e)
