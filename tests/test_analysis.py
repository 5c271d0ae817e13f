"""Fast tests of the analysis helpers, the prompt-length grid spec and the scaling arithmetic (no Ray, no kernel)."""

from __future__ import annotations

from tests.helpers import load_script

import math

import pandas as pd
import pytest

from apt_ray.analysis import tables
from apt_ray.analysis.importance import from_runs
from apt_ray.analysis.reading import written_reading
from apt_ray.errors import UserError
from apt_ray.sweep.grid import grid_points, prompt_length_spec
from apt_ray.sweep.spec import StudySpec, check_spec
from apt_ray.train.scaling import check_worker_counts, loop_like_step, scaling_rows, steady_throughput


def frame() -> pd.DataFrame:
    """Costs linear in p (slopes 1 and 3 per 1000 prompts); score depends on the method only, plus tiny noise."""
    rows = []
    for method, slope, score in (("apt", 1e-3, 40.0), ("deep_prompt", 3e-3, 30.0)):
        for i, p in enumerate((4, 16, 64)):
            for seed in (0, 1):
                rows.append({"method": method, "num_prompts": p, "rank": 4, "depth": 2, "seed": seed, "status": "finished",
                             "additional_gmacs": slope * p, "val_score": score + 0.01 * (i + seed)})
    return pd.DataFrame(rows)


def old_frame() -> pd.DataFrame:
    """The same trials as runs of an older version logged them: the score under the VQA task's own name only."""
    return frame().rename(columns={"val_score": "val_vqa_score"})


# -- grid -------------------------------------------------------------------------------------

def test_grid_points_enumerate_the_product_in_order() -> None:
    points = grid_points({"method": ["apt", "deep_prompt"], "num_prompts": [1, 2, 3]})
    assert len(points) == 6
    assert points[0] == {"method": "apt", "num_prompts": 1} and points[-1] == {"method": "deep_prompt", "num_prompts": 3}
    assert len({tuple(sorted(p.items())) for p in points}) == 6


def test_prompt_length_spec_is_a_grid_with_method_as_a_knob() -> None:
    spec = prompt_length_spec(["apt", "deep_prompt", "kv_prompt"], [64, 4], rank=4, depth=2, seeds=[0, 1])
    assert spec.num_trials == len(spec.initial_points) == 3 * 2 * 2
    assert {p["method"] for p in spec.initial_points} == {"apt", "deep_prompt", "kv_prompt"}
    assert spec.space()["num_prompts"].choices == [4, 64]  # sorted
    assert spec.fixed["rank"] == 4 and spec.fixed["depth"] == 2
    assert not spec.use_asha()  # every point runs to the end
    assert {spec.train_config(p).method for p in spec.initial_points} == {"apt", "deep_prompt", "kv_prompt"}


@pytest.mark.parametrize("kwargs, words", [
    ({"methods": ["apt", "nope"], "prompts": [4]}, "unknown method"),
    ({"methods": ["apt", "lora"], "prompts": [4]}, "has no prompts"),
    ({"methods": ["apt"], "prompts": [0, 4]}, "positive"),
    ({"methods": ["apt"], "prompts": [4, 4]}, "repeats"),
    ({"methods": ["apt"], "prompts": [4], "depth": 9}, "depth 9"),
])
def test_prompt_length_spec_refuses_bad_input(kwargs: dict, words: str) -> None:
    kwargs = {"rank": 4, "depth": 2, **kwargs}
    with pytest.raises(UserError, match=words):
        prompt_length_spec(kwargs.pop("methods"), kwargs.pop("prompts"), **kwargs)


def test_method_can_be_searched_only_as_choices() -> None:
    ok = StudySpec.model_validate({"search_space": {"method": {"type": "categorical", "choices": ["apt", "deep_prompt"]},
                                                    "num_prompts": {"type": "int", "low": 1, "high": 8}}})
    check_spec(ok)
    bad = StudySpec.model_validate({"search_space": {"method": {"type": "categorical", "choices": ["apt", "nonsense"]}}})
    with pytest.raises(UserError, match="nonsense"):
        check_spec(bad)


# -- tables, importance, reading ------------------------------------------------------------------

def test_cost_slope_is_read_within_each_configuration() -> None:
    """One fixed configuration per method, 3 prompt counts, 2 seeds: the logged cost's slope per prompt and a perfect line."""
    trends = tables.cost_trends(frame()).set_index("method")
    assert trends.loc["apt", "slope"] == pytest.approx(1e-3) and trends.loc["deep_prompt", "slope"] == pytest.approx(3e-3)
    assert trends["r2"].tolist() == pytest.approx([1.0, 1.0])
    assert trends["trials"].tolist() == [6, 6] and trends["prompt_counts"].tolist() == [3, 3]
    p, ratio = tables.cost_ratio(frame())
    assert p == 64 and ratio == pytest.approx(1 / 3)


def test_cost_slope_is_not_fitted_across_depths() -> None:
    """Trials of different depth are different configurations: no slope is fitted through them (it would be negative here)."""
    df = frame()
    df = df[df["method"] == "apt"].assign(depth=lambda d: d["num_prompts"].map({4: 3, 16: 2, 64: 1}),
                                          additional_gmacs=lambda d: 1e-3 * d["depth"] * (1 + d["num_prompts"] / 1000))
    assert df.sort_values("num_prompts")["additional_gmacs"].is_monotonic_decreasing
    trends = tables.cost_trends(df)
    assert len(trends) == 3 and trends["slope"].isna().all() and set(trends["prompt_counts"]) == {1}
    text = written_reading(df, tables.front(df), from_runs(df))
    assert "linear" not in text and "No growth of the logged cost with the prompt count is stated" in text


def test_summary_averages_over_seeds() -> None:
    table = tables.means_over_seeds(frame())
    assert len(table) == 6 and set(table["trials"]) == {2}
    first = table.iloc[0]
    assert first["score_mean"] == pytest.approx(40.005) and first["score_std"] == pytest.approx(math.sqrt(0.00005))
    assert table[tables.COST_PCT].isna().all()  # no base_gmacs in the frame: cost in GMACs only


def test_pareto_front_has_no_dominated_point() -> None:
    df = frame()
    front = tables.front(df)
    assert len(front) >= 1
    assert set(front["method"]) == {"apt"}  # deep_prompt is both worse and dearer at every p
    for _, f in front.iterrows():
        assert not ((df["val_score"] > f["val_score"]) & (df["additional_gmacs"] < f["additional_gmacs"])).any()


def test_importance_from_runs_names_the_knob_that_drives_the_score() -> None:
    imp = from_runs(frame())
    assert imp.trials == 12
    assert set(imp.values) == {"method", "num_prompts", "seed"}  # rank and depth never varied
    assert max(imp.values, key=imp.values.get) == "method"
    assert sum(imp.values.values()) == pytest.approx(1.0)


def test_importance_when_every_trial_scored_the_same_is_empty_with_a_reason() -> None:
    df = frame().assign(val_score=40.0)
    imp = from_runs(df)
    assert imp.values == {} and "scored the same" in imp.note and imp.trials == len(df)


def test_reading_states_the_cost_ratio_and_the_front() -> None:
    df = frame()
    text = written_reading(df, tables.front(df), from_runs(df), epochs=1)
    assert "At p=64, APT adds 0.33x the GMACs of deep prompting (67% less" in text
    assert "Added computation of **apt** grows linearly with p: 1 MMACs per prompt per site" in text
    assert "Added computation of **deep_prompt** grows linearly with p: 3 MMACs per prompt per site" in text
    assert "Pareto front" in text and "**method**" in text
    assert "the trials' runs do not record their model" in text  # no closed form without the model
    assert written_reading(df.iloc[0:0], df.iloc[0:0], from_runs(df.iloc[0:0])).startswith("No trial")


def test_reading_states_a_score_trend_only_with_its_n_and_size() -> None:
    """apt's score creeps up with p (0.01 per step, seeds 0.01 apart): a rise, stated with n, rho and its size."""
    df = frame()
    text = written_reading(df, tables.front(df), from_runs(df), epochs=1)
    apt = df[df["method"] == "apt"]
    rho = apt["num_prompts"].rank().corr(apt["val_score"].rank())
    assert f"- **apt**: score rises with p (Spearman ρ {rho:+.2f}" in text
    assert "n=6 trials at 3 prompt counts" in text and "+0.01 percentage points per doubling of p" in text


def test_runs_of_older_versions_read_through_the_vqa_alias() -> None:
    """Frames whose score column has the VQA task's old name give the same tables, front, importance and reading."""
    new, old = frame(), old_frame()
    assert "val_score" not in old
    pd.testing.assert_frame_equal(tables.means_over_seeds(old), tables.means_over_seeds(new))
    assert tables.front(old)["val_score"].tolist() == tables.front(new)["val_score"].tolist()
    pd.testing.assert_frame_equal(tables.score_trends(old), tables.score_trends(new))
    assert tables.score_trends(old)["rho"].notna().all()
    assert from_runs(old).values == pytest.approx(from_runs(new).values)
    assert written_reading(old, tables.front(old), from_runs(old), epochs=1) == written_reading(new, tables.front(new), from_runs(new), epochs=1)


def test_a_run_of_an_older_version_reads_its_score_through_the_vqa_alias() -> None:
    """A child run that logged only val_vqa_score (older versions) reads back with val_score (sweep results, analysis)."""
    from types import SimpleNamespace

    from apt_ray.sweep.summary import row_of

    def run(metrics: dict) -> SimpleNamespace:
        data = SimpleNamespace(tags={"trial_id": "t1", "status": "finished"}, params={"num_prompts": "4"},
                               metrics={"additional_gmacs": 0.5, **metrics})
        return SimpleNamespace(data=data, info=SimpleNamespace(run_name="t1", status="FINISHED", run_id="r1", start_time=0))

    assert row_of(run({"val_vqa_score": 41.5}))["val_score"] == 41.5
    assert row_of(run({"val_vqa_score": 41.5, "val_score": 41.5}))["val_score"] == 41.5
    assert row_of(run({}))["val_score"] is None


# -- scaling arithmetic -----------------------------------------------------------------------------

def test_scaling_rows_efficiency_is_relative_to_one_worker() -> None:
    rows = scaling_rows({4: 300.0, 1: 100.0, 2: 180.0})
    assert [r["workers"] for r in rows] == [1, 2, 4]
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.9, 0.75])
    assert set(rows[0]) == {"workers", "samples_per_s", "efficiency"}
    with pytest.raises(ValueError):
        scaling_rows({2: 10.0})


def test_steady_throughput_leaves_out_the_warm_up_and_weighs_epochs_by_time() -> None:
    """A slow first epoch (Ray's start-up) does not count; the rest is total samples over total time."""
    history = [{"samples_per_s": 10.0, "train_time_s": 100.0},   # 1000 samples, warm-up
               {"samples_per_s": 200.0, "train_time_s": 5.0},    # 1000 samples
               {"samples_per_s": 100.0, "train_time_s": 10.0}]   # 1000 samples
    assert steady_throughput({"history": history}) == pytest.approx(2000 / 15)
    assert steady_throughput({"history": history}, warmup_epochs=0) == pytest.approx(3000 / 115)
    with pytest.raises(RuntimeError, match="at least 2"):
        steady_throughput({"history": history[:1]})


def test_ceiling_step_updates_what_the_loop_updates() -> None:
    """The --ceiling processes time the loop's whole step: after it the method's and the head's weights moved
    (the AdamW update is in), the frozen backbone did not."""
    import torch

    from apt_ray.config import build_train_config

    cfg = build_train_config(overrides={"model": "tiny-meter", "method": "apt", "pretrained": False})
    model, step = loop_like_step(cfg, batch=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved and moved <= trainable
    assert any(n.startswith("head.") for n in moved) and any("site_methods" in n for n in moved)


@pytest.mark.parametrize("counts, batch, words", [([2, 4], 32, "include 1"), ([1, 0], 32, "positive"), ([1, 3], 32, "split evenly")])
def test_worker_counts_are_checked(counts: list[int], batch: int, words: str) -> None:
    with pytest.raises(UserError, match=words):
        check_worker_counts(counts, batch)
    assert check_worker_counts([2, 1, 2], 32) == [1, 2]


def test_scaling_cli_bad_input_exits_2_before_ray(capsys: pytest.CaptureFixture[str]) -> None:
    module = load_script("studies/scaling_workers.py")
    cases = [(["--workers", "2", "4"], "include 1"), (["--workers", "1", "2", "--method", "nope"], "method='nope'"),
             (["--workers", "1", "0"], "positive"), (["--workers", "1", "2", "--epochs", "1"], "warms up"), (["--workers", "1", "2", "--tracking-uri", "http://127.0.0.1:9"], "cannot be reached")]
    for argv, words in cases:
        assert module.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    import ray

    assert not ray.is_initialized()


def test_the_score_axis_names_the_task_score_of_a_one_task_frame():
    import pandas as pd

    from apt_ray.analysis.plots import score_axis_label

    assert score_axis_label(pd.DataFrame({"task": ["nlvr2", "nlvr2"]})) == "validation NLVR2 accuracy (%)"
    assert score_axis_label(pd.DataFrame({"task": ["retrieval"]})) == "validation mean recall (IR and TR R@1/5/10) (%)"
    assert score_axis_label(pd.DataFrame({"task": ["vqa"]})) == "validation VQA score (%)"
    assert score_axis_label(pd.DataFrame({"task": ["classification"]})) == "validation accuracy (%)"
    # several tasks, or runs of versions that logged no task: the generic name
    assert score_axis_label(pd.DataFrame({"task": ["vqa", "nlvr2"]})) == "validation score (%)"
    assert score_axis_label(pd.DataFrame({"method": ["apt"]})) == "validation score (%)"
