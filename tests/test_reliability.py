"""Reliability without Ray: safe checkpoint loading, loopback-only servers, no secrets in what is logged, quiet Ray
processes. (MLflow outages: test_run_writer.py; faults injected into real sweeps: test_sweep_integration.py and
test_ray_train.py.)"""

from __future__ import annotations

import json
import logging
import pathlib
import pickle
import socket
import time
from pathlib import Path

import pytest
import torch

from apt_ray.errors import UserError
from apt_ray.tracking import mlflow as mt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pickled_checkpoint_is_refused_and_never_executed(tmp_path: Path) -> None:
    """A checkpoint whose state file is an arbitrary pickle (here one that would create a file) is refused:
    checkpoints load with torch.load(weights_only=True) and safetensors only."""
    from apt_ray.train.checkpoint import STATE, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, opt, sched, {"global_step": 1})
    load_checkpoint(ckpt, model, opt, sched)  # the genuine one loads

    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "scheduler": {}, "rng": {}}, ckpt / STATE)
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(ckpt, model, opt, sched)
    assert not marker.exists()


class Payload:
    """What an attacker's pickle does on load: here, create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_meter_ckpt_runs_no_code(tmp_path: Path) -> None:
    """A METER ``.ckpt`` carrying a code-running pickle: its globals are never called (the file is read with
    weights_only=True; the unknown object is at most an inert placeholder, and the tensors still load)."""
    from apt_ray.models.meter_convert import read_meter_state_dict

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "meter.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": Payload(marker)}, ckpt)
    try:
        state = read_meter_state_dict(ckpt)
    except UserError:
        state = None  # refusing the file is as safe as reading its tensors only
    assert not marker.exists()
    assert state is None or torch.equal(state["w"], torch.ones(2))


def test_local_ray_binds_its_dashboard_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local Ray instance the project starts serves its dashboard (the State API Ray Train's clean-up asks) on
    127.0.0.1 only."""
    import ray

    from apt_ray.train import distributed as dist

    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    assert dist.connect(None) is True
    assert seen.get("include_dashboard") is True and seen.get("dashboard_host") == "127.0.0.1"


def test_printed_server_commands_bind_loopback() -> None:
    assert "--host 127.0.0.1" in mt.ui_command("sqlite:////tmp/m.db")
    with pytest.raises(UserError) as err:
        mt.check_tracking_uri(f"http://127.0.0.1:{free_port()}", timeout=2)
    assert "mlflow server --host 127.0.0.1" in str(err.value)


def test_no_secrets_in_logged_params_or_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials in the tracking URI or in tokens in the environment reach no MLflow param, tag, manifest or
    trial plan."""
    from apt_ray.sweep.callback import MlflowSweepCallback
    from apt_ray.sweep.run import _parent_params, _plan
    from apt_ray.sweep.spec import StudySpec
    from apt_ray.sweep.store import SweepDir

    secret = "s3cr3t-Pa55"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    uri = f"http://alice:{secret}@mlflow.example:5000"
    spec = StudySpec(tracking_uri=uri, fixed={"epochs": 1})
    plan = _plan(spec, SweepDir(tmp_path / "sweep"))
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "mlflow_runs.json").write_text('{"experiment_id": "1"}')  # no lookup on the made-up server
    callback = MlflowSweepCallback(spec, uri, "e", tmp_path / "sweep", commit="c")
    logged = [_parent_params(spec, spec.space()), callback.params(spec.base_config()), callback.tags("t1", "running"),
              mt.safe_params({"note": f"see {uri}", "api_token": secret, "db_password": secret}), plan]
    assert secret not in json.dumps(logged, default=str)
    assert secret not in mt.redact(uri) and "alice" not in mt.redact(uri)
    callback.writer.close(timeout=0)


def test_worker_setup_hook_imports_only_the_standard_library() -> None:
    """Ray runs the hook in every process it starts: importing it must not pull in torch, transformers or pydantic
    (that cost each Ray process about 3 s of CPU)."""
    import subprocess
    import sys

    code = ("import sys, importlib; from apt_ray.train.ray_logs import QUIET_HOOK; mod, fn = QUIET_HOOK.rsplit('.', 1); "
            "getattr(importlib.import_module(mod), fn)(); "
            "print(sorted(m for m in ('torch', 'transformers', 'pydantic', 'numpy', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_local_ray_quiets_only_the_noisy_ray_train_loggers() -> None:
    """The worker set-up hook of a local instance keeps the errors of Ray Train's per-poll warners, nothing else."""
    import logging

    from apt_ray.train.ray_logs import QUIET_LOGGERS, quiet_ray_logs

    import logging.config

    quiet_ray_logs()
    assert len(QUIET_LOGGERS) == 2 and all(logging.getLogger(n).level == logging.ERROR for n in QUIET_LOGGERS)
    assert logging.getLogger("ray.train").level != logging.ERROR
    # what Ray Train's controller does next: configure "ray.train", which resets its children's levels
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False, "loggers": {"ray.train": {"level": "DEBUG"}}})
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        assert logger.level == logging.NOTSET  # the reset happened ...
        warning = logger.makeRecord(name, logging.WARNING, __file__, 1, "Failed to send resource request", (), None)
        error = logger.makeRecord(name, logging.ERROR, __file__, 1, "real failure", (), None)
        assert not logger.filter(warning) and logger.filter(error)  # ... and warnings are still dropped
    quiet_ray_logs()  # a second call adds no second filter
    assert all(len(logging.getLogger(n).filters) == 1 for n in QUIET_LOGGERS)
    # the per-report INFO line of Ray Train's worker context (a logger named after its file) is dropped too
    import ray.train.v2._internal.execution.context as context

    from apt_ray.train.ray_logs import report_logger_name

    assert report_logger_name() == context.logger.name
    info = context.logger.makeRecord(context.logger.name, logging.INFO, __file__, 1, "Reporting training result 1", (), None)
    warning = context.logger.makeRecord(context.logger.name, logging.WARNING, __file__, 1, "slow", (), None)
    assert not context.logger.filter(info) and context.logger.filter(warning)
    # and a Tune trial's "Checkpoint successfully created" line, once per epoch
    import ray.train._internal.storage as tune_storage

    from apt_ray.train.ray_logs import TUNE_CHECKPOINT_LOGGER

    assert tune_storage.logger.name == TUNE_CHECKPOINT_LOGGER
    info = tune_storage.logger.makeRecord(TUNE_CHECKPOINT_LOGGER, logging.INFO, __file__, 1, "Checkpoint successfully created", (), None)
    assert not tune_storage.logger.filter(info)


def test_ray_train_info_lines_stay_off_the_console(monkeypatch, tmp_path) -> None:
    """Ray Train's per-report INFO lines go to its log files; APT_RAY_TRAIN_LOG_LEVEL brings them back."""
    from apt_ray.train.distributed import make_trainer

    def level() -> str:
        trainer = make_trainer({"model": "tiny-vilt"}, workers=1, use_gpu=False, storage_path=str(tmp_path), name="t")
        return trainer.run_config.logging_config.log_level

    monkeypatch.delenv("APT_RAY_TRAIN_LOG_LEVEL", raising=False)
    assert level() == "WARNING"
    monkeypatch.setenv("APT_RAY_TRAIN_LOG_LEVEL", "INFO")
    assert level() == "INFO"
