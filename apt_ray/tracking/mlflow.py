"""MLflow for sweeps: tracking-URI checks, the parent run of a sweep, nested child runs of trials.

Everything goes through an explicit ``MlflowClient`` (no global active run), so
the driver, Tune trial processes and Ray Train controllers on any node can log
to the same runs by id. Calls are retried on transient errors (a busy sqlite
file, a server that hiccups) with capped exponential backoff for up to
``APT_RAY_MLFLOW_PATIENCE_S`` seconds (default 300).

Trial-side trackers (``Tracker(uri, buffered=True)``) never hold training up:
while the store is unreachable their writes (metrics, params, tags, JSON
artifacts, run ends) queue up in order and are written when it answers again;
``close()`` waits for it up to the patience, then warns and saves what is left
as JSON lines beside the trial's Ray results.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass
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
_NOT_SECRET = ("tokenizer",)  # holds a secret word but names the text tokenizer a trial used (a path or hub id)


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


_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@]+@")


def redact_text(text: str) -> str:
    """``text`` with the user:password part of every URL in it replaced by ``***``."""
    return _CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", text)


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


PATIENCE_ENV = "APT_RAY_MLFLOW_PATIENCE_S"
DEFAULT_PATIENCE_S = 300.0
# Trial-side processes buffer instead of blocking, so MLflow's own HTTP retries (7, ~4 minutes) are cut short
# there; a user's own MLFLOW_HTTP_REQUEST_* settings win.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def patience_s() -> float:
    """How long to wait for an unreachable tracking store (``APT_RAY_MLFLOW_PATIENCE_S``, default 300 s)."""
    text = os.environ.get(PATIENCE_ENV, "")
    try:
        return max(0.0, float(text)) if text else DEFAULT_PATIENCE_S
    except ValueError:
        return DEFAULT_PATIENCE_S


def first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


def retry_for(fn: Callable[[], T], patience: float, delay: float = 0.5, max_delay: float = 10.0) -> T:
    """``fn()`` retried with capped exponential backoff for up to ``patience`` seconds while it fails transiently."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered by is_transient
            if not is_transient(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("MLflow call failed (%s), retrying in %.1fs", first_line(e), delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)


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
        if key.lower() not in _NOT_SECRET and any(w in key.lower() for w in _SECRET_WORDS):
            continue
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        out[key] = redact_text(text)[:6000]
    return out


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Only the finite numeric entries (MLflow refuses NaN on some stores; bools are not metrics)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


# -- runs -------------------------------------------------------------------------

def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@dataclass
class Write:
    """One write to a run, kept as plain data so it can wait in a buffer (and be saved as JSON)."""

    kind: str  # metrics | params | tags | json | text | finish | reopen
    run_id: str
    payload: Any = None


class Tracker:
    """Parent and child runs of one sweep on one tracking URI (picklable: the client is made lazily).

    Reads, and the writes of an unbuffered tracker, are retried for up to ``patience`` seconds. A ``buffered``
    tracker (trial side) queues writes while the store is unreachable and writes them, in order, once it answers.
    """

    def __init__(self, uri: str, *, buffered: bool = False, patience: float | None = None) -> None:
        self.uri = uri
        self.buffered = buffered
        self.patience = patience_s() if patience is None else patience
        self._c: Any = None
        self._init_buffer()

    def _init_buffer(self) -> None:
        self._pending: deque[Write] = deque()
        self._lock = threading.RLock()  # the profile thread and the trial share one tracker
        self._backoff, self._next_try = 0.0, 0.0
        self._outage_since: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "buffered": self.buffered, "patience": self.patience}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.uri = state["uri"]
        self.buffered = state.get("buffered", False)
        self.patience = state.get("patience", patience_s())
        self._c = None
        self._init_buffer()

    @property
    def client(self) -> Any:
        if self._c is None:
            if self.buffered and scheme_of(self.uri) in ("http", "https"):
                for key, value in FAIL_FAST_HTTP.items():
                    os.environ.setdefault(key, value)
            self._c = _client(self.uri)
        return self._c

    def _call(self, fn: Callable[[], T]) -> T:
        return retry_for(fn, self.patience)

    # experiments and runs
    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created if missing (artifacts beside a sqlite database)."""
        found = self._call(lambda: self.client.get_experiment_by_name(name))
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise UserError(f"MLflow experiment '{name}' is deleted: restore it (mlflow experiments restore) or pick another --experiment.")
            return found.experiment_id
        db = sqlite_path(self.uri)
        location = (db.parent / "mlartifacts").as_uri() if db else None
        try:
            return self._call(lambda: self.client.create_experiment(name, artifact_location=location))
        except Exception:  # noqa: BLE001 - another process created it first
            found = self._call(lambda: self.client.get_experiment_by_name(name))
            if found is None:
                raise
            return found.experiment_id

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> str:
        """A new run (this needs the store: its id comes from there)."""
        run = self._call(lambda: self.client.create_run(experiment_id, tags=tags, run_name=name))
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark a run RUNNING again (resumed sweeps and trials)."""
        self._submit(Write("reopen", run_id))

    def find_child(self, experiment_id: str, parent_id: str, trial_id: str) -> Any | None:
        """The child run of ``trial_id`` under ``parent_id``, if one exists."""
        query = f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
        runs = self._call(lambda: self.client.search_runs([experiment_id], filter_string=query, max_results=5))
        return runs[0] if runs else None

    def children(self, experiment_id: str, parent_id: str) -> list[Any]:
        """All child runs of a parent."""
        query = f"tags.`{PARENT_TAG}` = '{parent_id}'"
        return list(self._call(lambda: self.client.search_runs([experiment_id], filter_string=query, max_results=5000)))

    def metric_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which ``key`` was logged."""
        return {m.step for m in self._call(lambda: self.client.get_metric_history(run_id, key))}

    def last_step(self, run_id: str, key: str) -> int:
        """The highest step logged for ``key`` (-1 when none): resumed trials skip what is logged."""
        return max(self.metric_steps(run_id, key), default=-1)

    # logging
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self._submit(Write("params", run_id, safe_params(params)))

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        now = int(time.time() * 1000)  # the time of the measurement, also when it is written later
        items = [[k, v, now, step] for k, v in finite_metrics(metrics).items()]
        if items:
            self._submit(Write("metrics", run_id, items))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        items = {k: redact_text(str(v))[:5000] for k, v in tags.items() if v is not None}
        if items:
            self._submit(Write("tags", run_id, items))

    def log_json(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self._submit(Write("json", run_id, {"obj": obj, "file": artifact_file}))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._submit(Write("text", run_id, {"text": text, "file": artifact_file}))

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """``rows`` as an MLflow table (shown in the UI's artifact view) and as CSV beside it."""
        import pandas as pd

        frame = pd.DataFrame(rows)
        self._call(lambda: self.client.log_table(run_id, frame, artifact_file))
        with tempfile.TemporaryDirectory() as d:
            csv = Path(d) / (Path(artifact_file).stem + ".csv")
            frame.to_csv(csv, index=False)
            self.log_file(run_id, csv)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run with FINISHED, FAILED or KILLED."""
        self._submit(Write("finish", run_id, status))

    def run(self, run_id: str) -> Any:
        return self._call(lambda: self.client.get_run(run_id))

    # writing, buffered or not
    def _apply(self, w: Write) -> None:
        from mlflow.entities import Metric, Param, RunTag

        c = self.client
        if w.kind == "metrics":
            c.log_batch(w.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in w.payload])
        elif w.kind == "params":
            existing = c.get_run(w.run_id).data.params  # resumed runs: params are immutable, so skip those logged
            items = [Param(k, v) for k, v in w.payload.items() if k not in existing]
            for i in range(0, len(items), 100):
                c.log_batch(w.run_id, params=items[i:i + 100])
        elif w.kind == "tags":
            c.log_batch(w.run_id, tags=[RunTag(k, v) for k, v in w.payload.items()])
        elif w.kind == "json":
            c.log_dict(w.run_id, w.payload["obj"], w.payload["file"])
        elif w.kind == "text":
            c.log_text(w.run_id, w.payload["text"], w.payload["file"])
        elif w.kind == "finish":
            c.set_terminated(w.run_id, status=w.payload)
        elif w.kind == "reopen":
            c.update_run(w.run_id, status="RUNNING")
        else:
            raise ValueError(f"unknown MLflow write {w.kind!r}")

    def _submit(self, w: Write) -> None:
        if not self.buffered:
            self._call(lambda: self._apply(w))
            return
        with self._lock:
            self._pending.append(w)
            self._drain(current=w)

    def _drain(self, current: Write | None = None, force: bool = False) -> None:
        """Write what is queued, oldest first; on a transient failure keep it queued and back off."""
        if not self._pending or (not force and time.monotonic() < self._next_try):
            return
        while self._pending:
            w = self._pending[0]
            try:
                self._apply(w)
            except Exception as e:  # noqa: BLE001 - filtered by is_transient
                if not is_transient(e):
                    self._pending.popleft()
                    if w is current:
                        raise
                    log.warning("dropped a buffered MLflow %s write to run %s: %s", w.kind, w.run_id, first_line(e))
                    continue
                self._backoff = min(max(1.0, 2 * self._backoff), 30.0)
                self._next_try = time.monotonic() + self._backoff
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning("MLflow at %s is unreachable (%s): buffering writes and retrying with backoff; training goes on",
                                redact(self.uri), first_line(e))
                return
            self._pending.popleft()
        if self._outage_since is not None:
            log.warning("MLflow at %s answers again after %.0fs: buffered writes written", redact(self.uri),
                        time.monotonic() - self._outage_since)
            self._outage_since = None
        self._backoff = 0.0

    @property
    def pending(self) -> int:
        """Writes waiting for the store."""
        return len(self._pending)

    def flush(self, timeout: float | None = None) -> bool:
        """Write everything queued, waiting up to ``timeout`` (default: the patience); True when nothing is left."""
        deadline = time.monotonic() + (self.patience if timeout is None else timeout)
        while True:
            with self._lock:
                self._drain(force=True)
                if not self._pending:
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(max(self._backoff, 0.5), left))

    def close(self, spill_to: str | Path | None = None, timeout: float | None = None) -> bool:
        """Flush; if the store stays unreachable, warn and save the unwritten writes as JSON lines in ``spill_to``."""
        if self.flush(timeout):
            return True
        with self._lock:
            left = list(self._pending)
        runs = ", ".join(sorted({w.run_id for w in left}))
        message = (f"MLflow at {redact(self.uri)} stayed unreachable: {len(left)} write(s) to run(s) {runs} were not logged "
                   f"after {self.patience if timeout is None else timeout:.0f}s")
        if spill_to is not None:
            path = Path(spill_to)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as f:
                    for w in left:
                        f.write(json.dumps(asdict(w), default=str) + "\n")
                message += f"; they are saved in {path}"
            except OSError as e:
                message += f" (saving them to {path} failed: {e.strerror})"
        log.warning("%s. The trial's results are in Ray's storage either way.", message)
        return False
