"""The one MLflow writer of a sweep: runs named by local keys, writes applied in order by one thread.

Every write is first appended to a spool file in the sweep's directory and then
applied by a background thread through an ``MlflowClient`` (with MLflow's own
HTTP retries). A write MLflow cannot take after its retries stays at the head of
the spool and is tried again every few seconds; later writes wait behind it, so
an outage of any length loses nothing and the order is kept. Once every write is
applied the spool is emptied. A driver killed mid-outage leaves the spool on
disk, and the resumed sweep replays it before anything else.

Runs are addressed by keys the caller picks (``sweep``, a Tune trial id,
``over_budget_0003``); the ledger beside the spool maps each key to its MLflow
run id once the run exists, so writes can be queued for a run MLflow has not
created yet. The ledger is the one place where trial and run meet.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from apt_ray.io import write_json_atomic
from apt_ray.tracking.mlflow import client, finite_metrics, first_line, is_transient, redact, redact_text, safe_params, sqlite_path

log = logging.getLogger("apt_ray.tracking")
SPOOL = "mlflow_spool.jsonl"
LEDGER = "mlflow_runs.json"
KEY_TAG = "apt_ray.run_key"
RETRY_S = 5.0
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (artifacts beside a sqlite database)."""
    from apt_ray.errors import UserError

    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment '{name}' is deleted: restore it (mlflow experiments restore) or pick another --experiment.")
    if found is None:
        db = sqlite_path(uri)
        try:
            c.create_experiment(name, artifact_location=(db.parent / "mlartifacts").as_uri() if db else None)
        except Exception:  # noqa: BLE001 - another process created it first
            pass
        found = c.get_experiment_by_name(name)
    if found.tags.get(EXPERIMENT_KIND_TAG) is None:  # opens in the UI's model-training view, not its GenAI one
        c.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return found.experiment_id


class RunWriter:
    """Queued, ordered, durable writes to the runs of one experiment (see the module docstring). Use
    :meth:`open`: one writer per spool directory and process."""

    _open: dict[Path, "RunWriter"] = {}

    @classmethod
    def open(cls, uri: str, experiment: str, directory: str | Path) -> "RunWriter":
        """The writer of ``directory`` in this process, started on first use, writing to MLflow experiment
        ``experiment`` (created if missing; a directory that has written before keeps its experiment's id)."""
        path = Path(directory).resolve()
        writer = cls._open.get(path)
        if writer is None:
            writer = cls._open[path] = cls(uri, experiment, path)
        return writer

    def __init__(self, uri: str, experiment: str, directory: str | Path) -> None:
        self.uri, self.experiment = uri, experiment
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Condition()
        ledger = self._read_ledger()
        self.experiment_id: str = ledger.get("experiment_id") or experiment_id(uri, experiment)
        self.runs: dict[str, str] = ledger.get("runs", {})
        self.marks: dict[str, dict[str, Any]] = ledger.get("marks", {})  # what callers noted per run (epochs, closed)
        applied = int(ledger.get("applied", 0))
        self._queue: deque[dict[str, Any]] = deque(op for op in self._read_spool() if op["seq"] > applied)
        self._seq = max([applied, *(op["seq"] for op in self._queue)])
        self._applied = applied
        self._replayed = {op["seq"] for op in self._queue}  # ops of an earlier process: their run may exist already
        if self._queue:
            log.warning("replaying %d MLflow write(s) left in %s", len(self._queue), self.dir / SPOOL)
        self._outage_since: float | None = None
        self._stop = False
        self._client: Any = None
        self._thread = threading.Thread(target=self._work, name="mlflow-writer", daemon=True)
        self._thread.start()

    # -- what callers write ---------------------------------------------------------
    def create(self, key: str, name: str, tags: dict[str, Any], parent: str | None = None) -> None:
        """A run for ``key`` (nested under the run of key ``parent``); nothing when the key has one."""
        with self._lock:
            if key in self.runs or self._queued(key, "create"):
                return
            self._put("create", key, {"name": name, "tags": {k: redact_text(str(v))[:5000] for k, v in tags.items()},
                                      "parent": parent})

    def params(self, key: str, params: dict[str, Any]) -> None:
        if params:
            self._put("params", key, safe_params(params))

    def metrics(self, key: str, metrics: dict[str, Any], step: int = 0) -> None:
        now = int(time.time() * 1000)  # the time of the measurement, also when it is written later
        items = [[k, v, now, step] for k, v in finite_metrics(metrics).items()]
        if items:
            self._put("metrics", key, items)

    def tags(self, key: str, tags: dict[str, Any]) -> None:
        items = {k: redact_text(str(v))[:5000] for k, v in tags.items() if v is not None}
        if items:
            self._put("tags", key, items)

    def json(self, key: str, obj: Any, artifact_file: str) -> None:
        self._put("json", key, {"obj": obj, "file": artifact_file})

    def file(self, key: str, path: str | Path, artifact_path: str | None = None) -> None:
        """A file artifact (it must stay where it is until written: keep it in the sweep's directory)."""
        self._put("file", key, {"path": str(Path(path).resolve()), "dir": artifact_path})

    def table(self, key: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table (shown in the UI's artifact view)."""
        self._put("table", key, {"rows": rows, "file": artifact_file})

    def dataset(self, key: str, name: str, source: str, digest: str, context: str = "training") -> None:
        """A dataset the run used (``mlflow.log_input``): its name, where it is, and a digest of what defines it."""
        self._put("input", key, {"name": name, "source": source, "digest": digest, "context": context})

    def finish(self, key: str, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED."""
        self._put("finish", key, status)

    def reopen(self, key: str) -> None:
        """Mark the run RUNNING again (a resumed sweep or trial)."""
        self._put("reopen", key, None)

    def mark(self, key: str, **values: Any) -> None:
        """Note facts about a run (kept in the ledger): the last epoch logged, whether it was closed."""
        with self._lock:
            self.marks.setdefault(key, {}).update(values)
            self._save_ledger()

    # -- waiting and reading --------------------------------------------------------------
    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is applied (at most ``timeout`` s); True when none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(timeout=1.0 if left is None else min(1.0, left))
        return True

    def run_id(self, key: str, timeout: float | None = None) -> str | None:
        """The MLflow run id of ``key`` (waiting up to ``timeout`` s for its creation)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while key not in self.runs and self._queued(key, "create"):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._lock.wait(timeout=1.0 if left is None else min(1.0, left))
            return self.runs.get(key)

    def children(self, parent: str) -> list[Any]:
        """The MLflow runs nested under the run of key ``parent``."""
        parent_id = self.runs[parent]
        query = f"tags.`mlflow.parentRunId` = '{parent_id}'"
        return list(self.client.search_runs([self.experiment_id], filter_string=query, max_results=5000))

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread; what is left stays in the spool for the next writer on this directory."""
        done = self.flush(timeout)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=5)
        type(self)._open.pop(self.dir.resolve(), None)
        if not done:
            log.warning("MLflow at %s did not take %d write(s): they are kept in %s and written when this sweep is resumed "
                        "(--resume)", redact(self.uri), self.pending, self.dir / SPOOL)
        return done

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    # -- the queue ------------------------------------------------------------------------
    def _queued(self, key: str, kind: str) -> bool:
        return any(op["key"] == key and op["kind"] == kind for op in self._queue)

    def _put(self, kind: str, key: str, payload: Any) -> None:
        with self._lock:
            self._seq += 1
            op = {"seq": self._seq, "kind": kind, "key": key, "payload": payload}
            with (self.dir / SPOOL).open("a") as f:
                f.write(json.dumps(op, default=str) + "\n")
            self._queue.append(op)
            self._lock.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                op = self._queue[0]
            try:
                self._apply(op)
            except Exception as e:  # noqa: BLE001 - transient: keep it at the head and try again; else drop it
                if is_transient(e):
                    self._outage(e)
                    with self._lock:
                        self._lock.wait(timeout=RETRY_S)
                    continue
                log.warning("MLflow refused a %s write to run %s (%s): skipped", op["kind"], op["key"], first_line(e))
            self._done(op)

    def _outage(self, error: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("MLflow at %s is unreachable (%s): writes wait in %s and are written in order when it answers; "
                        "the trials go on", redact(self.uri), first_line(error), self.dir / SPOOL)

    def _done(self, op: dict[str, Any]) -> None:
        with self._lock:
            self._queue.popleft()
            self._applied = op["seq"]
            if not self._queue:
                (self.dir / SPOOL).write_text("")
            self._save_ledger()
            self._lock.notify_all()
        if self._outage_since is not None:
            log.warning("MLflow at %s answers again after %.0f s: the waiting writes are written", redact(self.uri),
                        time.monotonic() - self._outage_since)
            self._outage_since = None

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, key, payload, c = op["kind"], op["key"], op["payload"], self.client
        if kind == "create":
            run_id = self._existing(key) if op["seq"] in self._replayed else None
            if run_id is None:
                tags = {**payload["tags"], KEY_TAG: key}
                if payload["parent"] is not None:
                    tags["mlflow.parentRunId"] = self.runs[payload["parent"]]
                run_id = c.create_run(self.experiment_id, tags=tags, run_name=payload["name"]).info.run_id
            with self._lock:
                self.runs[key] = run_id
            return
        run_id = self.runs.get(key)
        if run_id is None:
            raise ValueError(f"no run was created for key {key!r}")
        if kind == "metrics":
            c.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in payload])
        elif kind == "params":
            existing = c.get_run(run_id).data.params  # params never change: a resumed run skips those it has
            items = [Param(k, v) for k, v in payload.items() if k not in existing]
            for i in range(0, len(items), 100):
                c.log_batch(run_id, params=items[i:i + 100])
        elif kind == "tags":
            c.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()])
        elif kind == "json":
            c.log_dict(run_id, payload["obj"], payload["file"])
        elif kind == "file":
            c.log_artifact(run_id, payload["path"], payload["dir"])
        elif kind == "table":
            import pandas as pd

            c.log_table(run_id, pd.DataFrame(payload["rows"]), payload["file"])
        elif kind == "input":
            c.log_inputs(run_id, datasets=[_dataset_input(payload)])
        elif kind == "finish":
            c.set_terminated(run_id, status=payload)
        elif kind == "reopen":
            c.update_run(run_id, status="RUNNING")
        else:
            raise ValueError(f"unknown MLflow write {kind!r}")

    def _existing(self, key: str) -> str | None:
        """The run an earlier process created for ``key`` before it could note it in the ledger."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
        return runs[0].info.run_id if runs else None

    # -- the ledger -----------------------------------------------------------------------
    def _read_ledger(self) -> dict[str, Any]:
        path = self.dir / LEDGER
        return json.loads(path.read_text()) if path.is_file() else {}

    def _read_spool(self) -> list[dict[str, Any]]:
        path = self.dir / SPOOL
        if not path.is_file():
            return []
        ops = []
        for line in path.read_text().splitlines():
            try:
                ops.append(json.loads(line))
            except ValueError:  # a line cut short by a killed process: the write never happened
                log.warning("skipped an unreadable line of %s", path)
        return ops

    def _save_ledger(self) -> None:
        write_json_atomic(self.dir / LEDGER, {"experiment_id": self.experiment_id, "runs": self.runs, "marks": self.marks,
                                              "applied": self._applied})


def _dataset_input(payload: dict[str, str]) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source = payload["source"]
    if Path(source).expanduser().exists() or "://" in source:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": a local path is a local path
            resolved = resolve_dataset_source(source)
    else:  # a Hugging Face hub id
        resolved = HTTPDatasetSource(f"https://huggingface.co/datasets/{source}")
    dataset = MetaDataset(resolved, name=payload["name"], digest=payload["digest"])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", payload["context"])])
