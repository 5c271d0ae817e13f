"""Pareto front and its table (pure Python)."""

from __future__ import annotations

import math

import pytest

from apt_ray.sweep.summary import dominates, format_table, pareto_front

M2, MODES2 = ["val_score", "additional_gmacs"], ["max", "min"]


def row(name: str, score: float, gmacs: float, **kw) -> dict:
    return {"trial": name, "val_score": score, "additional_gmacs": gmacs, **kw}


def test_dominance_respects_modes() -> None:
    assert dominates(row("a", 50, 1), row("b", 40, 2), M2, MODES2)
    assert not dominates(row("a", 50, 3), row("b", 40, 2), M2, MODES2)
    assert not dominates(row("a", 50, 1), row("b", 50, 1), M2, MODES2)  # equal: neither dominates


def test_two_objective_front() -> None:
    rows = [row("cheap", 30, 0.1), row("best", 60, 2.0), row("mid", 50, 0.5), row("worse", 45, 0.9), row("tie", 60, 2.0)]
    front = pareto_front(rows, M2, MODES2)
    assert [r["trial"] for r in front] == ["best", "tie", "mid", "cheap"]  # by score, best first
    assert "worse" not in {r["trial"] for r in front}


def test_rows_missing_an_objective_are_left_out() -> None:
    rows = [row("ok", 10, 1), {"trial": "failed", "val_score": None, "additional_gmacs": 0.0},
            row("nan", math.nan, 0.0)]
    assert [r["trial"] for r in pareto_front(rows, M2, MODES2)] == ["ok"]


def test_single_objective_front_is_the_best() -> None:
    rows = [row("a", 10, 1), row("b", 30, 9), row("c", 20, 0)]
    assert [r["trial"] for r in pareto_front(rows, ["val_score"], ["max"])] == ["b"]
    assert [r["trial"] for r in pareto_front(rows, ["additional_gmacs"], ["min"])] == ["c"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        pareto_front([], ["a", "b"], ["max"])


def test_table_has_the_contract_columns() -> None:
    text = format_table([row("t1", 55.123, 0.0123, num_prompts=16, rank=4, depth=2, placement="top", lr=1e-3)])
    header = text.splitlines()[0].split()
    assert header[:5] == ["trial", "p", "r", "depth", "placement"]
    assert "val" in header and "+GMACs" in header
    assert "55.12" in text and "0.0123" in text and "top" in text
    assert format_table([{"trial": "x"}]).splitlines()[2].split()[1] == "-"
