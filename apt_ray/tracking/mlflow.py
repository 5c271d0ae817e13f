"""MLflow for sweeps: tracking-URI checks, the parent run of a sweep, nested child runs of trials.

Everything goes through an explicit ``MlflowClient`` (no global active run), so
the driver, Tune trial processes and Ray Train controllers on any node can log
to the same runs by id. Calls are retried on transient errors (a busy sqlite
file, a server that hiccups).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

from apt_ray.errors import UserError

log = logging.getLogger("apt_ray.tracking")
T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
TRIAL_TAG = "trial_id"
STATUS_TAG = "status"
COMMIT_TAG = "git_commit"
KIND_TAG = "apt_ray.kind"
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "credential", "auth")


# -- URIs -------------------------------------------------------------------------

def scheme_of(uri: str) -> str:
    return urlsplit(uri).scheme.lower()


def normalize_uri(uri: str | None, cwd: str | Path | None = None) -> str:
    """The default when empty; sqlite and file paths made absolute (trial processes run elsewhere)."""
    uri = (uri or DEFAULT_TRACKING_URI).strip()
    base = Path(cwd or os.getcwd())
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        return "sqlite:///" + str(path if path.is_absolute() else (base / path).resolve())
    if uri.startswith("file:"):
        path = Path(urlsplit(uri).path)
        return (path if path.is_absolute() else (base / path).resolve()).as_uri()
    if "://" not in uri:  # a bare directory: MLflow's file store
        path = Path(uri).expanduser()
        return (path if path.is_absolute() else (base / path).resolve()).as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    """A store only this machine can write: a sqlite file or a file directory."""
    return scheme_of(uri) in ("sqlite", "file", "")


def redact(uri: str) -> str:
    """The URI without user/password (safe to print or log)."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri  # untouched: urlunsplit would turn sqlite:////abs into sqlite://abs
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc="***@" + netloc))


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this tracking URI (bound to 127.0.0.1)."""
    if scheme_of(uri) in ("http", "https"):
        return f"open {redact(uri)} in a browser (the MLflow server is already running)"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


# -- retries ----------------------------------------------------------------------

_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED"}


def is_transient(error: BaseException) -> bool:
    """Errors worth retrying: a locked sqlite file, a dropped connection, a 5xx/429 answer."""
    text = str(error).lower()
    if "database is locked" in text or "database table is locked" in text or "connection reset" in text:
        return True
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        if isinstance(error, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover - requests ships with mlflow
        pass
    code = getattr(error, "error_code", None)
    return code in _TRANSIENT_CODES


def retry(fn: Callable[[], T], attempts: int = 6, delay: float = 0.5) -> T:
    """``fn()`` retried with exponential backoff while it fails transiently."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered by is_transient
            if i == attempts - 1 or not is_transient(e):
                raise
            log.warning("MLflow call failed (%s), retrying in %.1fs", str(e).splitlines()[0][:200], delay * 2**i)
            time.sleep(delay * 2**i)
    raise AssertionError("unreachable")


# -- reachability and cluster checks ------------------------------------------------

def _http_probe(uri: str, timeout: float) -> None:
    base = uri.rstrip("/")
    last: Exception | None = None
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            with urllib.request.urlopen(base + path, timeout=timeout) as r:  # noqa: S310 - user-given tracking server
                if r.status < 400:
                    return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                return  # it answers; credentials are MLflow's business (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN)
            last = e
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(
                f"the MLflow tracking server {redact(uri)} cannot be reached ({reason}). Start it (e.g. "
                f"`mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`) or pass "
                f"--tracking-uri with the right address; the default sqlite:///mlflow.db needs no server."
            ) from None
    raise UserError(f"{redact(uri)} answers but is not an MLflow tracking server ({last}): check the --tracking-uri address and port.")


def check_tracking_uri(uri: str, timeout: float = 10.0) -> str:
    """Fail fast (``UserError``) when the store cannot be reached or created; returns the normalized URI."""
    uri = normalize_uri(uri)
    scheme = scheme_of(uri)
    if scheme in ("http", "https"):
        _http_probe(uri, timeout)
    elif scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            raise UserError(f"tracking URI {uri} is not a sqlite file URI: write it as sqlite:///relative.db or sqlite:////absolute/path.db.")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the folder of the MLflow database {path} ({e.strerror}): pick a writable path.") from None
        if not os.access(path.parent, os.W_OK):
            raise UserError(f"the folder of the MLflow database {path} is not writable: pick a writable path for --tracking-uri.")
    try:
        retry(lambda: _client(uri).search_experiments(max_results=1), attempts=3)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any store failure is reported as one message
        raise UserError(f"cannot use the MLflow tracking URI {redact(uri)} ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
                        "Check the URI, that the server or database is up, and its credentials.") from None
    return uri


def refuse_local_store_on_cluster(uri: str, node_ips: list[str]) -> None:
    """A sqlite/file store (or a loopback server) cannot serve trials on other machines: refuse with the fix."""
    if len(node_ips) <= 1:
        return
    fix = ("start an MLflow server that every node can reach, e.g. on the head node "
           "`mlflow server --host <head-node-ip> --port 5000 --backend-store-uri sqlite:///mlflow.db`, "
           "and pass --tracking-uri http://<head-node-ip>:5000")
    if is_local_store(uri):
        raise UserError(
            f"the tracking URI {uri} is a file on this machine, but the Ray cluster has {len(node_ips)} nodes: trials on the other "
            f"nodes could not write there. Instead {fix}."
        )
    host = urlsplit(uri).hostname or ""
    if host in _LOOPBACK and len(set(node_ips)) > 1:
        raise UserError(f"the tracking URI {redact(uri)} points at this machine's loopback address, but the Ray cluster spans "
                        f"{len(set(node_ips))} machines: {fix}.")


# -- provenance -------------------------------------------------------------------

def git_commit(path: str | Path | None = None) -> str:
    """The commit of the code in use (with ``-dirty`` when there are local changes), or ``unknown``."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "") if sha else "unknown"


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Params as strings: secret-looking keys dropped, credentials in URLs redacted, long values cut."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if any(w in key.lower() for w in _SECRET_WORDS):
            continue
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if "://" in text and "@" in text:
            text = redact(text)
        out[key] = text[:6000]
    return out


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Only the finite numeric entries (MLflow refuses NaN on some stores; bools are not metrics)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


# -- runs -------------------------------------------------------------------------

def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class Tracker:
    """Parent and child runs of one sweep on one tracking URI (picklable: the client is made lazily)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._c: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "_c": None}

    @property
    def client(self) -> Any:
        if self._c is None:
            self._c = _client(self.uri)
        return self._c

    # experiments and runs
    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created if missing (artifacts beside a sqlite database)."""
        found = retry(lambda: self.client.get_experiment_by_name(name))
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise UserError(f"MLflow experiment '{name}' is deleted: restore it (mlflow experiments restore) or pick another --experiment.")
            return found.experiment_id
        db = sqlite_path(self.uri)
        location = (db.parent / "mlartifacts").as_uri() if db else None
        try:
            return retry(lambda: self.client.create_experiment(name, artifact_location=location))
        except Exception:  # noqa: BLE001 - another process created it first
            found = retry(lambda: self.client.get_experiment_by_name(name))
            if found is None:
                raise
            return found.experiment_id

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> str:
        run = retry(lambda: self.client.create_run(experiment_id, tags=tags, run_name=name))
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark a run RUNNING again (resumed sweeps and trials)."""
        retry(lambda: self.client.update_run(run_id, status="RUNNING"))

    def find_child(self, experiment_id: str, parent_id: str, trial_id: str) -> Any | None:
        """The child run of ``trial_id`` under ``parent_id``, if one exists."""
        query = f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
        runs = retry(lambda: self.client.search_runs([experiment_id], filter_string=query, max_results=5))
        return runs[0] if runs else None

    def children(self, experiment_id: str, parent_id: str) -> list[Any]:
        """All child runs of a parent."""
        query = f"tags.`{PARENT_TAG}` = '{parent_id}'"
        return list(retry(lambda: self.client.search_runs([experiment_id], filter_string=query, max_results=5000)))

    def last_step(self, run_id: str, key: str) -> int:
        """The highest step logged for ``key`` (-1 when none): resumed trials skip what is logged."""
        history = retry(lambda: self.client.get_metric_history(run_id, key))
        return max((m.step for m in history), default=-1)

    # logging
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in safe_params(params).items()]
        existing = retry(lambda: self.client.get_run(run_id)).data.params
        items = [p for p in items if p.key not in existing]  # resumed runs: params are immutable
        for i in range(0, len(items), 100):
            retry(lambda chunk=items[i:i + 100]: self.client.log_batch(run_id, params=chunk))

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
        if items:
            retry(lambda: self.client.log_batch(run_id, metrics=items))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        if items:
            retry(lambda: self.client.log_batch(run_id, tags=items))

    def log_json(self, run_id: str, obj: Any, artifact_file: str) -> None:
        retry(lambda: self.client.log_dict(run_id, obj, artifact_file))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        retry(lambda: self.client.log_text(run_id, text, artifact_file))

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """``rows`` as an MLflow table (shown in the UI's artifact view) and as CSV beside it."""
        import pandas as pd

        frame = pd.DataFrame(rows)
        retry(lambda: self.client.log_table(run_id, frame, artifact_file))
        with tempfile.TemporaryDirectory() as d:
            csv = Path(d) / (Path(artifact_file).stem + ".csv")
            frame.to_csv(csv, index=False)
            self.log_file(run_id, csv)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run with FINISHED, FAILED or KILLED."""
        retry(lambda: self.client.set_terminated(run_id, status=status))

    def run(self, run_id: str) -> Any:
        return retry(lambda: self.client.get_run(run_id))
