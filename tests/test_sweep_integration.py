"""Real sweeps: Ray Tune + Optuna + Ray Train trials, logged to MLflow on sqlite and on an HTTP server.

Tiny data and random backbone weights keep every trial to seconds of training;
the Ray and MLflow machinery is the real one. Subprocess sweeps get their own
Ray temp dir (RAY_TMPDIR) so they never join another Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "studies" / "sweep_meter.py"
TINY = {"pretrained": False, "num_train_images": 48, "num_val_images": 16, "questions_per_image": 2, "batch_size": 8, "rank": 4}
SPACE = {
    "num_prompts": {"type": "int", "low": 1, "high": 256, "log": True},
    "depth": {"type": "int", "low": 1, "high": 4},
    "placement": {"type": "categorical", "choices": ["bottom", "top"]},
    "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def study_file(tmp_path: Path, **fields: Any) -> Path:
    data = {"name": "it", "model": "tiny-meter", "method": "apt", "fixed": {**TINY, "epochs": 1}, "search_space": SPACE,
            "num_trials": 3, "concurrency": 2, "seed": 0, **fields}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def subprocess_env(cache: Path, ray_tmp: Path) -> dict[str, str]:
    """The sweep's environment: a private Ray temp dir, the session's data cache, and fast Ray Train polling
    (as in conftest.py's ``ray_cluster``)."""
    return {**os.environ, "APT_RAY_CACHE": str(cache), "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT),
            "RAY_DEDUP_LOGS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@pytest.fixture()
def ray_tmp() -> Iterator[Path]:
    """A short private Ray temp dir (unix socket paths must stay short)."""
    path = Path(tempfile.mkdtemp(prefix="aptrt", dir="/tmp"))
    yield path


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, local artifact destination) that a test can stop and
    start again on the same port, with the same stores."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 180) -> None:
        exe = Path(sys.executable).parent / "mlflow"
        log = open(self.root / f"server-{self.starts}.log", "w")
        self.starts += 1
        self.proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(self.port), "--backend-store-uri",
                                      f"sqlite:///{self.root}/m.db", "--artifacts-destination", str(self.root / "art"), "--workers", "1"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not start: {(self.root / f'server-{self.starts - 1}.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to the server's own process group (its uvicorn workers), SIGKILL if it lingers."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- checks shared by the sweeps --------------------------------------------------------

def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str, experiment: str) -> tuple[Any, list[Any]]:
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("apt_ray.kind") == "sweep"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], children


def check_tracking(uri: str, experiment: str, epochs: int) -> tuple[Any, list[Any]]:
    """Parent/child structure, params, per-epoch history, FLOPs artifact, tags, sweep-level artifacts."""
    c = client(uri)
    parent, children = runs_of(uri, experiment)
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "finished"
    assert parent.data.params["space.num_prompts"] == "int 1..256 (log)"
    assert parent.data.params["objectives"] == "max:val_score, min:additional_gmacs"
    top = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"study_spec.json", "search_space.json", "pareto_front.json", "trials.json", "figures"} <= top
    figures = {a.path for a in c.list_artifacts(parent.info.run_id, "figures")}
    # the sweep's own figures, and Optuna's for two objectives once 2 trials completed
    assert figures == {"figures/pareto_front.png", "figures/score_vs_prompts.png", "figures/optuna_pareto_front.png",
                       "figures/optuna_hypervolume_history.png"}
    front = json.loads(Path(c.download_artifacts(parent.info.run_id, "pareto_front.json")).read_text())
    assert front["data"], "the Pareto front is empty"
    trained = [r for r in children if r.data.tags["status"] == "finished"]
    assert trained
    for run in children:
        tags = run.data.tags
        assert tags["trial_id"] and tags["git_commit"] and tags["status"] in ("finished", "diverged", "over_budget", "failed")
        for key in ("method", "num_prompts", "rank", "depth", "placement", "lr", "seed", "workers"):
            assert key in run.data.params, (key, run.data.params)
        assert "additional_gmacs" in run.data.metrics and "updated_params" in run.data.params  # a constant: a param
    for run in trained:
        assert run.info.status == "FINISHED"
        history = c.get_metric_history(run.info.run_id, "val_score")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
        # the VQA task's own metric is logged beside the score, epoch by epoch, with the same values
        own = c.get_metric_history(run.info.run_id, "val_vqa_score")
        assert sorted((m.step, m.value) for m in own) == sorted((m.step, m.value) for m in history)
        assert {"train_loss", "samples_per_s", "step_time_ms"} <= set(run.data.metrics)
        # what the trial actually used: its tokenizer and image processing, recipe and trainable groups
        params = run.data.params
        assert {"tokenizer", "image_mean", "image_std", "image_size", "recipe", "trainable_groups"} <= set(params), params
        assert params["recipe"] == "embedded" and "method" in params["trainable_groups"]
        profile = json.loads(Path(c.download_artifacts(run.info.run_id, "flops_profile.json")).read_text())
        assert profile["num_prompts"] == int(run.data.params["num_prompts"]) and profile["depth"] == int(run.data.params["depth"])
        assert len(profile["per_site"]) == profile["sites"] > 0
        assert {"site", "layer", "analytic_gmacs", "measured_gmacs", "updated_params"} <= set(profile["per_site"][0])
        assert profile["additional_gmacs"] == pytest.approx(run.data.metrics["additional_gmacs"])
    return parent, children


def tune_trial_ids(sweep_dir: Path) -> set[str]:
    """The trials that reached training: each has its directory (named by its id) in the sweep's Tune experiment."""
    return {p.name for p in (sweep_dir / "tune").iterdir() if p.is_dir()}


# -- bad resources ------------------------------------------------------------------------

def test_resources_the_cluster_cannot_provide(ray_cluster: None, tmp_path: Path) -> None:
    from apt_ray.errors import UserError
    from apt_ray.sweep import load_study_spec, run_study

    spec = load_study_spec(study_file(tmp_path), {"resources.gpus_per_worker": 1})
    with pytest.raises(UserError, match="GPU"):
        run_study(spec, tracking_uri=f"sqlite:///{tmp_path}/m.db", storage_path=str(tmp_path / "s"))
    spec = load_study_spec(study_file(tmp_path), {"resources.cpus_per_worker": 64})
    with pytest.raises(UserError, match="holds at most 0"):
        run_study(spec, tracking_uri=f"sqlite:///{tmp_path}/m.db", storage_path=str(tmp_path / "s2"))


# -- what a researcher reads: the console and the MLflow dashboard of a small sweep --------------------

THIRD_PARTY = ("Token authentication is enabled", "SearchGenerator", "tensorboard", "View run", "A new study created",
               "Creating initial MLflow database tables", "pid=", "Checkpoint successfully created", "INFO")


def test_console_and_dashboard_of_a_small_sweep(ray_cache: Path, ray_tmp: Path, tmp_path: Path) -> None:
    """A 2-trial sweep through the study script: its console holds its own lines only (a line per finished trial with
    the counts, elapsed time, ETA and best score; the efficiency; the front and the commands to browse it), none of
    Ray's, Tune's, MLflow's or Optuna's; and its MLflow runs read back as a dashboard: the experiment opens in the
    training view, child runs are named by their knobs, the parent's note holds the Pareto table and links the best
    trial (tagged), each child has one GMACs metric with its constants as params, its per-site table and the figures."""
    cfg = study_file(tmp_path, name="it-dash", num_trials=2, fixed={**TINY, "epochs": 1, "rank": 4})
    uri = f"sqlite:///{tmp_path}/m.db"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(cfg), "--tracking-uri", uri, "--storage-path",
                           str(tmp_path / "sweep")], cwd=tmp_path, env=subprocess_env(ray_cache, ray_tmp), capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert not [line for line in out.splitlines() if any(t in line for t in THIRD_PARTY)], out
    done = [line for line in out.splitlines() if line.startswith("trial ") and " done: " in line]
    assert len(done) == 2 and "2/2 done" in done[-1] and "elapsed" in done[-1] and "best " in done[-1], out
    assert "ETA" in done[0] and "sweep efficiency" in out and "Pareto front" in out and "mlflow ui" in out

    c = client(uri)
    exp = c.get_experiment_by_name("it-dash")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent, children = runs_of(uri, "it-dash")
    note = parent.data.tags["mlflow.note.content"]
    assert "| trial | p | r | depth |" in note and "Best trial: [" in note and "2 finished" in note
    best = [r for r in children if r.data.tags.get("best_trial") == "true"]
    assert len(best) == 1 and best[0].info.run_id in note and parent.data.tags["best_run_id"] == best[0].info.run_id
    for run in children:
        p = run.data.params
        assert run.info.run_name == f"apt-p{p['num_prompts']}-d{p['depth']}-{p['placement']}-lr{float(p['lr']):.1e}"
        assert [k for k in run.data.metrics if "gmacs" in k] == ["additional_gmacs"]  # one GMACs metric ...
        assert {"updated_params", "base_gmacs", "sites", "trainable_params", "startup_s"} <= set(p)  # ... constants as params
        assert "lr" not in run.data.metrics and "additional_pct_of_base" in run.data.metrics
        assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"flops_profile.json", "flops_per_site.json"}
    figures = {a.path for a in c.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/pareto_front.png", "figures/score_vs_prompts.png"} <= figures


# -- multi-node cluster, through the study script -------------------------------------------

CLUSTER = """
import sys, ray
from ray.cluster_utils import Cluster
args = dict(num_cpus=1, include_dashboard=False)
cluster = Cluster(initialize_head=True, head_node_args=args)
cluster.add_node(**args)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


@pytest.fixture()
def two_node_cluster(ray_cache: Path, ray_tmp: Path) -> Iterator[str]:
    """A local Ray cluster of two nodes (1 CPU each) on this machine, owned by a helper process. (Ray itself turns a
    127.0.0.1 address into the node's IP when connecting, so the nodes use that IP.)"""
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=subprocess_env(ray_cache, ray_tmp), start_new_session=True)
    address = proc.stdout.readline().strip()
    assert address, "the test cluster did not start"
    try:
        yield address
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def first_child_metric(uri: str, experiment: str) -> bool:
    """Whether some trial's child run has logged a metric yet (False while the experiment does not exist)."""
    try:
        c = client(uri)
        exp = c.get_experiment_by_name(experiment)
        return bool(exp and any(r.data.metrics for r in c.search_runs([exp.experiment_id], "tags.`apt_ray.kind` = 'trial'")))
    except Exception:  # noqa: BLE001 - the server is busy starting the sweep
        return False


OUTAGE_S = 90  # longer than MLflow's own HTTP retries: the writes wait in the sweep's spool


def test_multi_node_cluster_needs_a_server(two_node_cluster: str, mlflow_server: MlflowServer, ray_cache: Path, ray_tmp: Path,
                                           tmp_path: Path) -> None:
    """Through --address: sqlite is refused (with the fix); the HTTP server works for a 2-trial sweep (both trials at
    once), and an outage of the server mid-sweep (stopped once the first trial logged a metric, started again on the
    same port 90 s later: longer than MLflow's HTTP retries) loses nothing: the driver's writes wait in the sweep's
    spool and are replayed in order, every trial's per-epoch metrics and FLOPs artifact are there, and the sweep
    finishes."""
    cfg = study_file(tmp_path, name="it-http", num_trials=2)
    env = subprocess_env(ray_cache, ray_tmp)
    base = [sys.executable, str(SCRIPT), "--config", str(cfg), "--address", two_node_cluster]

    refused = subprocess.run(base + ["--storage-path", str(tmp_path / "refused")], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=180)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "2 nodes" in refused.stderr and "mlflow server" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "mlflow.db").exists() or not runs_exist(f"sqlite:///{tmp_path}/mlflow.db")

    uri = mlflow_server.uri
    log_path = tmp_path / "sweep.log"
    with open(log_path, "w") as log:
        sweep = subprocess.Popen(base + ["--tracking-uri", uri, "--storage-path", str(tmp_path / "sweep")], cwd=tmp_path, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not first_child_metric(uri, "it-http"):
                assert sweep.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "no trial logged a metric in time"
                time.sleep(1)
            mlflow_server.stop()  # the outage: trials go on training, their writes wait
            time.sleep(OUTAGE_S)
            assert sweep.poll() is None, "the sweep stopped during the MLflow outage:\n" + log_path.read_text()[-3000:]
            mlflow_server.start()
            code = sweep.wait(timeout=600)
        finally:
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGKILL)
    out = log_path.read_text()
    assert code == 0, out[-5000:]
    # Ray forwards its own processes' logs, each line tagged "(Name pid=N)"; under load Ray Train's autoscaling
    # client logs a harmless timeout traceback there. Ours must have none.
    ours = "\n".join(line for line in out.splitlines() if " pid=" not in line)
    assert "Pareto front" in out and "val score" in out and "+GMACs" in out and "Traceback" not in ours
    assert "is unreachable" in out, "no trial met the outage: the test did not test it"  # the buffering warning
    parent, children = check_tracking(uri, "it-http", epochs=1)  # per-epoch history and flops_profile.json of every trial
    assert len(children) == 2 and all(r.data.tags["status"] == "finished" for r in children)
    assert "answers again" in out  # the spool was replayed ...
    for run in children:  # ... in order: every run ended after its metrics were measured
        stamps = [m.timestamp for key in ("val_score", "train_loss") for m in client(uri).get_metric_history(run.info.run_id, key)]
        assert stamps and max(stamps) <= run.info.end_time
    assert len({r.data.tags["ray_node_id"] for r in children}) >= 1


def runs_exist(uri: str) -> bool:
    c = client(uri)
    return any(c.search_runs([e.experiment_id]) for e in c.search_experiments())


# -- interrupted sweep, resumed -----------------------------------------------------------------

def sql_count(db: Path, query: str) -> int:
    """A count from an MLflow sqlite file another process is writing, read-only: an MlflowClient opened while
    the sweep still creates the schema would run the migrations a second time and fail."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(query).fetchone()[0]
    except sqlite3.Error:  # the schema is not there yet
        return 0


FINISHED_RUNS = "SELECT count(*) FROM runs WHERE status = 'FINISHED'"
RUNNING_WITH_METRICS = ("SELECT count(DISTINCT r.run_uuid) FROM runs r JOIN metrics m ON m.run_uuid = r.run_uuid "
                        "WHERE r.status = 'RUNNING' AND m.key = 'train_loss'")  # a trial past its first epoch


def test_killed_sweep_with_budget_and_divergence_resumes(ray_cache: Path, ray_tmp: Path, tmp_path: Path) -> None:
    """A messy sweep on sqlite, one trial at a time. Enqueued first: an over-budget configuration (pruned, never
    trained), one with a huge learning rate (diverges: run FAILED, status diverged; the sweep goes on) and a sane one;
    Optuna proposes the last. The driver is SIGKILLed (the process only: its local Ray goes down with it) once a trial
    finished and the next one is training; --resume finishes the sweep: exactly the 3 requested trials ran, one MLflow
    run per trial, the finished ones not run again, the cut-off one resumed (or ended FAILED with a reason)."""
    import optuna

    from apt_ray.profile.cost import trial_cost
    from apt_ray.sweep.spec import StudySpec

    budget = trial_cost(StudySpec(fixed=TINY).train_config({"num_prompts": 32, "depth": 2})).additional_gmacs
    space = {**SPACE, "lr": {"type": "categorical", "choices": [0.003, 1.0e9]}}
    points = [{"num_prompts": 200, "depth": 4, "placement": "top", "lr": 0.003},  # over budget
              {"num_prompts": 4, "depth": 1, "placement": "bottom", "lr": 1.0e9},  # diverges
              {"num_prompts": 2, "depth": 2, "placement": "top", "lr": 0.003}]
    cfg = study_file(tmp_path, name="it-resume", search_space=space, initial_points=points, num_trials=3, concurrency=1,
                     fixed={**TINY, "epochs": 2}, max_additional_gmacs=budget)
    uri = f"sqlite:///{tmp_path}/m.db"
    db = tmp_path / "m.db"
    sweep = tmp_path / "sweep"
    env = subprocess_env(ray_cache, ray_tmp)
    cmd = [sys.executable, str(SCRIPT), "--config", str(cfg), "--tracking-uri", uri, "--storage-path", str(sweep)]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 400
        while not (sql_count(db, FINISHED_RUNS) and sql_count(db, RUNNING_WITH_METRICS)):
            if first.poll() is not None:
                pytest.fail("the sweep ended before it could be killed:\n" + (tmp_path / "first.log").read_text()[-3000:])
            if time.time() > deadline:
                os.killpg(first.pid, signal.SIGKILL)
                pytest.fail("the last trial did not start in time")
            time.sleep(1)
        os.kill(first.pid, signal.SIGKILL)  # the driver alone, no chance to clean up
        assert first.wait(timeout=60) == -signal.SIGKILL
    before = {r.data.tags["trial_id"]: r for r in runs_of(uri, "it-resume")[1]}
    finished = [r for r in before.values() if r.info.status == "FINISHED"]
    assert len(finished) == 1, [(r.data.tags, r.info.status) for r in before.values()]

    resumed = subprocess.run([sys.executable, str(SCRIPT), "--storage-path", str(sweep), "--resume"],  # URI from the manifest
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Pareto front" in resumed.stdout
    parent, children = check_tracking(uri, "it-resume", epochs=2)
    trained = [r for r in children if r.data.tags["status"] != "over_budget"]
    ids = Counter(r.data.tags["trial_id"] for r in children)
    assert set(ids.values()) == {1}, ids  # one run per trial: nothing duplicated
    status = Counter(r.data.tags["status"] for r in trained)
    # exactly the requested trials: 2 finished and the diverged one (a cut-off trial Tune had not saved yet would be
    # run anew under a new id, its first run ended FAILED with the reason)
    assert status["finished"] == 2 and status["diverged"] == 1 and len(trained) == 3 + status["failed"], status
    after = {r.data.tags["trial_id"]: r for r in children}
    for run in finished:  # the finished trial was not run again
        tid = run.data.tags["trial_id"]
        assert after[tid].info.run_id == run.info.run_id and after[tid].info.end_time == run.info.end_time
    for tid, run in before.items():  # the cut-off trial kept its run: resumed to the end, or FAILED with the reason
        if run.data.tags["status"] == "over_budget":
            continue
        assert after[tid].info.run_id == run.info.run_id
        assert after[tid].info.status == "FINISHED" or (after[tid].info.status == "FAILED" and after[tid].data.tags["failure_reason"])
    assert all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in children)

    for run in children:
        if run.data.tags["status"] == "diverged":  # reported, and the sweep went on
            assert run.info.status == "FAILED" and "diverged" in run.data.tags["failure_reason"]
            assert float(run.data.params["lr"]) == 1.0e9
        elif run.data.tags["status"] == "over_budget":  # recorded, never trained
            assert run.info.status == "KILLED" and run.data.metrics["additional_gmacs"] > budget
            assert "val_score" not in run.data.metrics and "val_vqa_score" not in run.data.metrics and "over the FLOPs budget" in run.data.tags["failure_reason"]
        else:
            assert run.data.metrics["additional_gmacs"] <= budget * (1 + 1e-9)
    assert tune_trial_ids(sweep) == {r.data.tags["trial_id"] for r in trained}  # only within-budget configurations reached Ray Train
    startups = [float(r.data.params["startup_s"]) for r in trained if "startup_s" in r.data.params]
    assert startups and all(0 < s < 600 for s in startups)  # seconds from Tune starting the trial to its first step

    study = optuna.load_study(study_name="it-resume", storage=f"sqlite:///{sweep}/optuna.db")
    states = Counter(t.user_attrs.get("status", t.state.name) for t in study.trials)
    assert states["over_budget"] == len(children) - len(trained) >= 1, states
    assert states["COMPLETE"] == status["finished"] and states["failed"] == status["diverged"], states
    proposals = [tuple(sorted(t.params.items())) for t in study.trials if t.user_attrs.get("status") not in ("duplicate",)
                 and t.state.name != "RUNNING"]
    assert len(set(proposals)) == len(proposals) == len(children) - status["failed"]  # distinct configurations, each with its run
