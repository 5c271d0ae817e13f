"""``run_study``: check everything, then a ``tune.Tuner`` with the budgeted ``OptunaSearch`` (and ASHA for
single-objective studies), one MLflow parent run per sweep, and the Pareto front when it ends."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apt_ray.errors import UserError
from apt_ray.sweep.spec import StudySpec, check_data, check_spec
from apt_ray.sweep.store import Manifest, SweepDir
from apt_ray.sweep.trial import SweepContext
from apt_ray.tracking import mlflow as mt

log = logging.getLogger("apt_ray.sweep")
# What the trial function itself holds: no CPU (even 0.01 CPU would leave a node of N CPUs unable to host a
# worker that needs N, e.g. 8-CPU GPU nodes with 8 CPUs per worker), only memory for its own process.
TRIAL_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}


@dataclass
class StudyResult:
    """What a finished (or interrupted) sweep leaves behind, and where."""

    spec: StudySpec
    sweep_dir: Path
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    interrupted: bool
    optuna_storage: str
    figures: list[Path] = field(default_factory=list)

    @property
    def ui_command(self) -> str:
        return mt.ui_command(self.tracking_uri)


def _node_ips() -> list[str]:
    import ray

    return [n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")]


def _sweep_dir(spec: StudySpec | None, storage_path: str | None, resume: bool) -> SweepDir:
    if storage_path:
        return SweepDir(storage_path)
    if resume:
        from apt_ray.sweep.store import latest_sweep

        found = latest_sweep(spec.name) if spec else None
        if found is None:
            raise UserError(f"--resume: no earlier sweep of study '{spec.name if spec else '?'}' under ./ray_results: "
                            "pass the --storage-path of the sweep to continue.")
        return found
    return SweepDir.default(spec.name)


def _resume_spec(manifest: Manifest, spec: StudySpec | None) -> StudySpec:
    """The sweep's own spec; a different one given alongside --resume is refused (Tune cannot change it midway)."""
    stored = StudySpec.model_validate(manifest.spec)
    if spec is not None:
        where = {"tracking_uri", "experiment", "storage_path"}
        a, b = stored.model_dump(exclude=where), spec.model_dump(exclude=where)
        diff = [k for k in a if a[k] != b[k]]
        if diff:
            raise UserError(f"--resume continues the sweep with the settings it started with, but these differ: {', '.join(diff)}. "
                            "Drop those flags/config changes, or start a new sweep (another --storage-path).")
    return stored


def _check_resume_target(manifest: Manifest, uri: str | None, experiment: str | None) -> tuple[str, str]:
    if uri and mt.redact(mt.normalize_uri(uri)) != mt.redact(manifest.tracking_uri):
        raise UserError(f"--resume: this sweep logs to {mt.redact(manifest.tracking_uri)}, not {mt.redact(uri)}: "
                        "pass that tracking URI (or leave --tracking-uri out) so its MLflow runs are continued, not duplicated.")
    if experiment and experiment != manifest.experiment:
        raise UserError(f"--resume: this sweep logs to MLflow experiment '{manifest.experiment}', not '{experiment}': leave --experiment out.")
    return uri or manifest.tracking_uri, manifest.experiment


def _parent_params(spec: StudySpec, space: dict[str, Any]) -> dict[str, Any]:
    nested = {"fixed", "search_space", "initial_points", "objectives", "scheduler", "resources", "tracking_uri"}
    flat = {k: v for k, v in spec.model_dump(mode="json", exclude=nested).items() if v is not None}
    flat.update({f"fixed.{k}": v for k, v in spec.fixed.items()})
    flat.update({f"resources.{k}": v for k, v in spec.resources.model_dump().items()})
    flat["objectives"] = ", ".join(f"{o.mode}:{o.metric}" for o in spec.objectives)
    flat["scheduler"] = "asha" if spec.use_asha() else "fifo"
    flat.update({f"space.{k}": p.describe() for k, p in space.items()})
    return flat


def _start_parent(tracker: mt.Tracker, experiment_id: str, spec: StudySpec, sweep: SweepDir, commit: str) -> str:
    from apt_ray.sweep.space import space_as_dict

    space = spec.space()
    name = f"sweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {mt.KIND_TAG: "sweep", mt.STATUS_TAG: "running", mt.COMMIT_TAG: commit, "mlflow.source.git.commit": commit,
            "storage_path": str(sweep.root)}
    run_id = tracker.create_run(experiment_id, name, tags)
    tracker.log_params(run_id, _parent_params(spec, space))
    tracker.log_json(run_id, spec.model_dump(mode="json", exclude={"tracking_uri"}), "study_spec.json")
    tracker.log_json(run_id, space_as_dict(space), "search_space.json")
    return run_id


def _scheduler(spec: StudySpec) -> Any:
    if not spec.use_asha():
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=spec.metrics[0], mode=spec.modes[0], max_t=max(spec.epochs, 1),
                         grace_period=min(spec.scheduler.grace_period, spec.epochs), reduction_factor=spec.scheduler.reduction_factor)


def _trainable(ctx: SweepContext) -> Any:
    from ray import tune

    from apt_ray.sweep.trial import run_trial

    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), dict(TRIAL_RESOURCES))


def _tuner(spec: StudySpec, sweep: SweepDir, ctx: SweepContext, resume: bool) -> tuple[Any, Any]:
    from ray import tune

    from apt_ray.sweep.callbacks import ProgressLine, RejectedRunLogger, RunCloser
    from apt_ray.sweep.reaper import PlacementGroupReaper
    from apt_ray.sweep.search import BudgetedOptunaSearch, optuna_storage

    if resume:
        tuner = tune.Tuner.restore(str(sweep.tune_dir), trainable=_trainable(ctx), resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, param_space=spec.base_config())
        return tuner, None
    searcher = BudgetedOptunaSearch(spec, optuna_storage(sweep.optuna_url), RejectedRunLogger(ctx, spec.base_config()))
    tuner = tune.Tuner(
        _trainable(ctx),
        param_space=spec.base_config(),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(spec), num_samples=spec.num_trials,
                                    max_concurrent_trials=min(spec.concurrency, spec.num_trials)),
        run_config=tune.RunConfig(
            name=sweep.tune_dir.name, storage_path=str(sweep.root), verbose=0,
            callbacks=[RunCloser(ctx, spec.epochs), ProgressLine(spec.num_trials), PlacementGroupReaper()],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    return tuner, searcher


def _interrupted(grid: Any, spec: StudySpec, searcher: Any) -> bool:
    """Trials left unfinished, or fewer trials than asked for (unless the budget ended the search).

    A trial Tune stops because the sweep was interrupted (SIGINT) ends TERMINATED like a finished one,
    but the search never heard back about it. (A resumed sweep's search lives inside the restored Tuner:
    ``searcher`` is None then, and only the trial counts tell.)
    """
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    exhausted = bool(getattr(searcher, "exhausted", False))
    untold = searcher.untold() if searcher is not None else []
    return unfinished > 0 or bool(untold) or (len(grid) < spec.num_trials and not exhausted)


def run_study(
    spec: StudySpec | None,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    storage_path: str | None = None,
    resume: bool = False,
) -> StudyResult:
    """Run (or with ``resume`` continue) a sweep and return its trials and Pareto front.

    Everything a user can get wrong is checked before any trial starts: the spec
    against the model, the tracking URI, the Ray address, multi-node use of a
    local MLflow store, and whether the cluster can hold one trial.
    """
    if spec is None and not resume:
        raise UserError("run_study needs a StudySpec (or resume=True with the storage path of an earlier sweep).")
    sweep = _sweep_dir(spec, storage_path or (spec.storage_path if spec else None), resume)
    manifest: Manifest | None = None
    if resume:
        manifest = sweep.ensure_resumable()
        spec = _resume_spec(manifest, spec)
        tracking_uri, experiment = _check_resume_target(manifest, tracking_uri, experiment)
    else:
        assert spec is not None
        check_spec(spec)
        if address is None:
            check_data(spec)
        if sweep.exists():
            sweep.ensure_new()  # refuses, naming --resume
    assert spec is not None
    uri = mt.check_tracking_uri(tracking_uri or spec.tracking_uri or mt.DEFAULT_TRACKING_URI)
    experiment = experiment or spec.experiment or spec.name

    from apt_ray.train import distributed as dist

    if address is None:
        from apt_ray.sweep.prepare import prepare_pretrained_backbone

        prepare_pretrained_backbone(spec)  # on a cluster, the trials build it where they run
    started = dist.connect(address)
    try:
        mt.refuse_local_store_on_cluster(uri, _node_ips())
        need = dist.per_worker_resources(spec.resources.gpus_per_worker > 0, _worker_resources(spec))
        dist.check_capacity(spec.resources.workers, need)
        if manifest is None:
            sweep.ensure_new()
        return _run(spec, sweep, uri, experiment, manifest)
    finally:
        if started:
            import ray

            ray.shutdown()


def _worker_resources(spec: StudySpec) -> dict[str, float]:
    res = {"CPU": spec.resources.cpus_per_worker}
    if spec.resources.gpus_per_worker:
        res["GPU"] = spec.resources.gpus_per_worker
    return res


def _run(spec: StudySpec, sweep: SweepDir, uri: str, experiment: str, manifest: Manifest | None) -> StudyResult:
    from apt_ray.train.distributed import worker_env

    tracker = mt.Tracker(uri)
    commit = mt.git_commit()
    if manifest is None:
        experiment_id = tracker.experiment_id(experiment)
        parent = _start_parent(tracker, experiment_id, spec, sweep, commit)
        sweep.write(Manifest(spec=spec.model_dump(mode="json"), tracking_uri=mt.redact(uri), experiment=experiment,
                             experiment_id=experiment_id, parent_run_id=parent, created=time.strftime("%Y-%m-%d %H:%M:%S")))
    else:
        experiment_id, parent = manifest.experiment_id, manifest.parent_run_id
        tracker.reopen(parent)
        tracker.set_tags(parent, {mt.STATUS_TAG: "running", "resumed": "true"})
    ctx = SweepContext(tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent, git_commit=commit,
                       train_storage=str(sweep.train_dir), workers=spec.resources.workers,
                       cpus_per_worker=spec.resources.cpus_per_worker, gpus_per_worker=spec.resources.gpus_per_worker,
                       max_failures=spec.resources.max_failures, env=worker_env())
    log.info("sweep %s: results in %s, MLflow %s (experiment %s, parent run %s)", spec.name, sweep.root, mt.redact(uri), experiment, parent)
    tuner, searcher = _tuner(spec, sweep, ctx, resume=manifest is not None)
    try:
        grid = tuner.fit()
    except BaseException:
        tracker.set_tags(parent, {mt.STATUS_TAG: "interrupted"})
        tracker.finish(parent, "KILLED")
        raise
    if manifest is not None:
        _close_cut_off_runs(tracker, experiment_id, parent)
    return _finish(spec, sweep, tracker, uri, experiment, experiment_id, parent, _interrupted(grid, spec, searcher))


CUT_OFF_REASON = ("cut off when the sweep driver stopped, and not resumed: the sweep's saved Tune state "
                  "(written every ~10 s) did not yet include this trial, so Tune started another in its place")


def _close_cut_off_runs(tracker: mt.Tracker, experiment_id: str, parent: str) -> int:
    """After a resumed sweep: child runs still RUNNING belong to trials Tune no longer knows (started after its
    last saved state, before the driver was killed). End them FAILED with the reason; returns how many."""
    closed = 0
    for run in tracker.children(experiment_id, parent):
        if run.info.status == "RUNNING":
            tracker.set_tags(run.info.run_id, {mt.STATUS_TAG: "failed", "failure_reason": CUT_OFF_REASON})
            tracker.finish(run.info.run_id, "FAILED")
            closed += 1
    if closed:
        log.warning("%d trial run(s) cut off by the stopped driver could not be resumed: marked FAILED", closed)
    return closed


def _finish(spec: StudySpec, sweep: SweepDir, tracker: mt.Tracker, uri: str, experiment: str, experiment_id: str,
            parent: str, interrupted: bool) -> StudyResult:
    from apt_ray.sweep.results import collect_rows, front_of, log_summary

    rows = collect_rows(tracker, experiment_id, parent)
    front = front_of(rows, spec.metrics, spec.modes)
    figures = log_summary(tracker, parent, rows, front, sweep.figures_dir)
    tracker.set_tags(parent, {mt.STATUS_TAG: "interrupted" if interrupted else "finished"})
    tracker.finish(parent, "KILLED" if interrupted else "FINISHED")
    return StudyResult(spec=spec, sweep_dir=sweep.root, tracking_uri=uri, experiment=experiment, experiment_id=experiment_id,
                       parent_run_id=parent, rows=rows, front=front, interrupted=interrupted, optuna_storage=sweep.optuna_url,
                       figures=figures)
