"""studies/compare_methods.py: the mean ± sd over seeds, and its bad input."""

from __future__ import annotations

import math

import pytest

from tests.helpers import load_script


def row(method: str, seed: int, score: float) -> dict:
    return {"method": method, "seed": seed, "val_vqa_score": score, "updated_params": 10, "additional_gmacs": 0.5, "seconds": 2.0}


def test_summary_is_mean_and_sample_sd_per_method():
    compare = load_script("studies/compare_methods.py")
    rows = [row("apt", 0, 50.0), row("probe", 0, 40.0), row("apt", 1, 52.0), row("apt", 2, 54.0), row("probe", 1, 41.0)]
    summary = {s["method"]: s for s in compare.summarise(rows)}
    assert [s["method"] for s in compare.summarise(rows)] == ["apt", "probe"]  # first-seen order
    assert summary["apt"]["mean"] == pytest.approx(52.0) and summary["apt"]["sd"] == pytest.approx(2.0)  # n-1 in the sd
    assert summary["probe"]["mean"] == pytest.approx(40.5) and summary["probe"]["sd"] == pytest.approx(math.sqrt(0.5))
    assert summary["apt"]["seeds"] == [0, 1, 2]
    table = compare.table(list(summary.values()), 6.25)
    assert table.index("| apt | 52.00 ± 2.00 | 3 |") < table.index("| probe | 40.50 ± 0.71 | 2 |")  # best first
    assert "| always the most frequent answer | 6.25 |" in table


def test_unknown_method_is_refused(capsys):
    compare = load_script("studies/compare_methods.py")
    assert compare.main(["--methods", "apt", "prefix_tuning", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "prefix_tuning" in err and "Traceback" not in err
