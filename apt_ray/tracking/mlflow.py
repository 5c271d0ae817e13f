"""MLflow basics: tracking URIs (normalised, redacted, checked before a sweep starts), MLflow's HTTP retry
settings, what is safe to log, and the code version. Writing is :mod:`apt_ray.tracking.writer`'s job."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from apt_ray.errors import UserError

log = logging.getLogger("apt_ray.tracking")

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


# MLflow's own HTTP retries, as the sweep's writer uses them (a user's own MLFLOW_HTTP_REQUEST_* settings win): about
# 7 s of backoff per write rides out a hiccup; past that the write waits in the spool and is tried again every few
# seconds, without holding up the writes' order or the sweep.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# The start-of-sweep check: one quick attempt, so an unreachable URI is refused within seconds.
PROBE_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def use_http_retries() -> None:
    """MLflow's HTTP retry settings for this process (only where the user has set none)."""
    for key, value in HTTP_RETRIES.items():
        os.environ.setdefault(key, value)


@contextmanager
def _env(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


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


# The stores a sweep can log to ("": a plain directory, normalised to file:).
SUPPORTED_SCHEMES = ("sqlite", "file", "", "http", "https", "databricks")


def check_scheme(uri: str) -> None:
    """Refuse a tracking URI of a kind apt_ray does not log to, naming the kinds it does (nothing is contacted)."""
    scheme = scheme_of(normalize_uri(uri))
    if scheme not in SUPPORTED_SCHEMES:
        raise UserError(
            f"tracking URI {redact(uri)} has the unsupported scheme '{scheme}': use sqlite:///path.db (the default is "
            "sqlite:///mlflow.db), file:/path or a plain directory, http:// or https:// (an MLflow tracking server), "
            "or databricks."
        )


def check_tracking_uri(uri: str, timeout: float = 10.0) -> str:
    """Fail fast (``UserError``) when the store cannot be reached or created; returns the normalized URI."""
    check_scheme(uri)
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
        with _env(PROBE_HTTP):
            client(uri).search_experiments(max_results=1)
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

def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (every write of a sweep goes through :class:`~apt_ray.tracking.writer.RunWriter`)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)
