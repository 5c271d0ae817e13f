"""The sweep's one MLflow writer and its Tune callback, on a real sqlite store, without Ray running.

The writer's promise: writes are applied in the order they were made, none is
lost while MLflow is unreachable (they wait in the spool, also across a killed
driver), and a write MLflow refuses does not hold the others up. The callback's:
one nested run per trial, each epoch logged once, the right end status.
"""

from __future__ import annotations

import json
import logging
import pickle
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from apt_ray.tracking import mlflow as mt
from apt_ray.tracking import writer as w


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def store(tmp_path: Path) -> tuple[str, str]:
    uri = mt.check_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    return uri, w.experiment_id(uri, "unit")


@pytest.fixture()
def fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable server fails each write at once (no MLflow backoff) and the writer retries every 0.2 s."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(w, "RETRY_S", 0.2)


def test_experiment_is_found_not_created_twice(store: tuple[str, str], tmp_path: Path) -> None:
    uri, exp = store
    assert w.experiment_id(uri, "unit") == exp
    assert mt.client(uri).get_experiment(exp).artifact_location == (tmp_path / "mlartifacts").as_uri()  # beside the database


def test_nested_runs_params_metrics_artifacts(store: tuple[str, str], tmp_path: Path) -> None:
    uri, exp = store
    writer = w.RunWriter.open(uri, "unit", tmp_path / "sweep")
    assert w.RunWriter.open(uri, "unit", tmp_path / "sweep") is writer  # one writer per directory
    writer.create("sweep", "sweep-x", {mt.KIND_TAG: "sweep"})
    writer.create("t1", "apt-p8", {mt.TRIAL_TAG: "t1"}, parent="sweep")
    writer.params("t1", {"lr": 0.1, "num_prompts": 8, "api_token": "s3cret"})
    writer.params("t1", {"lr": 0.1, "rank": 2})  # a resumed run: logged params are skipped, new ones added
    for epoch in (1, 2):
        writer.metrics("t1", {"val_score": 10.0 * epoch, "nan": float("nan")}, step=epoch)
    writer.json("t1", {"per_site": [1, 2]}, "flops_profile.json")
    writer.table("sweep", [{"trial": "t1", "val_score": 20.0}], "trials.json")
    writer.finish("t1")
    assert writer.close(timeout=60)

    c = mt.client(uri)
    child = c.get_run(writer.runs["t1"])
    assert child.info.status == "FINISHED" and child.info.run_name == "apt-p8"
    assert child.data.tags["mlflow.parentRunId"] == writer.runs["sweep"]
    assert child.data.params == {"lr": "0.1", "num_prompts": "8", "rank": "2"}  # no secret-looking key
    assert [(m.step, m.value) for m in c.get_metric_history(child.info.run_id, "val_score")] == [(1, 10.0), (2, 20.0)]
    assert "nan" not in child.data.metrics
    assert json.loads(Path(c.download_artifacts(child.info.run_id, "flops_profile.json")).read_text()) == {"per_site": [1, 2]}
    assert {a.path for a in c.list_artifacts(writer.runs["sweep"])} == {"trials.json"}
    assert (tmp_path / "sweep" / w.SPOOL).read_text() == ""  # all written: the spool is empty
    assert json.loads((tmp_path / "sweep" / w.LEDGER).read_text())["runs"] == writer.runs


def test_an_outage_loses_nothing_and_keeps_the_order(store: tuple[str, str], tmp_path: Path, fast_http: None,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Runs exist on the store; then a driver writes while MLflow is unreachable (its writes return at once and wait
    in the spool), and is stopped with writes left; a later driver on the same directory, with MLflow back, writes
    them in the order they were made, with the times they were measured at."""
    uri, exp = store
    directory = tmp_path / "sweep"
    first = w.RunWriter.open(uri, "unit", directory)
    first.create("sweep", "sweep-x", {})
    first.create("t1", "t1", {}, parent="sweep")
    assert first.close(timeout=60)

    down = w.RunWriter.open(f"http://127.0.0.1:{free_port()}", "unit", directory)  # its experiment's id: from the ledger
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="apt_ray.tracking"):
        down.params("t1", {"lr": 0.01})
        for epoch in (1, 2, 3):
            down.metrics("t1", {"val_score": float(epoch)}, step=epoch)
            time.sleep(0.01)
        down.tags("t1", {mt.STATUS_TAG: "finished"})
        down.finish("t1")
        assert time.monotonic() - t0 < 2, "writes must not wait for MLflow"
        assert down.close(timeout=1) is False
    assert "is unreachable" in caplog.text and "kept in" in caplog.text
    spooled = [json.loads(line) for line in (directory / w.SPOOL).read_text().splitlines()]
    assert [op["kind"] for op in spooled] == ["params", "metrics", "metrics", "metrics", "tags", "finish"]
    assert mt.client(uri).get_run(first.runs["t1"]).info.status == "RUNNING"

    back = w.RunWriter.open(uri, "unit", directory)
    assert back.close(timeout=60)
    run = mt.client(uri).get_run(back.runs["t1"])
    assert run.info.status == "FINISHED" and run.data.tags[mt.STATUS_TAG] == "finished" and run.data.params == {"lr": "0.01"}
    history = mt.client(uri).get_metric_history(run.info.run_id, "val_score")
    assert [m.step for m in history] == [1, 2, 3] and [m.value for m in history] == [1.0, 2.0, 3.0]
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] < 2000  # measured then, written later
    assert (directory / w.SPOOL).read_text() == ""


def test_a_refused_write_does_not_hold_the_others_up(store: tuple[str, str], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    uri, exp = store
    writer = w.RunWriter.open(uri, "unit", tmp_path / "sweep")
    writer.create("t1", "t1", {})
    with caplog.at_level(logging.WARNING, logger="apt_ray.tracking"):
        writer.metrics("t1", {"bad name!?": 1.0})  # MLflow refuses the name: skipped with a warning
        writer.metrics("t1", {"good": 2.0})
        assert writer.close(timeout=60)
    assert "refused a metrics write" in caplog.text
    assert mt.client(uri).get_run(writer.runs["t1"]).data.metrics == {"good": 2.0}


def test_a_run_created_before_a_kill_is_not_created_twice(store: tuple[str, str], tmp_path: Path) -> None:
    """A driver killed after MLflow created a run but before the ledger said so: the replayed create finds it."""
    uri, exp = store
    directory = tmp_path / "sweep"
    directory.mkdir()
    made = mt.client(uri).create_run(exp, tags={w.KEY_TAG: "t1"}, run_name="t1").info.run_id
    op = {"seq": 1, "kind": "create", "key": "t1", "payload": {"name": "t1", "tags": {}, "parent": None}}
    (directory / w.SPOOL).write_text(json.dumps(op) + "\n" + json.dumps({"seq": 2, "kind": "finish", "key": "t1", "payload": "FINISHED"}) + "\n")
    writer = w.RunWriter.open(uri, "unit", directory)
    assert writer.close(timeout=60)
    assert writer.runs["t1"] == made
    runs = mt.client(uri).search_runs([exp])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


# -- the Tune callback -----------------------------------------------------------------------------

TINY = {"pretrained": False, "num_train_images": 16, "num_val_images": 8, "questions_per_image": 2, "batch_size": 8, "rank": 4}


def trial(trial_id: str, config: dict[str, Any], last: dict[str, Any] | None = None, error_file: Path | None = None) -> Any:
    """What the callback reads of a Tune trial; its error, as Tune leaves it, in the driver's local error file."""
    return SimpleNamespace(trial_id=trial_id, config=config, last_result=last or {}, error_file=error_file, get_error=lambda: None)


def make_callback(uri: str, exp: str, directory: Path) -> Any:
    from apt_ray.sweep.callback import MlflowSweepCallback
    from apt_ray.sweep.spec import StudySpec

    spec = StudySpec(model="tiny-meter", fixed={**TINY, "epochs": 2},
                     search_space={"num_prompts": {"type": "int", "low": 1, "high": 64}, "depth": {"type": "int", "low": 1, "high": 4}})
    writer = w.RunWriter.open(uri, "unit", directory)
    writer.create("sweep", "sweep-x", {})
    return MlflowSweepCallback(spec, uri, exp, directory, commit="abc"), spec


def test_callback_writes_one_nested_run_per_trial(store: tuple[str, str], tmp_path: Path) -> None:
    from apt_ray.profile.cost import trial_cost
    from apt_ray.sweep.search import COST_KEY

    uri, exp = store
    cb, spec = make_callback(uri, exp, tmp_path / "sweep")
    config = {**spec.base_config(), "num_prompts": 8, "depth": 2}
    cost = trial_cost(spec.train_config(config))
    t1 = trial("t1", {**config, COST_KEY: {"additional_gmacs": cost.additional_gmacs, "updated_params": float(cost.updated_params)}})
    started = time.time()
    cb.on_trial_start(0, [], t1)
    for epoch in (1, 1, 2):  # a repeated epoch (a trial resumed from its checkpoint) is logged once
        cb.on_trial_result(0, [], t1, {"epoch": epoch, "val_score": 10.0 * epoch, "val_vqa_score": 10.0 * epoch, "train_loss": 1.0,
                                       "epoch_time_s": 0.5, "restarts": 0, "first_step_unix": started + 1.5, "ray_node_id": "n1",
                                       "used": {"tokenizer": "synthetic", "recipe": "embedded"}})
    cb.on_trial_result(0, [], t1, {"epoch": 2, "global_step": 7, "partial_epoch": True})  # a mid-epoch checkpoint: nothing
    t1.last_result = {"epoch": 2}
    cb.on_trial_complete(0, [], t1)
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1\nTraceback (most recent call last):\n  ...\n"
                     "apt_ray.train.loop.Diverged: training diverged at step 3: loss is nan.\n")
    t2 = trial("t2", {**config, "num_prompts": 4}, error_file=error)
    cb.on_trial_start(0, [], t2)
    cb.on_trial_error(0, [], t2)
    big = {**config, "num_prompts": 64}
    cb.over_budget(7, big, trial_cost(spec.train_config(big)).metrics(), "over the FLOPs budget: 1 > 0.5")
    cb.on_experiment_end([t1, t2])
    assert cb.writer.close(timeout=60)

    c = mt.client(uri)
    runs = {r.data.tags[mt.TRIAL_TAG]: r for r in c.search_runs([exp]) if mt.TRIAL_TAG in r.data.tags}
    assert set(runs) == {"t1", "t2", "over_budget_0007"}
    assert all(r.data.tags["mlflow.parentRunId"] == cb.writer.runs["sweep"] for r in runs.values())
    r1 = runs["t1"]
    assert r1.info.run_name == "apt-p8-d2" and r1.info.status == "FINISHED" and r1.data.tags[mt.STATUS_TAG] == "finished"
    assert [(m.step, m.value) for m in c.get_metric_history(r1.info.run_id, "val_score")] == [(1, 10.0), (2, 20.0)]
    # one cost metric (and the same as % of the base model); the epoch's figures as metrics; constants as params
    assert set(r1.data.metrics) == {"additional_gmacs", "additional_pct_of_base", "val_score", "val_vqa_score", "train_loss",
                                    "epoch_time_s"}
    assert r1.data.metrics["additional_gmacs"] == pytest.approx(cost.additional_gmacs)
    params = r1.data.params
    assert float(params["startup_s"]) == pytest.approx(1.5, abs=0.5) and int(params["updated_params"]) == cost.updated_params
    assert r1.data.metrics["additional_pct_of_base"] == pytest.approx(100 * cost.additional_gmacs / float(params["base_gmacs"]))
    assert params["num_prompts"] == "8" and params["workers"] == "1" and params["recipe"] == "embedded"
    assert params["tokenizer"] == "synthetic" and r1.data.tags["ray_node_id"] == "n1"
    profile = json.loads(Path(c.download_artifacts(r1.info.run_id, "flops_profile.json")).read_text())
    assert profile["additional_gmacs"] == pytest.approx(cost.additional_gmacs) and len(profile["per_site"]) == profile["sites"] == cost.sites > 0
    per_site = json.loads(Path(c.download_artifacts(r1.info.run_id, "flops_per_site.json")).read_text())  # an MLflow table
    assert per_site["columns"][:2] == ["site", "layer"] and len(per_site["data"]) == cost.sites
    assert "profile_mismatch" not in r1.data.tags
    (dataset,) = r1.inputs.dataset_inputs  # the data it trained on
    assert dataset.dataset.name == "vqa-synthetic" and dataset.dataset.digest
    r2 = runs["t2"]
    assert r2.info.status == "FAILED" and r2.data.tags[mt.STATUS_TAG] == "diverged"
    assert r2.data.tags["failure_reason"].startswith("training diverged at step 3")
    rb = runs["over_budget_0007"]
    assert rb.info.status == "KILLED" and rb.data.tags[mt.STATUS_TAG] == "over_budget" and "val_score" not in rb.data.metrics
    assert rb.data.metrics["additional_gmacs"] > r1.data.metrics["additional_gmacs"]


def test_callback_after_a_killed_driver(store: tuple[str, str], tmp_path: Path) -> None:
    """What the resumed sweep's callback does from the ledger: a trial that ended is not reopened or ended again; a
    trial Tune no longer knows is ended FAILED with the reason; a trial Tune restarts keeps its run."""
    uri, exp = store
    directory = tmp_path / "sweep"
    cb, spec = make_callback(uri, exp, directory)
    config = {**spec.base_config(), "num_prompts": 8, "depth": 2}
    done, cut, again = trial("done", config, {"epoch": 2}), trial("cut", {**config, "depth": 1}), trial("again", {**config, "depth": 3})
    for t in (done, cut, again):
        cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], again, {"epoch": 1, "val_score": 5.0})
    cb.on_trial_complete(0, [], done)
    assert cb.writer.flush(timeout=60)
    ended = mt.client(uri).get_run(cb.writer.runs["done"]).info.end_time

    cb.wait_for_profiles()
    restored = pickle.loads(pickle.dumps(cb))  # as Tune restores its callbacks: attached to the same writer
    assert restored.writer is cb.writer
    restored.on_trial_start(0, [], done)
    restored.on_trial_complete(0, [], done)
    restored.on_trial_start(0, [], again)
    restored.on_trial_result(0, [], again, {"epoch": 1, "val_score": 5.0})
    restored.on_trial_result(0, [], again, {"epoch": 2, "val_score": 6.0})
    again.last_result = {"epoch": 2}
    restored.on_trial_complete(0, [], again)
    restored.on_experiment_end([done, again])
    assert restored.writer.close(timeout=60)

    c = mt.client(uri)
    runs = {r.data.tags[mt.TRIAL_TAG]: r for r in c.search_runs([exp]) if mt.TRIAL_TAG in r.data.tags}
    assert len(runs) == 3
    assert runs["done"].info.end_time == ended and runs["done"].info.status == "FINISHED"
    assert runs["cut"].info.status == "FAILED" and "cut off" in runs["cut"].data.tags["failure_reason"]
    assert [m.step for m in c.get_metric_history(runs["again"].info.run_id, "val_score")] == [1, 2]
    assert runs["again"].info.status == "FINISHED"
