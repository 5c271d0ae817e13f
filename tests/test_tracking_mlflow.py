"""MLflow helpers: URI handling, fail-fast checks, cluster refusal, retries, runs on a real sqlite store."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest

from apt_ray.errors import UserError
from apt_ray.tracking import mlflow as mt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_normalize_uri(tmp_path: Path) -> None:
    assert mt.normalize_uri(None, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert mt.normalize_uri("sqlite:///sub/m.db", tmp_path) == f"sqlite:///{tmp_path}/sub/m.db"
    assert mt.normalize_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert mt.normalize_uri("runs", tmp_path) == (tmp_path / "runs").as_uri()
    assert mt.normalize_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_local_stores_and_redaction() -> None:
    assert mt.is_local_store("sqlite:////x.db") and mt.is_local_store("file:///x") and not mt.is_local_store("http://h:1")
    assert mt.redact("https://alice:s3cret@host:5000/p") == "https://***@host:5000/p"
    assert mt.redact("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert "s3cret" not in str(mt.safe_params({"uri": "https://alice:s3cret@host", "api_token": "x", "lr": 0.1}))
    assert mt.safe_params({"api_token": "x", "lr": 0.1, "layers": [0, 1]}) == {"lr": "0.1", "layers": "[0, 1]"}


def test_ui_command_binds_loopback() -> None:
    cmd = mt.ui_command("sqlite:////tmp/m.db")
    assert cmd.startswith("mlflow ui --backend-store-uri sqlite:////tmp/m.db") and "--host 127.0.0.1" in cmd


def test_unreachable_server_fails_fast() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match="cannot be reached"):
        mt.check_tracking_uri(uri, timeout=3)


def test_not_an_mlflow_server(tmp_path: Path) -> None:
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match="not an MLflow tracking server"):
            mt.check_tracking_uri(f"http://127.0.0.1:{server.server_port}", timeout=3)
    finally:
        server.shutdown()


def test_unwritable_sqlite_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create the folder"):
        mt.check_tracking_uri(f"sqlite:///{blocker}/sub/m.db")


def test_local_store_refused_on_multi_node_cluster() -> None:
    mt.refuse_local_store_on_cluster("sqlite:////tmp/m.db", ["10.0.0.1"])  # one node: fine
    with pytest.raises(UserError) as err:
        mt.refuse_local_store_on_cluster("sqlite:////tmp/m.db", ["10.0.0.1", "10.0.0.2"])
    assert "2 nodes" in str(err.value) and "mlflow server" in str(err.value) and "--tracking-uri http://" in str(err.value)
    with pytest.raises(UserError, match="loopback"):
        mt.refuse_local_store_on_cluster("http://127.0.0.1:5000", ["10.0.0.1", "10.0.0.2"])
    mt.refuse_local_store_on_cluster("http://127.0.0.1:5000", ["127.0.0.1", "127.0.0.1"])  # a local multi-node test cluster
    mt.refuse_local_store_on_cluster("http://10.0.0.1:5000", ["10.0.0.1", "10.0.0.2"])


def test_retry_only_transient_errors() -> None:
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert mt.retry(flaky, delay=0.01) == "ok" and calls["n"] == 3

    def broken() -> None:
        calls["n"] += 1
        raise ValueError("bad value")

    calls["n"] = 0
    with pytest.raises(ValueError):
        mt.retry(broken, delay=0.01)
    assert calls["n"] == 1


def test_finite_metrics() -> None:
    assert mt.finite_metrics({"a": 1, "b": float("nan"), "c": True, "d": "x", "e": 2.5}) == {"a": 1.0, "e": 2.5}


def test_runs_on_sqlite(tmp_path: Path) -> None:
    uri = mt.check_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    tracker = mt.Tracker(uri)
    exp = tracker.experiment_id("unit")
    assert tracker.experiment_id("unit") == exp  # found, not created twice
    parent = tracker.create_run(exp, "sweep", {mt.KIND_TAG: "sweep"})
    child = tracker.create_run(exp, "t1", {mt.PARENT_TAG: parent, mt.TRIAL_TAG: "t1", mt.STATUS_TAG: "running"})
    tracker.log_params(child, {"lr": 0.1, "num_prompts": 8})
    tracker.log_params(child, {"lr": 0.1, "rank": 2})  # re-logging a param (resumed run) is skipped, new ones added
    for epoch in (1, 2):
        tracker.log_metrics(child, {"val_vqa_score": 10.0 * epoch, "nan": float("nan")}, step=epoch)
    tracker.log_json(child, {"per_site": [1, 2]}, "flops_profile.json")
    tracker.finish(child)
    assert tracker.find_child(exp, parent, "t1").info.run_id == child
    assert tracker.find_child(exp, parent, "t2") is None
    assert tracker.last_step(child, "val_vqa_score") == 2 and tracker.last_step(child, "missing") == -1
    run = tracker.run(child)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1", "num_prompts": "8", "rank": "2"}
    assert "nan" not in run.data.metrics
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the database
    assert [r.info.run_id for r in tracker.children(exp, parent)] == [child]


def test_git_commit_is_known_here() -> None:
    commit = mt.git_commit()
    assert commit == "unknown" or len(commit.split("-")[0]) == 40
