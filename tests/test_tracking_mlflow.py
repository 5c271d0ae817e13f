"""MLflow helpers: URI handling, fail-fast checks, cluster refusal, which errors are worth retrying."""

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


def test_transient_errors_are_told_apart() -> None:
    """What the writer retries (a locked sqlite file, a dropped connection) and what it skips (a refused value)."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    assert mt.is_transient(sqlite3.OperationalError("database is locked"))
    assert mt.is_transient(requests.ConnectionError("connection refused"))
    assert mt.is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not mt.is_transient(ValueError("bad value"))
    assert not mt.is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))


def test_finite_metrics() -> None:
    assert mt.finite_metrics({"a": 1, "b": float("nan"), "c": True, "d": "x", "e": 2.5}) == {"a": 1.0, "e": 2.5}


def test_git_commit_is_known_here() -> None:
    commit = mt.git_commit()
    assert commit == "unknown" or len(commit.split("-")[0]) == 40
