"""The comparison studies' engine (apt_ray.analysis.seeds): mean ± sample sd per arm; the methods table with the
task's metrics and chance rows; the arms of the pruning study; bad input."""

from __future__ import annotations

import math

import pytest

from apt_ray.analysis import seeds
from tests.helpers import load_script


def row(arm: str, seed: int, score: float, **more: float) -> dict:
    return {"arm": arm, "seed": seed, "val_score": score, "updated_params": 10, "additional_gmacs": 0.5, "seconds": 2.0,
            **more}


def test_summary_is_mean_and_sample_sd_per_arm_in_first_seen_order():
    rows = [row("apt", 0, 50.0), row("probe", 0, 40.0), row("apt", 1, 52.0), row("apt", 2, 54.0), row("probe", 1, 41.0),
            row("solo", 0, 7.0)]
    summary = {s["arm"]: s for s in seeds.summarise(rows)}
    assert list(summary) == ["apt", "probe", "solo"]
    assert summary["apt"]["val_score"]["mean"] == pytest.approx(52.0) and summary["apt"]["val_score"]["sd"] == pytest.approx(2.0)
    assert summary["probe"]["val_score"]["sd"] == pytest.approx(math.sqrt(0.5))  # n - 1 in the sd
    assert math.isnan(summary["solo"]["val_score"]["sd"]) and summary["apt"]["seeds"] == [0, 1, 2]
    assert seeds.mean_sd(summary["apt"]) == "52.00 ± 2.00"


def test_methods_table_is_best_first_with_the_task_metrics_and_chance_rows():
    compare = load_script("studies/compare_methods.py")
    rows = [row("apt", s, v, val_ir_r1=r, val_recall_mean=v, chance_ir_r1=2.0, chance_recall_mean=10.48)
            for s, v, r in ((0, 70.0, 40.0), (1, 72.0, 44.0))]
    rows += [row("lora", s, v, val_ir_r1=r, val_recall_mean=v, chance_ir_r1=2.0, chance_recall_mean=10.48)
             for s, v, r in ((0, 80.0, 50.0), (1, 80.0, 52.0))]
    metrics = compare.shown_metrics(rows[0], "val_recall_mean")
    assert metrics == ["val_score", "val_ir_r1"]  # the score once, under val_score
    text = compare.table(seeds.summarise(rows, metrics), metrics, "val_recall_mean")
    assert text.startswith("| method | recall_mean | ir_r1 | per seed |")
    assert text.index("| lora | 80.00 ± 0.00 | 51.00 ± 1.41 | 80.00 / 80.00 |") < text.index("| apt | 71.00 ± 1.41 | 42.00 ± 2.83 |")
    assert "| chance | 10.48 | 2.00 |" in text and "most frequent" not in text
    vqa = compare.table(seeds.summarise([row("apt", 0, 30.0, majority_baseline=6.25)]), ["val_score"], "val_vqa_score")
    assert "| always the most frequent answer | 6.25 |" in vqa and "| chance |" not in vqa
    assert {len(line.split("|")) for line in vqa.splitlines()} == {len(vqa.splitlines()[0].split("|"))}  # full rows


def test_unknown_method_is_refused(capsys):
    compare = load_script("studies/compare_methods.py")
    assert compare.main(["--methods", "apt", "prefix_tuning", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "prefix_tuning" in err and "Traceback" not in err


def test_the_pruning_study_compares_at_equal_cost_and_at_equal_epochs():
    prune = load_script("studies/prune_compare.py")
    arms = prune.arms_of("kv_prompt", 32, 8, prune.ARMS, {"model": "tiny-meter", "epochs": 2, "rewind_epochs": 3})
    assert arms == {"kv_prompt, p=32 pruned to 8": {"method": "kv_prompt", "num_prompts": 32, "prune_keep": 0.25},
                    "kv_prompt, p=8": {"method": "kv_prompt", "num_prompts": 8},
                    "kv_prompt, p=8, 5 epochs": {"method": "kv_prompt", "num_prompts": 8, "epochs": 5}}
    runs = seeds.configs(arms, [0, 1], {"model": "tiny-meter", "epochs": 2, "rewind_epochs": 3}, "out")
    assert [(r["_arm"], r["seed"], r["epochs"]) for r in runs][-2:] == [("kv_prompt, p=8, 5 epochs", 0, 5), ("kv_prompt, p=8, 5 epochs", 1, 5)]
    assert len({r["output_dir"] for r in runs}) == 6 and all("," not in r["output_dir"] for r in runs)
    assert prune.main(["--trained", "8", "--kept", "9"]) == 2
