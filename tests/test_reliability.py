"""Reliability without Ray: the trial-side MLflow buffer, safe checkpoint loading, loopback-only servers, no secrets
in what is logged. (The faults injected into real sweeps are in test_sweep_integration.py and test_ray_train.py.)"""

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


# -- MLflow outage: buffered writes ---------------------------------------------------------

def test_buffered_tracker_queues_during_an_outage_and_writes_in_order_after(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes to a store that refuses connections return at once and queue; once the store answers (here the
    tracker is pointed at a live sqlite store, as a restarted server would be reached again) they are written in
    order, with their original timestamps; if it never answers, close() warns and saves them as JSON lines."""
    for key in mt.FAIL_FAST_HTTP:
        monkeypatch.delenv(key, raising=False)
    live = mt.check_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    store = mt.Tracker(live)
    exp = store.experiment_id("outage")
    run_id = store.create_run(exp, "t1", {mt.STATUS_TAG: "running"})

    down = mt.Tracker(f"http://127.0.0.1:{free_port()}", buffered=True, patience=1.0)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="apt_ray.tracking"):
        down.log_params(run_id, {"lr": 0.01, "num_prompts": 8})
        for epoch in (1, 2):
            down.log_metrics(run_id, {"val_vqa_score": 10.0 * epoch}, step=epoch)
        down.log_json(run_id, {"per_site": [1, 2]}, "flops_profile.json")
        down.set_tags(run_id, {mt.STATUS_TAG: "finished"})
        down.finish(run_id, "FINISHED")
    assert time.monotonic() - start < 10, "buffered writes must not hold training up"
    assert down.pending == 6
    assert "is unreachable" in caplog.text and "training goes on" in caplog.text
    assert store.run(run_id).info.status == "RUNNING" and not store.run(run_id).data.metrics

    spill = tmp_path / "train" / "trial" / "mlflow_unsent.jsonl"
    with caplog.at_level(logging.WARNING, logger="apt_ray.tracking"):
        assert down.close(spill, timeout=1.0) is False  # never came back within the patience: warn, keep on disk
    assert "stayed unreachable: 6 write(s)" in caplog.text and str(spill) in caplog.text
    saved = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [w["kind"] for w in saved] == ["params", "metrics", "metrics", "json", "tags", "finish"]
    assert saved[2]["payload"][0][:2] == ["val_vqa_score", 20.0] and saved[2]["payload"][0][3] == 2

    down.uri, down._c = live, None  # the store answers again
    assert down.flush(timeout=30) and down.pending == 0
    run = store.run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[mt.STATUS_TAG] == "finished"
    assert run.data.params == {"lr": "0.01", "num_prompts": "8"}
    history = store.client.get_metric_history(run_id, "val_vqa_score")
    assert sorted((m.step, m.value) for m in history) == [(1, 10.0), (2, 20.0)]
    assert {m.timestamp for m in history} <= {w["payload"][0][2] for w in saved if w["kind"] == "metrics"}
    assert [a.path for a in store.client.list_artifacts(run_id)] == ["flops_profile.json"]


def test_buffered_tracker_survives_pickling_and_keeps_its_mode() -> None:
    t = mt.Tracker("http://127.0.0.1:1", buffered=True, patience=7.0)
    t.log_metrics("r", {"a": 1.0})  # queued: nothing listens there
    copy = pickle.loads(pickle.dumps(t))
    assert (copy.uri, copy.buffered, copy.patience, copy.pending) == (t.uri, True, 7.0, 0)  # the queue stays home


def test_non_transient_errors_are_not_buffered(tmp_path: Path) -> None:
    t = mt.Tracker(mt.check_tracking_uri(f"sqlite:///{tmp_path}/m.db"), buffered=True, patience=1.0)
    with pytest.raises(Exception, match="(?i)run .*not found|no run"):
        t.set_tags("0" * 32, {"a": "b"})  # a bad run id is a bug to report, not an outage to wait out
    assert t.pending == 0


def test_sync_history_writes_only_missing_epochs(tmp_path: Path) -> None:
    """What a trial writes at its end from Ray Train's own record of the epochs, when MLflow missed some."""
    from apt_ray.sweep.trial import sync_history

    t = mt.Tracker(mt.check_tracking_uri(f"sqlite:///{tmp_path}/m.db"))
    run_id = t.create_run(t.experiment_id("sync"), "t", {})
    t.log_metrics(run_id, {"val_vqa_score": 1.0, "train_loss": 3.0}, step=1)
    history = [{"epoch": e, "val_vqa_score": float(e), "train_loss": 4.0 - e, "global_step": 6 * e, "lr": 1e-3} for e in (1, 2, 3)]
    assert sync_history(t, run_id, history) == 2
    assert sync_history(t, run_id, history) == 0
    steps = sorted(m.step for m in t.client.get_metric_history(run_id, "val_vqa_score"))
    assert steps == [1, 2, 3] and sorted(m.step for m in t.client.get_metric_history(run_id, "global_step")) == [2, 3]


def test_sync_history_writes_the_score_and_the_tasks_metrics(tmp_path: Path) -> None:
    """Today's loop reports val_score and the task's own metrics (VQA: val_vqa_score): both are written; an epoch
    an older version logged under the old name only counts as logged."""
    from apt_ray.sweep.trial import sync_history

    t = mt.Tracker(mt.check_tracking_uri(f"sqlite:///{tmp_path}/m.db"))
    run_id = t.create_run(t.experiment_id("sync"), "t", {})
    t.log_metrics(run_id, {"val_vqa_score": 1.0, "train_loss": 3.0}, step=1)  # epoch 1, by an older version
    history = [{"epoch": e, "val_score": float(e), "val_vqa_score": float(e), "train_loss": 4.0 - e, "global_step": 6 * e,
                "lr": 1e-3, "samples_per_s": 5.0} for e in (1, 2, 3)]
    assert sync_history(t, run_id, history) == 2
    assert sync_history(t, run_id, history) == 0
    assert sorted(m.step for m in t.client.get_metric_history(run_id, "val_score")) == [2, 3]
    assert sorted(m.step for m in t.client.get_metric_history(run_id, "val_vqa_score")) == [1, 2, 3]


# -- safe defaults ---------------------------------------------------------------------------

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


def test_local_ray_starts_without_a_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local Ray instance the project starts opens no dashboard (nothing listens beyond Ray's own ports)."""
    import ray

    from apt_ray.train import distributed as dist

    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    assert dist.connect(None) is True
    assert seen.get("include_dashboard") is False
    assert seen.get("dashboard_host", "127.0.0.1") == "127.0.0.1"


def test_printed_server_commands_bind_loopback() -> None:
    assert "--host 127.0.0.1" in mt.ui_command("sqlite:////tmp/m.db")
    with pytest.raises(UserError) as err:
        mt.check_tracking_uri(f"http://127.0.0.1:{free_port()}", timeout=2)
    assert "mlflow server --host 127.0.0.1" in str(err.value)


def test_no_secrets_in_logged_params_or_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials in the tracking URI or in tokens in the environment reach no MLflow param, tag, manifest or
    trial context."""
    from apt_ray.config import TrainConfig
    from apt_ray.sweep.run import _parent_params
    from apt_ray.sweep.spec import StudySpec
    from apt_ray.sweep.trial import SweepContext, child_tags, trial_params
    from apt_ray.train.distributed import worker_env

    secret = "s3cr3t-Pa55"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    uri = f"http://alice:{secret}@mlflow.example:5000"
    spec = StudySpec(tracking_uri=uri, fixed={"epochs": 1})
    ctx = SweepContext(tracking_uri=uri, experiment_id="1", parent_run_id="p", git_commit="c", train_storage=str(tmp_path),
                       env=worker_env())
    logged = [_parent_params(spec, spec.space()), trial_params(TrainConfig(), ctx), child_tags(ctx, "t1", "running"),
              mt.safe_params({"note": f"see {uri}", "api_token": secret, "db_password": secret}), ctx.env]
    assert secret not in json.dumps(logged, default=str)
    assert secret not in mt.redact(uri) and "alice" not in mt.redact(uri)


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
