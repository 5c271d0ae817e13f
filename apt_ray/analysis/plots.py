"""Figures of a study's trials (matplotlib; each function returns its Figure and leaves the backend alone)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from apt_ray.analysis.importance import Importance
from apt_ray.analysis.tables import COST, SCORE, by_method_and_prompts, with_score

SCORE_LABEL = "validation score"
COST_LABEL = "additional GMACs (1 multiply-add = 1 FLOP)"


def _log2_x(ax: Any, df: pd.DataFrame) -> None:
    if len(df) and df["num_prompts"].min() > 0 and df["num_prompts"].max() / df["num_prompts"].min() >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("prompts per site (p)")
    ax.grid(alpha=0.3)


def score_vs_prompts(df: pd.DataFrame) -> Any:
    """The main figure: validation score against prompt count, one line per method (mean ± std over repeats)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for method, part in by_method_and_prompts(df).groupby("method"):
        ax.errorbar(part["num_prompts"], part["score_mean"], yerr=part["score_std"].fillna(0.0), marker="o", capsize=3, label=method)
    _log2_x(ax, df)
    ax.set_ylabel(SCORE_LABEL)
    ax.set_title("score vs prompt count, per method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def score_by_knob(df: pd.DataFrame, knobs: tuple[str, ...] = ("rank", "depth")) -> Any | None:
    """Score against prompt count coloured by each knob that varied (None when none did)."""
    df = with_score(df)
    varied = [k for k in knobs if k in df and df[k].nunique() > 1]
    if not varied:
        return None
    fig, axes = plt.subplots(1, len(varied), figsize=(5.4 * len(varied), 4.0), dpi=100, squeeze=False)
    for ax, knob in zip(axes[0], varied):
        sc = ax.scatter(df["num_prompts"], df[SCORE], c=df[knob].astype(float), cmap="viridis", s=30)
        fig.colorbar(sc, ax=ax, label=knob)
        _log2_x(ax, df)
        ax.set_ylabel(SCORE_LABEL)
        ax.set_title(f"score vs prompt count, by {knob}")
    fig.tight_layout()
    return fig


def gmacs_vs_prompts(df: pd.DataFrame) -> Any:
    """Additional GMACs against prompt count, one line per method (the cost each trial's FLOPs profile logged)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for method, part in by_method_and_prompts(df).groupby("method"):
        ax.plot(part["num_prompts"], part["gmacs"], marker="o", label=method)
    _log2_x(ax, df)
    ax.set_ylabel(COST_LABEL)
    ax.set_title("added computation vs prompt count")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pareto(df: pd.DataFrame, front: pd.DataFrame) -> Any:
    """Every trial (marker per method) and the accuracy-compute Pareto front as a step line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    df, front = with_score(df), with_score(front)
    for (method, part), marker in zip(df.groupby("method"), "osD^v<>"):
        ax.scatter(part[COST], part[SCORE], marker=marker, s=30, alpha=0.7, label=str(method))
    if len(front):
        fr = front.sort_values(COST)
        ax.step(fr[COST], fr[SCORE], where="post", color="tab:red", lw=1.2)
        ax.scatter(fr[COST], fr[SCORE], s=90, facecolors="none", edgecolors="tab:red", label="Pareto front", zorder=3)
        for _, r in fr.iterrows():
            ax.annotate(f"{r['method']} p={r['num_prompts']}", (r[COST], r[SCORE]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(COST_LABEL)
    ax.set_ylabel(SCORE_LABEL)
    ax.set_title("accuracy vs added computation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def importance(imp: Importance) -> Any | None:
    """Horizontal bars of the knobs' importance (None when it could not be computed)."""
    if not imp.values:
        return None
    names = list(imp.values)[::-1]
    fig, ax = plt.subplots(figsize=(5.6, 0.5 * len(names) + 1.4), dpi=100)
    ax.barh(names, [imp.values[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance for the validation score (fANOVA, sums to 1)")
    ax.set_title(f"parameter importance ({imp.trials} trials)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig
