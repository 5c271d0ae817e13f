"""The Tune trial function: an MLflow child run, the FLOPs profile, then a Ray Train TorchTrainer fit.

In Ray Train V2 a ``TorchTrainer`` is not handed to ``tune.Tuner``: each trial
builds its own (``apt_ray.train.distributed.make_trainer``) and forwards the
workers' reports to Tune with a ``TuneReportCallback`` (``TrialReporter``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apt_ray.config import TrainConfig, build_train_config
from apt_ray.tasks import SCORE_KEY, metric_aliases, read_metric
from apt_ray.tracking.mlflow import COMMIT_TAG, KIND_TAG, PARENT_TAG, STATUS_TAG, TRIAL_TAG, Tracker

log = logging.getLogger("apt_ray.sweep")
PROFILE_ARTIFACT = "flops_profile.json"
UNSENT_FILE = "mlflow_unsent.jsonl"  # beside the trial's Ray Train results: writes MLflow never took
PROFILE_METRICS = ("additional_gmacs", "analytic_additional_gmacs", "measured_additional_gmacs", "base_gmacs",
                   "total_gmacs", "updated_params", "trainable_params", "sites")


class TrialFailed(RuntimeError):
    """A trial ended without finishing; ``status`` is ``diverged`` or ``failed`` (the MLflow tag)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(status, reason)  # args stay (status, reason): the error pickles across processes
        self.status, self.reason = status, reason

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


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
    max_failures: int = 0
    env: dict[str, str] = field(default_factory=dict)

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker:
            res["GPU"] = float(self.gpus_per_worker)
        return res

    def resource_params(self) -> dict[str, Any]:
        return {"workers": self.workers, "cpus_per_worker": self.cpus_per_worker, "gpus_per_worker": self.gpus_per_worker,
                "max_failures": self.max_failures}


def child_tags(ctx: SweepContext, trial_id: str, status: str) -> dict[str, str]:
    """Tags of a trial's child run (nesting, trial id, status, code version)."""
    return {PARENT_TAG: ctx.parent_run_id, TRIAL_TAG: trial_id, STATUS_TAG: status, COMMIT_TAG: ctx.git_commit,
            "mlflow.source.git.commit": ctx.git_commit, KIND_TAG: "trial"}


def open_child_run(tracker: Tracker, ctx: SweepContext, trial_id: str, name: str, found: Any = None) -> tuple[str, int]:
    """The trial's child run (``found``, reopened when a resumed sweep reruns it) and how many epochs it has logged."""
    if found is None:
        return tracker.create_run(ctx.experiment_id, name, child_tags(ctx, trial_id, "running")), 0
    run_id = found.info.run_id
    tracker.reopen(run_id)
    tracker.set_tags(run_id, {STATUS_TAG: "running"})
    return run_id, max(0, _last_scored_step(tracker, run_id))


def finished_earlier(run: Any) -> bool:
    """A child run its trial finished before the sweep driver was stopped (Tune's saved state may lag behind)."""
    return run is not None and run.info.status == "FINISHED" and run.data.tags.get(STATUS_TAG) == "finished"


def recorded_result(tracker: Tracker, run: Any) -> dict[str, Any]:
    """What a finished trial reported at its last epoch, read back from its run (for Tune and Optuna)."""
    result = {k: v for k, v in run.data.metrics.items()}
    result["epoch"] = max(0, _last_scored_step(tracker, run.info.run_id))
    if SCORE_KEY not in result:  # a run of an older version logged the score under a name its task now aliases
        score = read_metric(result, SCORE_KEY)
        if score is not None:
            result[SCORE_KEY] = score
    return result


def _score_names() -> list[str]:
    """``val_score`` and the old names that tasks alias to it (the runs of older versions logged those)."""
    return [SCORE_KEY, *(old for old, new in metric_aliases().items() if new == SCORE_KEY)]


def _last_scored_step(tracker: Tracker, run_id: str) -> int:
    """The last epoch a run logged a score for (under ``val_score`` or an old name of it); -1 if none."""
    return max(tracker.last_step(run_id, name) for name in _score_names())


def sync_history(tracker: Tracker, run_id: str, history: list[dict[str, Any]]) -> int:
    """Log the epochs of ``history`` (Ray Train's own record) that the run lacks; returns how many.

    The per-epoch metrics are written by the Train controller as they come; if MLflow was unreachable and
    the controller ended before it came back, its buffered writes are gone, and this writes them again."""
    from apt_ray.sweep.reporter import epoch_metrics

    logged = set().union(*(tracker.metric_steps(run_id, name) for name in _score_names()))
    missing = [h for h in history if int(h.get("epoch", 0)) not in logged and read_metric(h, SCORE_KEY) is not None]
    for h in missing:
        tracker.log_metrics(run_id, epoch_metrics(h), step=int(h["epoch"]))
    if missing:
        log.warning("run %s: wrote %d epoch(s) of metrics that MLflow had missed", run_id, len(missing))
    return len(missing)


def run_facts(final: dict[str, Any], t_fit: float) -> dict[str, float]:
    """Worker restarts, and the start-up of a trial that ran without any: seconds from ``trainer.fit()`` to the
    first training step (Train controller, worker processes, process group, then model, method and data)."""
    facts = {"restarts": float(final.get("restarts", 0))}
    if "started_unix" in final and not final.get("restarts"):
        facts["startup_s"] = final["started_unix"] - t_fit + final.get("setup_s", 0.0)
    return facts


def trial_params(cfg: TrainConfig, ctx: SweepContext) -> dict[str, Any]:
    """What a child run records as params: the full trial config and its resources."""
    return {**{k: v for k, v in cfg.model_dump().items() if v is not None}, **ctx.resource_params()}


# What a trial reports it actually used (its tokenizer, image processing, recipe and trainable groups).
USED_KEYS = ("tokenizer", "image_processor", "image_mean", "image_std", "image_size", "recipe", "trainable_groups", "lr_groups", "profile_shape")


def used_params(final: dict[str, Any], logged: dict[str, Any]) -> dict[str, Any]:
    """The trial's used settings as params, leaving out keys already logged (MLflow params never change)."""
    return {k: final[k] for k in USED_KEYS if k in final and k not in logged}


def measure_profile(cfg: TrainConfig) -> dict[str, Any]:
    """The trial's FLOPs profile at its input shapes (``apt_ray.profile``), as a JSON-ready dict."""
    import torch

    from apt_ray.profile import profile

    torch.set_num_threads(1)  # the trial process holds a sliver of a CPU; the workers have the real ones
    from apt_ray.models.presets import checkpoint_config

    prof = profile(cfg.model, cfg.method_spec(), text_len=cfg.text_len, image_hw=cfg.profile_shape()[0],
                   num_answers=cfg.answer_top_k, config=checkpoint_config(cfg.model, cfg.checkpoint))
    data = prof.to_dict()
    data["num_answers_assumed"] = cfg.answer_top_k  # the head width counted in base_gmacs (additional_* do not depend on it)
    return data


class ProfileJob:
    """Measures the profile in a thread while the trainer starts (the trial process mostly waits on Ray) and
    logs it as soon as it is ready, so a trial that Tune stops early still has it."""

    def __init__(self, cfg: TrainConfig, tracker: Tracker, run_id: str, logged: dict[str, float]) -> None:
        import threading

        self.cfg, self.tracker, self.run_id, self.logged = cfg, tracker, run_id, dict(logged)
        self._thread = threading.Thread(target=self._run, name="flops-profile", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._log(measure_profile(self.cfg))
        except Exception as e:  # noqa: BLE001 - a missing profile must not fail the trial
            log.warning("FLOPs profile of run %s failed: %s", self.run_id, e)
            try:
                self.tracker.set_tags(self.run_id, {"profile_error": str(e)[:500]})
            except Exception:  # noqa: BLE001
                pass

    def _log(self, data: dict[str, Any]) -> None:
        """Metrics (those not already logged at the same value) and the JSON artifact with the per-site breakdown."""
        self.tracker.log_metrics(self.run_id, {k: data[k] for k in PROFILE_METRICS if self.logged.get(k) != data[k]}, step=0)
        self.tracker.log_json(self.run_id, data, PROFILE_ARTIFACT)
        expected = self.logged["additional_gmacs"]
        if abs(data["additional_gmacs"] - expected) > 1e-9 * max(1.0, expected):
            self.tracker.set_tags(self.run_id, {"profile_mismatch": f"measured {data['additional_gmacs']} vs closed form {expected}"})

    def wait(self, timeout: float | None = 300) -> None:
        self._thread.join(timeout)


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
    import ray
    from ray import tune

    from apt_ray.sweep.budget import trial_cost
    from apt_ray.sweep.reporter import TrialReporter
    from apt_ray.train.distributed import make_trainer

    os.environ.update(ctx.env)  # the data cache and offline switches of the driver, on any node
    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    cfg = build_train_config(overrides={k: v for k, v in config.items() if not k.startswith("_")})
    tracker = Tracker(ctx.tracking_uri, buffered=True)  # an MLflow outage queues writes; training goes on
    spill = Path(ctx.train_storage) / trial_id / UNSENT_FILE
    found = tracker.find_child(ctx.experiment_id, ctx.parent_run_id, trial_id)
    if finished_earlier(found):
        # a resumed sweep whose driver was killed before Tune saved this trial's end: report, do not train again
        log.warning("trial %s finished before the sweep was stopped (MLflow run %s): reporting its results", trial_id, found.info.run_id)
        tune.report(recorded_result(tracker, found))
        return
    run_id, logged = open_child_run(tracker, ctx, trial_id, trial_name, found)
    job: ProfileJob | None = None
    try:
        tracker.set_tags(run_id, {"ray_node_id": ray.get_runtime_context().get_node_id()})
        tracker.log_params(run_id, trial_params(cfg, ctx))
        cost = trial_cost(cfg)  # closed form, equal to the measured count (tests): the objective from the first report on
        constants = {"additional_gmacs": cost.additional_gmacs, "updated_params": float(cost.updated_params)}
        tracker.log_metrics(run_id, constants, step=0)
        job = ProfileJob(cfg, tracker, run_id, constants)

        trainer = make_trainer(
            cfg.model_dump(), workers=ctx.workers, use_gpu=ctx.gpus_per_worker > 0, storage_path=ctx.train_storage,
            name=trial_id, resources_per_worker=ctx.resources_per_worker(), max_failures=ctx.max_failures,
            callbacks=[TrialReporter(Tracker(ctx.tracking_uri, buffered=True), run_id, constants, logged)],
        )
        t_fit = time.time()
        result = trainer.fit()
    except ray.exceptions.RayActorError:
        # the Train controller died with this trial's process: Tune is stopping the trial (ASHA), or the node
        # went away; the driver's RunCloser records which, so nothing is written here
        raise
    except Exception as e:  # noqa: BLE001 - every failure is recorded on the run, then re-raised for Tune
        failure = e if isinstance(e, TrialFailed) else classify_failure(e)
        if job is not None:
            job.wait()
        _best_effort(lambda: tracker.set_tags(run_id, {STATUS_TAG: failure.status, "failure_reason": failure.reason}))
        _best_effort(lambda: tracker.finish(run_id, "FAILED"))
        tracker.close(spill)
        raise failure from None
    job.wait()
    final = result.return_value if isinstance(result.return_value, dict) else {}
    _best_effort(lambda: sync_history(tracker, run_id, final.get("history", [])))
    _best_effort(lambda: tracker.log_metrics(run_id, run_facts(final, t_fit), step=0))
    _best_effort(lambda: tracker.log_params(run_id, used_params(final, trial_params(cfg, ctx))))
    tracker.set_tags(run_id, {STATUS_TAG: "finished"})
    tracker.finish(run_id, "FINISHED")
    tracker.close(spill)


def _best_effort(fn: Any) -> None:
    """Bookkeeping after a failure: the trial's own error matters more than a tracking hiccup."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow bookkeeping of a failed trial failed: %s", e)
