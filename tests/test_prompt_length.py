"""The prompt-length grid as a real sweep (Ray Tune + Ray Train + MLflow on sqlite), and the analysis notebook run on it.

One small grid (apt and deep_prompt x 2 prompt counts: 4 trials, tiny data, random backbone
weights, 1 epoch) is shared by every integration test of this module; kv_prompt in the grid
is covered by the spec tests in test_analysis.py (each extra trial costs ~30 s of Ray start-up here).
"""

from __future__ import annotations

from tests.helpers import load_script

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from apt_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"pretrained": False, "num_train_images": 48, "num_val_images": 16, "questions_per_image": 2, "batch_size": 8, "epochs": 1}
METHODS = ["apt", "deep_prompt"]
PROMPTS = [2, 32]
EXPERIMENT = "pl-it"


def study_script() -> ModuleType:
    return load_script("studies/prompt_length.py")


@pytest.fixture(scope="module")
def grid(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from apt_ray.sweep.grid import prompt_length_spec
    from apt_ray.sweep.run import run_study

    d = tmp_path_factory.mktemp("prompt_length")
    spec = prompt_length_spec(METHODS, PROMPTS, rank=4, depth=2, name="pl-it", fixed=dict(TINY), concurrency=2)
    return run_study(spec, tracking_uri=f"sqlite:///{d}/mlflow.db", experiment=EXPERIMENT, storage_path=str(d / "sweep"))


@pytest.mark.integration
def test_grid_trains_every_point_once_and_logs_its_cost(grid: Any) -> None:
    from apt_ray.analysis.runs import load_study_runs

    assert not grid.interrupted
    df = load_study_runs(grid.tracking_uri, EXPERIMENT).frame
    assert len(df) == len(METHODS) * len(PROMPTS)
    assert sorted(zip(df["method"], df["num_prompts"])) == sorted((m, p) for m in METHODS for p in PROMPTS)
    assert set(df["status"]) == {"finished"} and set(df["rank"]) == {4} and set(df["depth"]) == {2}
    cost = {(r.method, r.num_prompts): r.additional_gmacs for r in df.itertuples()}
    for m in METHODS:
        assert cost[(m, 2)] < cost[(m, 32)]
    assert all(cost[("apt", p)] < cost[("deep_prompt", p)] for p in PROMPTS)


@pytest.mark.integration
def test_parent_run_carries_the_sweep_figures(grid: Any) -> None:
    from mlflow.tracking import MlflowClient

    names = {Path(a.path).name for a in MlflowClient(grid.tracking_uri).list_artifacts(grid.parent_run_id, "figures")}
    # Optuna's Pareto front and hypervolume history too (two objectives); its importances need 10 trials, the grid has 4
    assert names == {"pareto_front.png", "score_vs_prompts.png", "optuna_pareto_front.png", "optuna_hypervolume_history.png"}
    assert all(p.stat().st_size > 1000 for p in grid.figures)


@pytest.mark.integration
def test_persisted_optuna_study_holds_exactly_the_grid(grid: Any) -> None:
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name="pl-it", storage=grid.optuna_storage)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted((t.params["method"], t.params["num_prompts"]) for t in done) == sorted((m, p) for m in METHODS for p in PROMPTS)


@pytest.mark.integration
def test_notebook_runs_on_the_fresh_grid_and_draws_figures(grid: Any, tmp_path: Path) -> None:
    import nbformat

    from apt_ray.analysis.notebook import NOTEBOOK, run_notebook

    stored = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in stored.cells if c.cell_type == "code"), "the notebook is stored without outputs"
    assert any("parameters" in c.metadata.get("tags", []) for c in stored.cells)
    out = run_notebook(grid.tracking_uri, EXPERIMENT, tmp_path / "executed.ipynb")
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2
    reading = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert reading and "APT adds" in reading[-1] and "Pareto front" in reading[-1]


@pytest.mark.integration
def test_missing_experiment_is_one_clear_error(grid: Any, tmp_path: Path) -> None:
    from apt_ray.analysis.notebook import run_notebook

    with pytest.raises(UserError) as e:
        run_notebook(grid.tracking_uri, "no-such-study", tmp_path / "x.ipynb")
    assert "'no-such-study' does not exist" in str(e.value) and f"'{EXPERIMENT}'" in str(e.value)
    assert not (tmp_path / "x.ipynb").exists()


def test_cli_bad_input_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = study_script().main
    cases = [(["--methods", "apt", "lora"], "has no prompts"), (["--prompts", "0", "4"], "positive"),
             (["--epochs", "0"], "--epochs 0"), (["rank=8"], "--rank"),
             (["--tracking-uri", "http://127.0.0.1:9", "--storage-path", str(tmp_path / "s")], "cannot be reached")]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "s").exists()


def test_reading_a_missing_store_is_refused(tmp_path: Path) -> None:
    from apt_ray.analysis.runs import load_study_runs

    with pytest.raises(UserError, match="no MLflow database"):
        load_study_runs(f"sqlite:///{tmp_path}/none.db", "x")
    assert not (tmp_path / "none.db").exists()
