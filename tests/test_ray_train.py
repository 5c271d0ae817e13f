"""One trial on Ray Train (V2): same numbers as one process, CLI output, bad input, worker failure.

All runs share one local Ray instance (``ray_cluster``, 2 CPUs). The tiny config
has 64 images x 2 questions = 128 train questions, so 16 steps of global batch 8.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from apt_ray.cli import main
from apt_ray.config import build_train_config
from apt_ray.errors import UserError
from apt_ray.train.distributed import _host_port, _worker_error, make_trainer, run_distributed, workers_that_fit
from apt_ray.train.loop import train_loop_per_worker
from apt_ray.train.session import latest_checkpoint

pytestmark = pytest.mark.integration

TINY: dict[str, Any] = dict(model="tiny-vilt", pretrained=False, num_train_images=64, num_val_images=16,
                            questions_per_image=2, epochs=1, batch_size=8, seed=0, method="apt", num_prompts=4)
STEPS = 16
# Tolerances. The 2 workers' shards of a step are exactly the 1-process batch (same
# DistributedSampler permutation; rank r takes every 2nd index) and DDP averages the two
# half-batch gradients, so the weights agree up to float summation order: measured max
# |diff| 6e-7 after 16 AdamW steps (|w| up to 3.4); a sharding or averaging bug gives ~1e-2.
WEIGHT_ATOL = 1e-4
VAL_POINTS = 0.5  # measured: identical val scores (16 val images x 2 questions)
# The reported train_loss is rank 0's half of each batch only (the loop does not all-reduce
# it), so it differs from the 1-process mean by the halves' spread: measured 1.6e-3 relative.
LOSS_REL = 1e-2


def _overrides(**kw: Any) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, **kw}.items()]


def _weights(directory: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    assert out, f"no weights in {directory}"
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(ray_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same trial in one process, no Ray (world size 1, same sampler)."""
    out = tmp_path_factory.mktemp("reference")
    result = train_loop_per_worker({**TINY, "output_dir": str(out)})
    result["checkpoint_path"] = str(latest_checkpoint(out))
    return result


@pytest.fixture(scope="module")
def two_workers(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``apt-ray train --workers 2 --json-out ...`` on the shared Ray instance."""
    tmp = tmp_path_factory.mktemp("two_workers")
    out = tmp / "result.json"
    rc = main(["train", "--workers", "2", "--json-out", str(out), *_overrides(output_dir=str(tmp / "runs"))])
    assert rc == 0
    return json.loads(out.read_text())


def test_cli_workers_writes_json(two_workers: dict[str, Any]) -> None:
    for key in ("global_step", "val_vqa_score", "restarts", "world_size",
                "majority_baseline", "additional_gmacs", "updated_params", "history"):
        assert key in two_workers, key
    assert two_workers["world_size"] == 2
    assert two_workers["restarts"] == 0
    assert two_workers["global_step"] == STEPS
    assert two_workers["additional_gmacs"] > 0 and two_workers["updated_params"] > 0
    assert Path(two_workers["checkpoint_path"]).is_dir()
    # the throughput the scaling study sums counts both ranks' samples: one epoch is the whole training set
    epoch = two_workers["history"][-1]
    assert epoch["samples_per_s"] * epoch["train_time_s"] == pytest.approx(TINY["num_train_images"] * TINY["questions_per_image"])


def test_two_workers_match_one_process(two_workers: dict[str, Any], reference: dict[str, Any]) -> None:
    assert two_workers["global_step"] == reference["global_step"] == STEPS
    assert two_workers["updated_params"] == reference["updated_params"]
    assert two_workers["additional_gmacs"] == reference["additional_gmacs"]
    assert two_workers["majority_baseline"] == reference["majority_baseline"]
    assert abs(two_workers["val_vqa_score"] - reference["val_vqa_score"]) <= VAL_POINTS
    assert math.isclose(two_workers["train_loss"], reference["train_loss"], rel_tol=LOSS_REL)
    diff = _max_diff(_weights(two_workers["checkpoint_path"]), _weights(reference["checkpoint_path"]))
    assert diff <= WEIGHT_ATOL, f"2-worker weights differ from 1-process weights by {diff:g}"


def test_worker_failure_recovers(two_workers: dict[str, Any], ray_cluster: None, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`apt-ray train --workers 2 --max-failures 1` with APT_RAY_FAIL_AT_STEP=6: the last worker process dies abruptly
    (os._exit) after step 6; Ray Train restarts the group from the step-4 checkpoint, and the run ends at the same
    global step with the same metrics and weights as the uninterrupted run; --json-out records the restart."""
    from apt_ray.train.loop import FAIL_AT_STEP_ENV

    monkeypatch.setenv(FAIL_AT_STEP_ENV, "6")  # forwarded to the workers with the rest of the driver's settings
    out = tmp_path / "result.json"
    rc = main(["train", "--workers", "2", "--max-failures", "1", "--json-out", str(out),
               *_overrides(checkpoint_every_steps=4, output_dir=str(tmp_path))])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["restarts"] == 1
    assert result["global_step"] == two_workers["global_step"]
    assert abs(result["val_vqa_score"] - two_workers["val_vqa_score"]) <= 0.02
    assert math.isclose(result["train_loss"], two_workers["train_loss"], rel_tol=1e-3, abs_tol=0.02)
    diff = _max_diff(_weights(result["checkpoint_path"]), _weights(two_workers["checkpoint_path"]))
    assert diff <= WEIGHT_ATOL, f"resumed weights differ from the uninterrupted run by {diff:g}"


def test_unreachable_address_is_one_line_exit_2(ray_cache: Path) -> None:
    cmd = [sys.executable, "-m", "apt_ray.cli", "train", "--workers", "2", "--address", "127.0.0.1:1", *_overrides()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "127.0.0.1:1" in lines[0] and "cannot reach" in lines[0]


def test_more_workers_than_cpus_says_what_is_there(ray_cluster: None, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "--workers", "4", *_overrides()])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "CPU 2" in err and "at most 2" in err


def test_batch_must_split_over_workers(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "--workers", "3", *_overrides()])
    assert rc == 2
    assert "multiple of 3" in capsys.readouterr().err
    with pytest.raises(UserError, match="positive number"):
        run_distributed(build_train_config(overrides=TINY), workers=0)


def test_capacity_and_address_helpers() -> None:
    assert workers_that_fit({"CPU": 1.0}, [{"CPU": 2.0}, {"CPU": 3.0}]) == 5
    assert workers_that_fit({"CPU": 1.0, "GPU": 1.0}, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0}]) == 2
    assert workers_that_fit({"GPU": 2.0}, [{"GPU": 1.0}, {"GPU": 1.0}]) == 0
    assert _host_port("ray://head:10001") == ("head", 10001)
    assert _host_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert _host_port("auto") is None


def test_worker_user_error_reaches_the_driver() -> None:
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    wrapped = UserExceptionWithTraceback(UserError("bad checkpoint"), traceback_str="Traceback ...")
    found = _worker_error(WorkerGroupError("rank 1 failed", {0: RuntimeError("peer gone"), 1: wrapped}))
    assert isinstance(found, UserError) and str(found) == "bad checkpoint"
    assert _worker_error(WorkerGroupError("x", {0: RuntimeError("y")})) is None


def test_one_worker_trial_is_retried_from_its_checkpoint(ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's one-worker trial runs the loop in the Tune trial's own process. Killed abruptly after step 6 (its
    last checkpoint is at step 4), Tune retries it from that checkpoint: it ends at the same global step, with the
    same loss and score, as the same trial uninterrupted, and reports the restart."""
    from ray import tune

    from apt_ray.sweep.trial import TrialPlan, run_trial
    from apt_ray.train.distributed import worker_env
    from apt_ray.train.loop import FAIL_AT_STEP_ENV

    def fit(name: str) -> dict[str, Any]:
        plan = TrialPlan(max_failures=1, env=worker_env())
        grid = tune.Tuner(tune.with_resources(tune.with_parameters(run_trial, plan=plan), plan.trial_resources()),
                          param_space={**TINY, "checkpoint_every_steps": 4, "epochs": 2},
                          run_config=tune.RunConfig(storage_path=str(tmp_path), name=name, verbose=0,
                                                    failure_config=tune.FailureConfig(max_failures=1))).fit()
        assert grid[0].error is None, grid[0].error
        return grid[0].metrics

    clean = fit("clean")
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "6")
    retried = fit("retried")
    assert clean["restarts"] == 0 and retried["restarts"] == 1
    assert retried["global_step"] == clean["global_step"] and retried["epoch"] == clean["epoch"] == 2
    assert math.isclose(retried["train_loss"], clean["train_loss"], rel_tol=1e-3, abs_tol=0.02)
    assert abs(retried["val_score"] - clean["val_score"]) <= 0.02


def test_scaling_study_end_to_end(ray_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """studies/scaling_workers.py on the shared instance: a row per worker count (1 worker is the baseline, at
    efficiency 1), the same rows in --json and in the MLflow run (metrics at step = workers, every repeat kept)."""
    import mlflow

    from tests.helpers import load_script

    out, uri = tmp_path / "scaling.json", f"sqlite:///{tmp_path}/m.db"
    module = load_script("studies/scaling_workers.py")
    rc = module.main(["--workers", "2", "1", "--batch-size", "8", "--epochs", "2", "--repeats", "1", "--json", str(out),
                      "--tracking-uri", uri, "--storage-path", str(tmp_path / "runs"), "model=tiny-vilt", "num_train_images=32"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [r["workers"] for r in rows] == [1, 2]
    assert rows[0]["efficiency"] == 1.0 and all(r["samples_per_s"] > 0 for r in rows)
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["samples_per_s"] / (2 * rows[0]["samples_per_s"]))
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("scaling-workers").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "efficiency")
    assert sorted((m.step, m.value) for m in history) == [(r["workers"], pytest.approx(r["efficiency"])) for r in rows]
