"""Summaries of a study's trials: score and cost per (method, prompt count), the Pareto front, cost growth."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from apt_ray.sweep.summary import pareto_front
from apt_ray.tasks import SCORE_KEY, metric_aliases

SCORE = SCORE_KEY  # the task's score, whatever the task (VQA: the VQA accuracy)
COST = "additional_gmacs"


def with_score(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a :data:`SCORE` column: as it is when it has one, else copied from a column under an old name of
    the score that a task declares as an alias (frames of runs logged by older versions, whose only score was the VQA task's own metric)."""
    if SCORE in df:
        return df
    for old, new in metric_aliases().items():
        if new == SCORE and old in df:
            return df.assign(**{SCORE: df[old]})
    return df


def by_method_and_prompts(df: pd.DataFrame) -> pd.DataFrame:
    """Mean (and spread over repeats) of score and additional GMACs per method and prompt count."""
    df = with_score(df)
    if df.empty:
        return pd.DataFrame(columns=["method", "num_prompts", "trials", "score_mean", "score_std", "gmacs"])
    g = df.groupby(["method", "num_prompts"], as_index=False)
    out = g.agg(trials=(SCORE, "size"), score_mean=(SCORE, "mean"), score_std=(SCORE, "std"), gmacs=(COST, "mean"))
    return out.sort_values(["method", "num_prompts"]).reset_index(drop=True)


def front(df: pd.DataFrame, metrics: tuple[str, str] = (SCORE, COST), modes: tuple[str, str] = ("max", "min")) -> pd.DataFrame:
    """The accuracy-compute Pareto front (best score first), as rows of ``df``."""
    df = with_score(df)
    rows = pareto_front(df.to_dict("records"), list(metrics), list(modes))
    return pd.DataFrame(rows, columns=df.columns)


def gmacs_per_prompt(df: pd.DataFrame) -> dict[str, float]:
    """Least-squares slope of additional GMACs against prompt count, per method (at fixed rank and depth the
    closed forms are linear in the prompt count, so this is the cost of one more prompt per site)."""
    out: dict[str, float] = {}
    for method, part in df.dropna(subset=["num_prompts", COST]).groupby("method"):
        x, y = part["num_prompts"].astype(float).to_numpy(), part[COST].astype(float).to_numpy()
        if len(np.unique(x)) >= 2:
            out[str(method)] = float(np.polyfit(x, y, 1)[0])
    return out


def cost_ratio(df: pd.DataFrame, method: str = "apt", reference: str = "deep_prompt") -> tuple[float, float] | None:
    """``(prompt count, method GMACs / reference GMACs)`` at the largest prompt count both ran, if any."""
    table = by_method_and_prompts(df)
    a = table[table["method"] == method].set_index("num_prompts")["gmacs"]
    b = table[table["method"] == reference].set_index("num_prompts")["gmacs"]
    common = sorted(set(a.index) & set(b.index))
    if not common or not b[common[-1]] or math.isnan(b[common[-1]]):
        return None
    p = common[-1]
    return float(p), float(a[p] / b[p])


def trend(df: pd.DataFrame, method: str) -> float | None:
    """Spearman rank correlation of score with prompt count for ``method`` (None with fewer than 3 counts)."""
    df = with_score(df)
    part = df[df["method"] == method].dropna(subset=["num_prompts", SCORE])
    if part["num_prompts"].nunique() < 3:
        return None
    value = part["num_prompts"].rank().corr(part[SCORE].rank())
    return None if value is None or math.isnan(value) else float(value)
