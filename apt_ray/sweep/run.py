"""``run_study``: check everything, then a ``tune.Tuner`` with the budgeted ``OptunaSearch`` (and ASHA for
single-objective studies), one MLflow parent run per sweep written by the driver alone, and the Pareto front when it
ends."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apt_ray.errors import UserError
from apt_ray.sweep.spec import StudySpec, check_data, check_spec
from apt_ray.sweep.store import Manifest, SweepDir, latest_sweep
from apt_ray.sweep.trial import TrialPlan
from apt_ray.tracking import mlflow as mt
from apt_ray.tracking.writer import RunWriter

log = logging.getLogger("apt_ray.sweep")
PARENT_KEY = "sweep"
PATIENCE_ENV = "APT_RAY_MLFLOW_PATIENCE_S"  # how long the end of a sweep waits for an unreachable MLflow (default 300 s)


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
    if spec is None:
        raise UserError("--resume needs the --storage-path of the sweep to continue (or the study, to find its latest sweep).")
    return latest_sweep(spec.name) if resume else SweepDir.default(spec.name)


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


def _start_parent(writer: RunWriter, spec: StudySpec, sweep: SweepDir, commit: str) -> None:
    from apt_ray.sweep.space import space_as_dict

    space = spec.space()
    tags = {mt.KIND_TAG: "sweep", mt.STATUS_TAG: "running", mt.COMMIT_TAG: commit, "mlflow.source.git.commit": commit,
            "storage_path": str(sweep.root)}
    writer.create(PARENT_KEY, f"sweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags)
    writer.params(PARENT_KEY, _parent_params(spec, space))
    writer.json(PARENT_KEY, spec.model_dump(mode="json", exclude={"tracking_uri"}), "study_spec.json")
    writer.json(PARENT_KEY, space_as_dict(space), "search_space.json")


def _scheduler(spec: StudySpec) -> Any:
    if not spec.use_asha():
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=spec.metrics[0], mode=spec.modes[0], max_t=max(spec.epochs, 1),
                         grace_period=min(spec.scheduler.grace_period, spec.epochs), reduction_factor=spec.scheduler.reduction_factor)


def _trainable(plan: TrialPlan) -> Any:
    from ray import tune

    from apt_ray.sweep.trial import run_trial

    return tune.with_resources(tune.with_parameters(run_trial, plan=plan), plan.trial_resources())


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _tuner(spec: StudySpec, sweep: SweepDir, plan: TrialPlan, tracking: Any, resume: bool) -> tuple[Any, Any]:
    from ray import tune

    from apt_ray.sweep.progress import SweepConsole
    from apt_ray.sweep.search import BudgetedOptunaSearch, optuna_storage

    if resume:  # the callbacks and the search come back from the sweep's saved state
        tuner = tune.Tuner.restore(str(sweep.tune_dir), trainable=_trainable(plan), resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, param_space=spec.base_config())
        return tuner, None
    slots = min(spec.concurrency, spec.num_trials)
    console = SweepConsole(spec.num_trials, slots, spec.epochs, list(spec.space()))
    searcher = BudgetedOptunaSearch(spec, optuna_storage(sweep.optuna_url), [tracking, console])
    one_worker = plan.workers == 1
    tuner = tune.Tuner(
        _trainable(plan),
        param_space=spec.base_config(),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(spec), num_samples=spec.num_trials,
                                    max_concurrent_trials=slots,
                                    reuse_actors=one_worker,  # a reused process has torch and the data imported already
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=sweep.tune_dir.name, storage_path=str(sweep.root), verbose=0,
            callbacks=[tracking, console],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            # one-worker trials are retried by Tune from their last checkpoint; multi-worker ones by Ray Train
            failure_config=tune.FailureConfig(max_failures=plan.max_failures if one_worker else 0, fail_fast=False)),
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
    verbose: bool = False,
) -> StudyResult:
    """Run (or with ``resume`` continue) a sweep and return its trials and Pareto front. ``verbose``: also print what
    Ray's processes print (the trials' own output; it is in Ray's log files either way).

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
        from apt_ray.train.loop import self_pretrained_backbone

        # once, here, with every core: left to the trials, the first two would wait on one of them pretraining on one CPU
        # (on a cluster, the trials build it where they run)
        self_pretrained_backbone(spec.train_config({}))
    started = dist.connect(address, quiet=not verbose)
    try:
        mt.refuse_local_store_on_cluster(uri, _node_ips())
        plan = _plan(spec, sweep)
        dist.check_capacity(plan.workers, dist.per_worker_resources(plan.gpus_per_worker > 0, plan.worker_resources()))
        if manifest is None:
            sweep.ensure_new()
        return _run(spec, sweep, plan, uri, experiment, manifest)
    finally:
        if started:
            import ray

            ray.shutdown()


def _plan(spec: StudySpec, sweep: SweepDir) -> TrialPlan:
    from apt_ray.train.distributed import worker_env

    res = spec.resources
    return TrialPlan(workers=res.workers, cpus_per_worker=res.cpus_per_worker, gpus_per_worker=res.gpus_per_worker,
                     max_failures=res.max_failures, train_storage=str(sweep.train_dir), env=worker_env())


def _run(spec: StudySpec, sweep: SweepDir, plan: TrialPlan, uri: str, experiment: str, manifest: Manifest | None) -> StudyResult:
    from apt_ray.sweep.callback import MlflowSweepCallback

    mt.use_http_retries()
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # mid-epoch checkpoints are reported without a score
    # keeping 2 checkpoints per trial makes Tune save the sweep's state at each (what --resume restores): wanted, not warned about
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    commit = mt.git_commit()
    writer = RunWriter.open(uri, experiment, sweep.root)
    tracking = MlflowSweepCallback(spec, uri, experiment, sweep.root, commit)
    if manifest is None:
        _start_parent(writer, spec, sweep, commit)
        tracking.log_dataset(PARENT_KEY, spec.base_config())
        sweep.write(Manifest(spec=spec.model_dump(mode="json"), tracking_uri=mt.redact(uri), experiment=experiment,
                             created=time.strftime("%Y-%m-%d %H:%M:%S")))
    else:
        writer.reopen(PARENT_KEY)
        writer.tags(PARENT_KEY, {mt.STATUS_TAG: "running", "resumed": "true"})
    parent = writer.run_id(PARENT_KEY, timeout=60) or "(not yet written)"
    log.info("sweep %s: results in %s, MLflow %s (experiment %s, parent run %s)", spec.name, sweep.root, mt.redact(uri), experiment, parent)
    tuner, searcher = _tuner(spec, sweep, plan, tracking, resume=manifest is not None)
    try:
        grid = tuner.fit()
    except BaseException:
        writer.tags(PARENT_KEY, {mt.STATUS_TAG: "interrupted"})
        writer.finish(PARENT_KEY, "KILLED")
        writer.close(timeout=10)
        raise
    return _finish(spec, sweep, writer, uri, experiment, parent, _interrupted(grid, spec, searcher))


def _optuna_study(spec: StudySpec, sweep: SweepDir) -> Any:
    """The sweep's persisted Optuna study (None when it cannot be opened: the figures drawn from it are left out)."""
    import optuna

    try:
        return optuna.load_study(study_name=spec.name, storage=sweep.optuna_url)
    except Exception as e:  # noqa: BLE001 - the sweep's own summary does not depend on it
        log.warning("the Optuna study at %s could not be opened (%s): its figures are left out", sweep.optuna_url, e)
        return None


def _patience() -> float:
    text = os.environ.get(PATIENCE_ENV, "")
    try:
        return max(0.0, float(text)) if text else 300.0
    except ValueError:
        return 300.0


def _finish(spec: StudySpec, sweep: SweepDir, writer: RunWriter, uri: str, experiment: str, parent: str,
            interrupted: bool) -> StudyResult:
    from apt_ray.sweep.summary import front_of, log_summary, row_of

    rows: list[dict[str, Any]] = []
    front: list[dict[str, Any]] = []
    figures: list[Path] = []
    if writer.flush(_patience()):
        rows = sorted((row_of(r) for r in writer.children(PARENT_KEY)), key=lambda r: r["start_time"])
        front = front_of(rows, spec.metrics, spec.modes)
        figures = log_summary(writer, PARENT_KEY, rows, front, sweep.figures_dir, spec, _optuna_study(spec, sweep))
    writer.tags(PARENT_KEY, {mt.STATUS_TAG: "interrupted" if interrupted else "finished"})
    writer.finish(PARENT_KEY, "KILLED" if interrupted else "FINISHED")
    writer.close(_patience())
    return StudyResult(spec=spec, sweep_dir=sweep.root, tracking_uri=uri, experiment=experiment, experiment_id=writer.experiment_id,
                       parent_run_id=parent, rows=rows, front=front, interrupted=interrupted, optuna_storage=sweep.optuna_url,
                       figures=figures)
