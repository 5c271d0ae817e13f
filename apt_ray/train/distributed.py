"""One trial on Ray Train (V2): ``make_trainer`` builds the TorchTrainer, ``run_distributed`` runs it.

``make_trainer`` is what a Tune trial function calls (pass
``callbacks=[TuneReportCallback()]`` to forward the reports to Tune);
``run_distributed`` is ``apt-ray train --workers W``: it checks the request,
connects to (or starts) Ray, checks the cluster can hold the workers, fits and
returns rank 0's final metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from apt_ray.config import TrainConfig
from apt_ray.errors import UserError
from apt_ray.train.ray_logs import QUIET_HOOK

log = logging.getLogger("apt_ray.train")

FORWARDED_ENV = ("APT_RAY_CACHE", "APT_RAY_FAIL_AT_STEP", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PATH_KEYS = ("data_path", "checkpoint", "resume_from", "output_dir")
CONNECT_TIMEOUT_S = 5.0
def worker_env() -> dict[str, str]:
    """Environment the workers need to share the driver's data cache and offline settings."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if "APT_RAY_CACHE" in env:
        env["APT_RAY_CACHE"] = str(Path(env["APT_RAY_CACHE"]).expanduser().resolve())
    return env


def absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Paths in ``config`` that exist here, made absolute (Ray workers run in another directory)."""
    out = dict(config)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    return out


def make_trainer(
    config: dict[str, Any],
    *,
    workers: int,
    use_gpu: bool,
    storage_path: str | None,
    name: str | None,
    max_failures: int = 0,
    resources_per_worker: dict[str, float] | None = None,
    callbacks: Sequence[Any] | None = None,
    num_to_keep: int = 2,
) -> Any:
    """A ``TorchTrainer`` running ``train_loop_per_worker`` on ``workers`` workers (gloo on CPU, NCCL on GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from apt_ray.train.loop import train_loop_per_worker

    env = worker_env()
    run_config = RunConfig(
        name=name,
        storage_path=str(Path(storage_path).expanduser().resolve()) if storage_path and "://" not in storage_path else storage_path,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        callbacks=list(callbacks) if callbacks else None,
        worker_runtime_env={"env_vars": env} if env else None,
        # Ray Train's per-run INFO lines (resource requests, worker groups, every checkpoint and report) stay
        # in its log files under the Ray session; the console keeps its warnings and errors
        logging_config=LoggingConfig(log_level=os.environ.get("APT_RAY_TRAIN_LOG_LEVEL", "WARNING")),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**absolute_paths(config), "_ray": True},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker),
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


# -- connecting --------------------------------------------------------------
def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for ``auto`` and the like."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """UserError unless something listens at ``address`` (ray.init itself would retry for minutes)."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise UserError(
            f"cannot reach a Ray cluster at {address} ({reason}): check the head node's address and port "
            "(`ray status` on the head prints it), or leave --address out to start a local Ray instance."
        ) from None


def local_ray_env() -> None:
    """Settings for a Ray instance this process starts on its own machine (its processes inherit them).

    Ray Train's preemption watcher (one more actor process per run) polls for spot-node
    preemption notices, which a single-machine instance never gets.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def connect(address: str | None, quiet: bool = False) -> bool:
    """Connect to Ray at ``address`` (or start a local instance); True if this call started Ray. ``quiet``: Ray's
    worker processes' output and its own notices (below errors) stay in Ray's log files instead of printing here."""
    import ray

    if address:
        check_reachable(address)
    if ray.is_initialized():
        if address:
            log.info("Ray is already initialised in this process: using it, not %s", address)
        return False
    try:
        if address:
            ray.init(address=address, logging_level=logging.ERROR if quiet else logging.WARNING, log_to_driver=not quiet)
        else:
            local_ray_env()
            # the dashboard (on the loopback address only) serves the State API that Ray Train's placement-group
            # cleaner needs: without it, the workers' CPUs of a multi-worker trial Tune stopped would stay reserved
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.ERROR if quiet else logging.WARNING,
                     log_to_driver=not quiet, runtime_env={"worker_process_setup_hook": QUIET_HOOK})
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not connect to {where} ({first}): check --address, or leave it out to start a local instance.") from None
    return True


# -- resources ---------------------------------------------------------------
def per_worker_resources(use_gpu: bool, resources_per_worker: dict[str, float] | None) -> dict[str, float]:
    """What Ray Train reserves for one worker (its defaults: 1 CPU, or 1 GPU with use_gpu)."""
    from ray.train import ScalingConfig

    sc = ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources_per_worker)
    need = {"CPU": float(sc.num_cpus_per_worker), "GPU": float(sc.num_gpus_per_worker), **sc.additional_resources_per_worker}
    return {k: float(v) for k, v in need.items() if v}


def workers_that_fit(need: dict[str, float], nodes: list[dict[str, float]]) -> float:
    """How many workers needing ``need`` fit on ``nodes`` (each worker lives on one node)."""
    if not need:
        return math.inf
    return sum(min(int(res.get(k, 0.0) / v + 1e-9) for k, v in need.items()) for res in nodes)


def check_capacity(workers: int, need: dict[str, float]) -> None:
    """UserError, naming what the cluster has, if it cannot hold ``workers`` workers at once."""
    import ray

    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    fit = workers_that_fit(need, nodes)
    if fit >= workers:
        return
    total = ray.cluster_resources()
    have = ", ".join(f"{k} {total.get(k, 0):g}" for k in sorted({"CPU", "GPU", *need}))
    ask = ", ".join(f"{v:g} {k}" for k, v in need.items())
    fix = f"use --workers {fit} or fewer, or add nodes" if fit else "no node can hold one worker: ask for fewer resources per worker, or add bigger nodes"
    raise UserError(
        f"{workers} workers need {ask} each, but the Ray cluster ({len(nodes)} node{'s' * (len(nodes) != 1)}: {have}) "
        f"holds at most {fit} such worker{'s' * (fit != 1)}: {fix}."
    )


# -- the run -----------------------------------------------------------------
def validate_request(cfg: TrainConfig, workers: int, max_failures: int, use_gpu: bool) -> None:
    """Refuse a request that cannot work, before Ray starts."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers {workers} is not allowed: give a positive number of Ray Train workers.")
    if max_failures < -1:
        raise UserError(f"--max-failures {max_failures} is not allowed: give 0 or more (-1 retries forever).")
    if cfg.device == "cuda" and not use_gpu:
        raise UserError("device=cuda but the Ray Train workers get no GPU: pass --gpus-per-worker 1 (or use device=auto).")
    if cfg.device == "cpu" and use_gpu:
        raise UserError("device=cpu but GPUs were asked for each worker: drop --gpus-per-worker or use device=auto.")
    cfg.data_spec(world_size=workers)  # the global batch must split evenly over the workers


def default_run_name(cfg: TrainConfig) -> str:
    """A new name per run, so a run never resumes an older run's checkpoints by accident."""
    return f"apt_ray-{cfg.model}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _worker_error(error: BaseException) -> BaseException | None:
    """The first UserError (or other apt_ray error) a worker raised inside a Ray Train failure."""
    failures = getattr(error, "worker_failures", None) or {}
    for _, exc in sorted(failures.items()):
        for e in (exc, getattr(exc, "_base_exc", None), getattr(exc, "cause", None), exc.__cause__):
            if e is not None and type(e).__module__.startswith("apt_ray"):
                return e
    return None


def final_metrics(result: Any, workers: int) -> dict[str, Any]:
    """Rank 0's final result (``Trainer.result()``), over the last reported metrics, plus run facts."""
    out: dict[str, Any] = dict(result.metrics or {})
    if isinstance(result.return_value, dict):
        out.update(result.return_value)
    elif result.checkpoint is not None:  # fallback: what the last checkpoint knows
        with result.checkpoint.as_directory() as d:
            meta = json.loads((Path(d) / "meta.json").read_text())
        out.update({k: meta[k] for k in ("history", "global_step", "restarts") if k in meta})
    out.setdefault("restarts", 0)
    out["world_size"] = workers
    out["run_path"] = str(result.path)
    if result.checkpoint is not None:
        out["checkpoint_path"] = str(result.checkpoint.path)
    return out


def run_distributed(
    cfg: TrainConfig,
    *,
    workers: int,
    address: str | None = None,
    max_failures: int = 0,
    use_gpu: bool = False,
    storage_path: str | None = None,
    name: str | None = None,
    resources_per_worker: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run one trial on ``workers`` Ray Train workers and return its final metrics."""
    validate_request(cfg, workers, max_failures, use_gpu)
    need = per_worker_resources(use_gpu, resources_per_worker)
    started = connect(address)
    try:
        check_capacity(workers, need)
        trainer = make_trainer(cfg.model_dump(), workers=workers, use_gpu=use_gpu, storage_path=storage_path or cfg.output_dir,
                               name=name or default_run_name(cfg), max_failures=max_failures,
                               resources_per_worker=resources_per_worker)
        from ray.train import TrainingFailedError

        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            cause = _worker_error(e)
            if cause is not None:
                raise cause from None
            raise
        return final_metrics(result, workers)
    finally:
        if started:
            import ray

            ray.shutdown()
