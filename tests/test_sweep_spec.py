"""StudySpec: YAML + overrides, defaults, and every refusal happens before Ray starts (no Ray here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from apt_ray.errors import UserError
from apt_ray.sweep.space import ParamSpec, default_space, optuna_distributions
from apt_ray.sweep.spec import StudySpec, load_study_spec

STUDIES = Path(__file__).resolve().parents[1] / "studies" / "configs"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def refused(tmp_path: Path, data: dict, overrides: dict | None = None) -> str:
    with pytest.raises(UserError) as err:
        load_study_spec(write(tmp_path, data), overrides)
    return str(err.value)


def test_default_spec_has_the_issue_defaults() -> None:
    spec = load_study_spec(None)
    assert spec.model == "tiny-meter" and spec.method == "apt"
    assert [(o.metric, o.mode) for o in spec.objectives] == [("val_score", "max"), ("additional_gmacs", "min")]
    space = spec.space()
    assert set(space) == {"num_prompts", "rank", "depth", "placement", "lr"}
    assert (space["num_prompts"].low, space["num_prompts"].high, space["num_prompts"].log) == (1, 256, True)
    assert (space["rank"].low, space["rank"].high, space["rank"].log) == (1, 64, True)
    assert (space["depth"].low, space["depth"].high) == (1, 4)  # tiny-meter has 4 fusion layers
    assert space["placement"].choices == ["bottom", "top"]
    assert (space["lr"].low, space["lr"].high, space["lr"].log) == (1e-4, 3e-2, True)
    assert spec.multi_objective and not spec.use_asha()


def test_single_objective_uses_asha(tmp_path: Path) -> None:
    spec = load_study_spec(write(tmp_path, {"objectives": [{"metric": "val_score", "mode": "max"}]}))
    assert spec.use_asha()


def test_old_study_files_name_the_score_by_its_vqa_alias(tmp_path: Path) -> None:
    """Study files written before tasks were pluggable name the score val_vqa_score: it reads as val_score."""
    spec = load_study_spec(write(tmp_path, {"objectives": [{"metric": "val_vqa_score", "mode": "max"},
                                                           {"metric": "additional_gmacs", "mode": "min"}]}))
    assert spec.metrics == ["val_score", "additional_gmacs"] and spec.modes == ["max", "min"]
    assert load_study_spec(write(tmp_path, {"objectives": [{"metric": "val_vqa_score", "mode": "max"}]})).use_asha()
    assert "repeat" in refused(tmp_path, {"objectives": [{"metric": "val_vqa_score", "mode": "max"},
                                                         {"metric": "val_score", "mode": "max"}]})


@pytest.mark.parametrize("name", ["default_meter.yaml", "default_vilt.yaml", "paper_meter_vqav2.yaml", "paper_vilt_vqav2.yaml"])
def test_shipped_study_configs_validate(name: str) -> None:
    spec = load_study_spec(STUDIES / name)
    assert spec.num_trials >= 1 and spec.space()


def test_paper_config_bounds_follow_the_paper_model() -> None:
    spec = load_study_spec(STUDIES / "paper_meter_vqav2.yaml")
    assert spec.model == "meter-clip16-roberta" and spec.space()["depth"].high == 6


@pytest.mark.parametrize(("name", "recipe", "lr", "head_lr", "batch"), [
    ("paper_meter_vqav2.yaml", "apt-meter-vqa", 2.5e-5, 50 * 2.5e-5, 512),
    ("paper_vilt_vqav2.yaml", "apt-vilt-vqa", 5e-4, 10 * 5e-4, 256),
])
def test_paper_configs_train_with_the_authors_recipe(name: str, recipe: str, lr: float, head_lr: float, batch: int) -> None:
    """The paper studies take the authors' recipe, not the embedded default's rates: the head at the authors'
    multiple of the base rate, their epochs, batch, schedule, betas and no clipping."""
    cfg = load_study_spec(STUDIES / name).train_config({})
    assert cfg.recipe == recipe and cfg.lr == pytest.approx(lr) and cfg.head_lr == pytest.approx(head_lr)
    assert (cfg.epochs, cfg.batch_size, cfg.schedule, cfg.adam_betas, cfg.grad_clip) == (10, batch, "linear", (0.9, 0.98), 0)


def test_overrides_are_dotted_and_win(tmp_path: Path) -> None:
    spec = load_study_spec(write(tmp_path, {"fixed": {"epochs": 3}}), {"num_trials": 5, "fixed.epochs": 1, "resources.workers": 2,
                                                                      "fixed.batch_size": 8})
    assert spec.num_trials == 5 and spec.epochs == 1 and spec.resources.workers == 2


def test_unknown_key_gets_did_you_mean(tmp_path: Path) -> None:
    assert "did you mean 'num_trials'" in refused(tmp_path, {"num_trails": 3})


def test_zero_trials_is_refused(tmp_path: Path) -> None:
    assert "num_trials=0" in refused(tmp_path, {}, {"num_trials": 0})


def test_depth_above_layer_count_is_refused(tmp_path: Path) -> None:
    msg = refused(tmp_path, {"search_space": {"depth": {"type": "int", "low": 1, "high": 12}}})
    assert "depth 12 is above the 4 layers of tiny-meter" in msg


def test_rank_above_hidden_size_is_refused(tmp_path: Path) -> None:
    msg = refused(tmp_path, {"search_space": {"rank": {"type": "int", "low": 1, "high": 512, "log": True}}})
    assert "rank 512 is above the hidden size 64" in msg


def test_fixed_depth_above_layers_is_refused(tmp_path: Path) -> None:
    msg = refused(tmp_path, {"fixed": {"depth": 9}, "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2}}})
    assert "depth 9" in msg and "fixed" in msg


def test_vilt_bounds_come_from_vilt(tmp_path: Path) -> None:
    spec = load_study_spec(write(tmp_path, {"model": "tiny-vilt"}))
    assert spec.space()["depth"].high == 4 and spec.space()["rank"].high == 64


def test_unknown_searched_key_and_conflicts(tmp_path: Path) -> None:
    assert "did you mean 'num_prompts'" in refused(tmp_path, {"search_space": {"num_prompt": {"type": "int", "low": 1, "high": 8}}})
    assert "both in fixed and in search_space" in refused(
        tmp_path, {"fixed": {"lr": 1e-3}, "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2}}})
    assert "cannot be searched" in refused(tmp_path, {"search_space": {"model": {"type": "categorical", "choices": ["tiny-vilt"]}}})
    assert "top level" in refused(tmp_path, {"fixed": {"model": "tiny-vilt"}})
    assert "did you mean 'epochs'" in refused(tmp_path, {"fixed": {"epoch": 2}})


def test_bad_knob_definitions(tmp_path: Path) -> None:
    assert "low 8.0 is above high 2.0" in refused(tmp_path, {"search_space": {"num_prompts": {"type": "int", "low": 8, "high": 2}}})
    assert "low > 0" in refused(tmp_path, {"search_space": {"lr": {"type": "float", "low": 0, "high": 1e-2, "log": True}}})
    assert "not a valid lr" in refused(tmp_path, {"search_space": {"lr": {"type": "float", "low": -1, "high": 1e-2}}})
    assert "choices" in refused(tmp_path, {"search_space": {"placement": {"type": "categorical"}}})


def test_objective_and_scheduler_rules(tmp_path: Path) -> None:
    assert "single objective" in refused(tmp_path, {"scheduler": {"kind": "asha"}})
    assert "trained metric" in refused(tmp_path, {"objectives": [{"metric": "additional_gmacs", "mode": "min"}]})
    assert "repeat" in refused(tmp_path, {"objectives": [{"metric": "val_score", "mode": "max"}] * 2})


def test_resources_rules(tmp_path: Path) -> None:
    assert "split evenly over 3 workers" in refused(tmp_path, {"fixed": {"batch_size": 64}, "resources": {"workers": 3}})
    assert "device=cpu" in refused(tmp_path, {"fixed": {"device": "cpu"}, "resources": {"gpus_per_worker": 1}})


def test_budget_that_rejects_everything_is_refused(tmp_path: Path) -> None:
    msg = refused(tmp_path, {"max_additional_gmacs": 1e-9})
    assert "rejects the whole search space" in msg


def test_train_config_merges_fixed_and_params() -> None:
    spec = StudySpec(fixed={"epochs": 2})
    cfg = spec.train_config({"num_prompts": 7, "placement": "top"})
    assert (cfg.epochs, cfg.num_prompts, cfg.placement, cfg.model) == (2, 7, "top", "tiny-meter")


def test_default_space_per_method() -> None:
    assert set(default_space("deep_prompt", 12, 768)) == {"num_prompts", "depth", "placement", "lr"}
    assert set(default_space("lora", 12, 768)) == {"rank", "depth", "placement", "lr"}
    assert set(default_space("full", 12, 768)) == {"lr"}
    assert default_space("apt", 2, 16)["rank"].high == 16


def test_optuna_distributions() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = optuna_distributions(default_space("apt", 4, 64))
    assert isinstance(dists["num_prompts"], IntDistribution) and dists["num_prompts"].log and dists["num_prompts"].high == 256
    assert isinstance(dists["lr"], FloatDistribution) and dists["lr"].log
    assert isinstance(dists["placement"], CategoricalDistribution) and dists["placement"].choices == ("bottom", "top")


def test_param_spec_describe() -> None:
    assert ParamSpec(type="int", low=1, high=256, log=True).describe() == "int 1..256 (log)"
    assert ParamSpec(type="categorical", choices=["bottom", "top"]).describe() == "{bottom, top}"


def test_initial_points_must_fit_the_space(tmp_path: Path) -> None:
    space = {"num_prompts": {"type": "int", "low": 1, "high": 64}, "placement": {"type": "categorical", "choices": ["bottom", "top"]}}
    spec = load_study_spec(write(tmp_path, {"search_space": space, "initial_points": [{"num_prompts": 8, "placement": "top"}]}))
    assert spec.initial_points == [{"num_prompts": 8, "placement": "top"}]
    assert "outside the search space" in refused(tmp_path, {"search_space": space, "initial_points": [{"num_prompts": 100, "placement": "top"}]})
    assert "outside the search space" in refused(tmp_path, {"search_space": space, "initial_points": [{"num_prompts": 8, "placement": "middle"}]})
    assert "exactly the searched knobs" in refused(tmp_path, {"search_space": space, "initial_points": [{"num_prompts": 8}]})


def test_asha_scheduler_settings(tmp_path: Path) -> None:
    from ray.tune.schedulers import ASHAScheduler

    from apt_ray.sweep.run import _scheduler

    spec = load_study_spec(write(tmp_path, {"objectives": [{"metric": "val_score", "mode": "max"}], "fixed": {"epochs": 6},
                                            "scheduler": {"grace_period": 2, "reduction_factor": 3}}))
    asha = _scheduler(spec)
    assert isinstance(asha, ASHAScheduler)
    assert (asha._time_attr, asha._metric, asha._mode, asha._max_t, asha._reduction_factor) == ("epoch", "val_score", "max", 6, 3)
    assert _scheduler(load_study_spec(None)) is None  # two objectives: FIFO



def test_max_failures_reaches_every_trial(tmp_path: Path) -> None:
    """One-worker trials are retried by Tune, multi-worker ones by Ray Train: either way max_failures arrives."""
    from apt_ray.sweep.run import _plan
    from apt_ray.sweep.store import SweepDir

    spec = load_study_spec(write(tmp_path, {}), {"resources.max_failures": 2})
    assert spec.resources.max_failures == 2 and _plan(spec, SweepDir(tmp_path / "s")).max_failures == 2
    with pytest.raises(UserError, match="max_failures"):
        load_study_spec(write(tmp_path, {}), {"resources.max_failures": -2})
