"""The sessions of a training loop under Ray: a Tune trial on its own, or one worker of a Ray Train TorchTrainer.

``TuneSession``: a one-worker trial runs the loop in the Tune trial's own
process (no Train controller, no worker processes); it reports to Tune with
``tune.report`` and resumes, after a Tune-level retry or a resumed sweep, from
``tune.get_checkpoint()``.

``RaySession``: ranks come from ``ray.train.get_context()``; the checkpoint to
resume from is the one Ray Train restores after a worker-group restart
(``ray.train.get_checkpoint()``); reports go through ``ray.train.report``, which
every rank calls (it is a barrier) while only rank 0 attaches a checkpoint.

Imported only inside Ray processes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from apt_ray.train.session import user_resume_checkpoint

WORK_DIR = ".apt_ray"  # inside the run's directory: survives worker restarts


def _worker_threads() -> int:
    """Threads a worker may use: the CPUs Ray reserved for it (Ray mirrors them in OMP_NUM_THREADS)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.floor(cpus))


class _Restored:
    """What both sessions share: the checkpoint Ray restored, and a scratch folder that outlives restarts."""

    rank: int
    resume_from: str | Path | None
    _restored: Any
    _work_dir: Path

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint Ray restored (after a failure, or in a resumed sweep), else ``resume_from``, else None."""
        if self._restored is None:
            return user_resume_checkpoint(self.resume_from)
        if getattr(self._restored.filesystem, "type_name", "") == "local" and Path(self._restored.path).is_dir():
            return Path(self._restored.path)
        target = self._work_dir / f"restore-rank{self.rank}"
        shutil.rmtree(target, ignore_errors=True)
        return Path(self._restored.to_directory(str(target)))

    def checkpoint_scratch(self) -> Path:
        """Where rank 0 writes ``step_N`` before reporting it."""
        d = self._work_dir / "scratch"
        d.mkdir(parents=True, exist_ok=True)
        return d


class RaySession(_Restored):
    """A Ray Train worker: rank, world size, restored checkpoint, reports."""

    wait_for_commit: bool = True  # make each reported checkpoint durable before training on

    def __init__(self, resume_from: str | Path | None = None) -> None:
        ctx = ray.train.get_context()
        self.world_size: int = ctx.get_world_size()
        self.rank: int = ctx.get_world_rank()
        self.experiment_name: str = ctx.get_experiment_name()
        self._work_dir = self._pick_work_dir(ctx)
        self._restored = ray.train.get_checkpoint()
        self.is_restart: bool = self._restored is not None
        self.resume_from = resume_from
        torch.set_num_threads(_worker_threads())

    def _pick_work_dir(self, ctx: Any) -> Path:
        """The run's directory when storage is a local (or NFS) path, else the node's Ray session dir."""
        storage = ctx.get_storage()
        if getattr(storage.storage_filesystem, "type_name", "") == "local":
            base = Path(storage.experiment_fs_path)
        else:
            try:
                base = Path(storage.local_working_directory)
            except Exception:  # noqa: BLE001 - any failure: fall back to a node-local temp dir
                base = Path(tempfile.gettempdir()) / "apt_ray" / self.experiment_name
        path = base / WORK_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Report on every rank (a barrier); rank 0 attaches the checkpoint, deleted locally once persisted.

        Ray Train's controller collects reports when it next polls the workers; a worker
        failure before that poll loses the report. So after attaching a checkpoint, rank 0
        waits until the controller has committed it: a restart then resumes from it.
        """
        clean = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        if checkpoint_dir is None:
            ray.train.report(clean)
            return
        ray.train.report(
            clean,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
            checkpoint_dir_name=Path(checkpoint_dir).name,
            delete_local_checkpoint_after_upload=True,
        )
        if self.wait_for_commit:
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


class TuneSession(_Restored):
    """A one-worker Tune trial: the loop runs in the trial's process; ``constants`` join every report (the trial's
    closed-form cost, which Tune and Optuna read as an objective, and the node it runs on)."""

    world_size = 1
    rank = 0

    def __init__(self, resume_from: str | Path | None = None, constants: dict[str, Any] | None = None) -> None:
        from ray import tune

        self.constants = {**(constants or {}), "ray_node_id": ray.get_runtime_context().get_node_id()}
        self.resume_from = resume_from
        self._restored = tune.get_checkpoint()
        self.is_restart = self._restored is not None
        # outside the trial's directory, whose files Tune copies to the sweep's storage in the background
        self._work_dir = Path(tempfile.gettempdir()) / "apt_ray" / tune.get_context().get_trial_id()
        self._work_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(_worker_threads())

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Report to Tune; a checkpoint is persisted to the trial's storage by Tune, then its scratch copy removed."""
        from ray import tune

        clean = {**self.constants, **{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}}
        if checkpoint_dir is None:
            tune.report(clean)
            return
        tune.report(clean, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
