"""The analysis states only what its data supports: crafted studies with a known truth, written to MLflow here (no Ray),
read back the way the notebook reads them, and the notebook executed on them."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from apt_ray.analysis import load_study_runs, plots, reading, tables  # noqa: E402
from apt_ray.analysis.importance import MIN_IMPORTANCE_TRIALS, from_runs  # noqa: E402
from apt_ray.methods.spec import MethodSpec  # noqa: E402
from apt_ray.models.presets import get_preset  # noqa: E402
from apt_ray.profile.cost import closed_form_cost  # noqa: E402

MODEL = "tiny-meter"
BASE_GMACS = 0.25  # the base model's GMACs the crafted runs log
CONFOUNDED = [  # p grows while depth falls and rank and lr change: the logged cost falls, the score falls
    {"method": "apt", "num_prompts": 15, "depth": 3, "rank": 2, "lr": 1e-3, "val_score": 45.0},
    {"method": "apt", "num_prompts": 16, "depth": 2, "rank": 4, "lr": 3e-3, "val_score": 43.0},
    {"method": "apt", "num_prompts": 17, "depth": 1, "rank": 8, "lr": 1e-2, "val_score": 40.0},
]


def cost_at(method: str, p: int, rank: int, depth: int) -> float:
    """The closed-form additional GMACs at the preset's shapes (what a sweep logs for a synthetic-data trial)."""
    preset = get_preset(MODEL)
    spec = MethodSpec(name=method, num_prompts=p, rank=rank, depth=depth, placement="bottom")
    return closed_form_cost(MODEL, spec, preset.text_len, (preset.image_size, preset.image_size)).additional_gmacs


def grid(seeds: tuple[int, ...] = (0, 1)) -> list[dict[str, Any]]:
    """Only p (and the seed) varies within a method: APT's score gains 2 points per doubling of p, deep prompting's loses 1.5."""
    trials = []
    for method, lr, per_doubling, start in (("apt", 1e-3, 2.0, 40.0), ("deep_prompt", 3e-3, -1.5, 38.0)):
        for p in (4, 8, 16, 32):
            for seed in seeds:
                trials.append({"method": method, "num_prompts": p, "depth": 2, "rank": 4, "lr": lr, "seed": seed,
                               "val_score": start + per_doubling * math.log2(p) + 0.1 * seed})
    return trials


def write_study(uri: str, experiment: str, trials: list[dict[str, Any]], base: float | None = BASE_GMACS) -> None:
    """A sweep parent run and one finished child run per trial, as a sweep logs them (cost from the closed form)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(experiment)
    parent = client.create_run(exp, run_name="sweep", tags={"apt_ray.kind": "sweep"}, start_time=1)
    client.log_param(parent.info.run_id, "name", experiment)
    for i, t in enumerate(trials):
        tags = {"mlflow.parentRunId": parent.info.run_id, "apt_ray.kind": "trial", "trial_id": f"t{i}", "status": "finished"}
        run = client.create_run(exp, run_name=f"t{i}", tags=tags, start_time=10 + i).info.run_id
        params = {"model": MODEL, "placement": "bottom", "seed": 0, "epochs": 1, **{k: v for k, v in t.items() if k != "val_score"}}
        if base is not None:
            params["base_gmacs"] = base
        for k, v in params.items():
            client.log_param(run, k, v)
        cost = cost_at(t["method"], t["num_prompts"], t["rank"], t["depth"])
        client.log_metric(run, "val_score", t["val_score"])
        client.log_metric(run, "additional_gmacs", cost)
        client.set_terminated(run, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")


def study(tmp_path: Path, trials: list[dict[str, Any]], name: str = "truth", base: float | None = BASE_GMACS) -> tuple[str, pd.DataFrame]:
    uri = f"sqlite:///{tmp_path}/m.db"
    write_study(uri, name, trials, base)
    return uri, load_study_runs(uri, name).trained


def read(df: pd.DataFrame) -> str:
    return reading.written_reading(df, tables.front(df), from_runs(df), epochs=1)


def per_prompt(t: dict[str, Any]) -> float:
    """One more prompt per site, by the closed form at the trial's own rank and depth."""
    args = (t["method"], t["rank"], t["depth"])
    return cost_at(args[0], t["num_prompts"] + 1, *args[1:]) - cost_at(args[0], t["num_prompts"], *args[1:])


# -- a sweep whose knobs moved together -------------------------------------------------------------------------------

def test_confounded_sweep_states_no_trend_and_a_positive_per_prompt_cost(tmp_path: Path) -> None:
    _, df = study(tmp_path, CONFOUNDED)
    assert len(df) == 3 and set(df["model"]) == {MODEL}
    by_p = df.sort_values("num_prompts")
    assert by_p["additional_gmacs"].is_monotonic_decreasing  # the trap: more prompts, less cost, lower score

    text = read(df)
    for claim in ("linear", "rises", "falls", "Spearman", "per doubling"):
        assert claim not in text, (claim, text)
    assert "No trend of the score with the prompt count is stated" in text and "the 3 configurations here ran at 1 prompt count at most" in text
    assert "No growth of the logged cost with the prompt count is stated" in text

    per = tables.cost_per_prompt(df).set_index(["depth", "rank"])["gmacs_per_prompt"]
    for t in CONFOUNDED:
        expected = per_prompt(t)
        assert expected > 0
        assert per[(t["depth"], t["rank"])] == pytest.approx(expected, rel=1e-9)
        assert f"apt, depth {t['depth']}, rank {t['rank']}: {expected * 1e3:.4g} MMACs" in text
        assert f"({100 * expected / BASE_GMACS:.3g}% of the base model)" in text
    assert not re.search(r"-\d[\d.e-]* MMACs", text)


def test_a_few_trials_give_no_importances_and_say_why(tmp_path: Path) -> None:
    _, df = study(tmp_path, CONFOUNDED)
    imp = from_runs(df)
    assert imp.values == {} and imp.trials == 3
    assert f"at least {MIN_IMPORTANCE_TRIALS} scored trials" in imp.note and "has 3" in imp.note
    assert plots.importance(imp) is None
    assert f"Parameter importances are not shown: {imp.note}" in read(df)


def test_importances_appear_from_the_minimum_number_of_trials() -> None:
    rows = pd.DataFrame(grid())  # 16 trials: the method moves the score most
    enough, short = from_runs(rows.iloc[:MIN_IMPORTANCE_TRIALS]), from_runs(rows.iloc[:MIN_IMPORTANCE_TRIALS - 1])
    assert enough.values and sum(enough.values.values()) == pytest.approx(1.0)
    assert short.values == {} and f"has {MIN_IMPORTANCE_TRIALS - 1}" in short.note


# -- a clean prompt-length grid ---------------------------------------------------------------------------------------

def test_clean_grid_states_each_methods_trend_with_its_n(tmp_path: Path) -> None:
    trials = grid()
    _, df = study(tmp_path, trials)
    text = read(df)
    for method, verb, change in (("apt", "score rises with p", "+2.00"), ("deep_prompt", "score falls as p grows", "-1.50")):
        part = pd.DataFrame([t for t in trials if t["method"] == method])
        rho = part["num_prompts"].rank().corr(part["val_score"].rank())  # Spearman: Pearson of the ranks
        line = next(x for x in text.splitlines() if x.startswith(f"- **{method}**: "))  # lr is fixed per method: not a knob here
        assert line.startswith(f"- **{method}**: {verb} (Spearman ρ {rho:+.2f}"), line
        assert "n=8 trials at 4 prompt counts" in line and f"{change} percentage points per doubling of p" in line, line
        slope = per_prompt({"method": method, "num_prompts": 4, "rank": 4, "depth": 2})
        assert f"Added computation of **{method}** grows linearly with p: {slope * 1e3:.4g} MMACs per prompt per site" in text
    ratio = cost_at("apt", 32, 4, 2) / cost_at("deep_prompt", 32, 4, 2)
    assert f"At p=32, APT adds {ratio:.2f}x the GMACs of deep prompting" in text


def test_grid_with_two_prompt_counts_states_no_trend() -> None:
    rows = pd.DataFrame([t for t in grid() if t["num_prompts"] in (4, 32)]).assign(additional_gmacs=0.1, model=MODEL, placement="bottom")
    text = reading.written_reading(rows, tables.front(rows), from_runs(rows))
    assert "rises" not in text and "falls" not in text and "linear" not in text
    assert f"run at {tables.MIN_PROMPT_COUNTS} or more prompt counts" in text and "the 2 configurations here ran at 2 prompt counts at most" in text


def test_means_over_seeds_keep_configurations_apart_and_give_cost_in_percent() -> None:
    rows = pd.DataFrame(grid() + [{**CONFOUNDED[0], "seed": 0}]).assign(additional_gmacs=0.05, base_gmacs=BASE_GMACS)
    table = tables.means_over_seeds(rows)
    assert {"depth", "rank"} <= set(table.columns) and "lr" not in table  # lr is fixed per method
    odd = table[(table["depth"] == 3)]
    assert len(odd) == 1 and odd["trials"].item() == 1  # not averaged into apt's depth-2 points
    apt4 = table[(table["method"] == "apt") & (table["num_prompts"] == 4) & (table["depth"] == 2)]
    assert apt4["trials"].item() == 2 and apt4["score_mean"].item() == pytest.approx(44.05)
    assert table[tables.COST_PCT].tolist() == pytest.approx([20.0] * len(table))
    without = tables.means_over_seeds(rows.drop(columns=["base_gmacs"]))
    assert without[tables.COST_PCT].isna().all()


# -- figures ---------------------------------------------------------------------------------------------------------

def _tick_labels(cbar: Any) -> list[str]:
    cbar.ax.figure.canvas.draw()
    return [t.get_text().replace("\N{MINUS SIGN}", "-") for t in cbar.ax.get_yticklabels() if t.get_text()]


@pytest.mark.parametrize("values", [[1, 2, 3, 6], list(range(1, 21))])  # 1..20: the default ticks would be 2.5 apart
def test_integer_knobs_get_integer_colour_ticks(values: list[int]) -> None:
    df = pd.DataFrame({"method": "apt", "num_prompts": np.arange(len(values)) + 1, "val_score": 40.0,
                       "depth": np.array(values, dtype=float)})  # as a frame with a missing value elsewhere stores it
    fig, ax = plt.subplots()
    labels = _tick_labels(plots.colour_scatter(ax, df, "num_prompts", "val_score", "depth"))
    plt.close(fig)
    assert labels and all(re.fullmatch(r"-?\d+", t) for t in labels), labels
    if len(values) <= plots.MAX_DISCRETE:
        assert labels == [str(v) for v in values]


def test_sweep_figure_colours_by_depth_with_integer_ticks(tmp_path: Path) -> None:
    _, df = study(tmp_path, CONFOUNDED)
    fig = plots.score_by_knob(df)
    colour_bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(colour_bars) == 3  # depth, rank, lr
    fig.canvas.draw()
    depth = next(a for a in colour_bars if a.get_ylabel() == "depth")
    assert [t.get_text() for t in depth.get_yticklabels()] == ["1", "2", "3"]
    plt.close(fig)


def _drawn_lines(fig: Any) -> list[Any]:
    return [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_linestyle() not in ("None", "none", "") and len(ln.get_xdata()) > 1]


def test_lines_join_only_points_of_one_configuration(tmp_path: Path) -> None:
    _, confounded = study(tmp_path, CONFOUNDED)
    fig = plots.score_vs_prompts(confounded)
    assert _drawn_lines(fig) == []  # three configurations of one point each: no line
    assert fig.axes[0].get_ylabel() == "validation score (%)"
    plt.close(fig)
    rows = pd.DataFrame(grid()).assign(additional_gmacs=lambda d: 1e-4 * d["num_prompts"], base_gmacs=BASE_GMACS)
    fig = plots.tradeoffs(rows)
    lines = _drawn_lines(fig)
    assert len(lines) == 4 and all(list(ln.get_xdata()) == [4, 8, 16, 32] for ln in lines)  # score and cost, per method
    assert any(getattr(a, "get_ylabel", lambda: "")() == plots.PCT_LABEL for ax in fig.axes for a in ax.child_axes)
    plt.close(fig)


def test_cost_has_no_percent_axis_without_a_base() -> None:
    rows = pd.DataFrame(grid()).assign(additional_gmacs=lambda d: 1e-4 * d["num_prompts"])
    fig = plots.gmacs_vs_prompts(rows)
    assert not fig.axes[0].child_axes
    plt.close(fig)


def test_pareto_and_score_figures_keep_their_signatures(tmp_path: Path) -> None:
    _, df = study(tmp_path, CONFOUNDED)
    front = tables.front(df)
    for fig in (plots.pareto(df, front), plots.score_vs_prompts(df)):
        assert isinstance(fig, matplotlib.figure.Figure)
        plt.close(fig)


# -- the notebook itself -------------------------------------------------------------------------------------------

def _executed(uri: str, experiment: str, out: Path) -> tuple[list[str], str, int]:
    import nbformat

    from apt_ray.analysis.notebook import run_notebook

    nb = nbformat.read(run_notebook(uri, experiment, out), as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    return markdown, printed, images


@pytest.mark.integration
def test_notebook_reads_a_confounded_sweep_truthfully(tmp_path: Path) -> None:
    uri, df = study(tmp_path, CONFOUNDED, name="confounded")
    markdown, printed, images = _executed(uri, "confounded", tmp_path / "confounded.ipynb")
    reading_text = markdown[-1]
    assert images >= 4  # tradeoffs, score and cost by knob, Pareto front
    for claim in ("linear", "rises", "falls"):
        assert claim not in reading_text
    assert "No trend of the score with the prompt count is stated" in reading_text
    assert f"{per_prompt(CONFOUNDED[0]) * 1e3:.4g} MMACs" in reading_text
    assert f"no importances: fANOVA importances need at least {MIN_IMPORTANCE_TRIALS} scored trials" in printed
    assert "cost in % of the base model: yes" in printed


@pytest.mark.integration
def test_notebook_reads_a_prompt_length_grid(tmp_path: Path) -> None:
    uri, _ = study(tmp_path, grid(), name="grid", base=None)
    markdown, printed, images = _executed(uri, "grid", tmp_path / "grid.ipynb")
    reading_text = markdown[-1]
    assert images >= 3  # tradeoffs, Pareto front, importances (16 trials)
    assert "**apt**: score rises with p" in reading_text and "**deep_prompt**: score falls as p grows" in reading_text
    assert "n=8 trials at 4 prompt counts" in reading_text and "APT adds" in reading_text and "Pareto front" in reading_text
    assert "cost in GMACs only" in printed


def test_prompt_length_study_prints_the_grid_and_its_trends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import load_script

    uri, df = study(tmp_path, grid())
    load_script("studies/prompt_length.py").print_summary(uri, "truth", df["parent_run_id"].iloc[0])
    out = capsys.readouterr().out
    assert "| configuration | prompts | seeds | val score (%) | additional GMACs | % of base |" in out
    assert f"| apt | 4 | 2 | 44.05 ± 0.07 | {cost_at('apt', 4, 4, 2):.5f} | {100 * cost_at('apt', 4, 4, 2) / BASE_GMACS:.3g} |" in out
    assert "- **apt**: score rises with p" in out and "- **deep_prompt**: score falls as p grows" in out
    assert out.count("n=8 trials at 4 prompt counts") == 4  # score and cost, per method
