"""Figures of a study's trials (matplotlib; each function returns its Figure and leaves the backend alone).

Lines join only points of one configuration (trials equal in every knob but the prompt count, averaged over seeds);
everything else is drawn as points, coloured by the knob that varied."""

from __future__ import annotations

from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import colors
from matplotlib.ticker import MaxNLocator, NullLocator

from apt_ray.analysis import tables
from apt_ray.analysis.importance import Importance
from apt_ray.analysis.tables import BASE, COST, PROMPTS, SCORE, describe, with_score
from apt_ray.tasks.registry import score_label

COST_LABEL = "additional GMACs (1 multiply-add = 1 FLOP)"
PCT_LABEL = "% of the base model's GMACs"
INTEGER_KNOBS = ("rank", "depth", PROMPTS, "epochs", "workers", "seed")
MAX_DISCRETE = 12  # integer knobs with up to this many values get one colour (and one tick) per value
MARKERS = "osD^v<>Ph*"


def _log2_x(ax: Any, df: pd.DataFrame) -> None:
    """A log2 prompt axis when p spans 4x or more, ticked at the prompt counts run (whole numbers) when they are few."""
    p = df[PROMPTS].dropna() if len(df) else pd.Series(dtype=float)
    if len(p) and p.min() > 0 and p.max() / p.min() >= 4:
        ax.set_xscale("log", base=2)
    if 0 < p.nunique() <= 10:
        ax.set_xticks(sorted(p.unique()), labels=[str(int(v)) for v in sorted(p.unique())])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("prompts per site (p)")
    ax.grid(alpha=0.3)


def _percent_axis(ax: Any, df: pd.DataFrame, axis: str = "y") -> bool:
    """A second cost axis in % of the base model's GMACs, when every trial shares one known base (whether it drew one)."""
    if not tables.has_base(df):
        return False
    bases = pd.to_numeric(df[BASE]).to_numpy()
    if not np.isclose(bases, bases[0]).all():
        return False
    base = float(bases[0])
    functions = (lambda g: 100.0 * g / base, lambda q: q * base / 100.0)
    side = ax.secondary_yaxis("right", functions=functions) if axis == "y" else ax.secondary_xaxis("top", functions=functions)
    side.set_ylabel(PCT_LABEL) if axis == "y" else side.set_xlabel(PCT_LABEL)
    return True


def _line_label(key: dict[str, Any], shown: list[str]) -> str:
    return describe({k: v for k, v in key.items() if k in shown}) or "all trials"


def _by_configuration(ax: Any, table: pd.DataFrame, value: str, spread: str | None) -> None:
    """One line per configuration run at several prompt counts (mean ± spread over seeds); lone points as markers."""
    keys = [c for c in table.columns if c not in (PROMPTS, "trials", "score_mean", "score_std", "gmacs", tables.COST_PCT)]
    groups = list(table.groupby(keys, dropna=False, sort=True)) if keys else [((), table)]
    for i, (values, part) in enumerate(groups):
        label = _line_label(dict(zip(keys, values)), keys)
        yerr = part[spread].fillna(0.0) if spread else None
        style = {"marker": MARKERS[i % len(MARKERS)], "capsize": 3, "label": label}
        if part[PROMPTS].nunique() > 1:
            ax.errorbar(part[PROMPTS], part[value], yerr=yerr, **style)
        else:
            ax.errorbar(part[PROMPTS], part[value], yerr=yerr, linestyle="none", **style)
    if 0 < len(groups) <= 12:
        ax.legend(fontsize=7)


def score_axis_label(df: pd.DataFrame) -> str:
    """The y-axis name of a score: the task's own ("validation NLVR2 accuracy (%)") when the frame holds one task."""
    tasks = df["task"].dropna().unique() if "task" in df else []
    return f"{score_label(tasks[0] if len(tasks) == 1 else None)} (%)"


def _score_panel(ax: Any, df: pd.DataFrame) -> None:
    _by_configuration(ax, tables.means_over_seeds(df), "score_mean", "score_std")
    _log2_x(ax, df)
    ax.set_ylabel(score_axis_label(df))
    ax.set_title("score vs prompt count (a line: one configuration; mean ± std over seeds)", fontsize=9)


def _cost_panel(ax: Any, df: pd.DataFrame) -> None:
    keys = tables.config_keys(df, tables.COST_KNOBS)
    cost = df.dropna(subset=[COST]).groupby([*keys, PROMPTS], dropna=False, as_index=False).agg(gmacs=(COST, "mean"))
    _by_configuration(ax, cost, "gmacs", None)
    _log2_x(ax, df)
    _percent_axis(ax, df)
    ax.set_ylabel(COST_LABEL)
    ax.set_title("added computation vs prompt count (a line: one configuration)", fontsize=9)


def score_vs_prompts(df: pd.DataFrame) -> Any:
    """Validation score against prompt count: one line per configuration (mean ± std over seeds), points where a
    configuration ran at one prompt count only."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    _score_panel(ax, with_score(df))
    fig.tight_layout()
    return fig


def gmacs_vs_prompts(df: pd.DataFrame) -> Any:
    """Additional GMACs (and % of the base model, when known) against prompt count, one line per cost configuration."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    _cost_panel(ax, df)
    fig.tight_layout()
    return fig


def tradeoffs(df: pd.DataFrame) -> Any:
    """How score and cost move with the prompt count, per method: the two panels side by side, one line per configuration."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.4), dpi=100)
    _score_panel(left, with_score(df))
    _cost_panel(right, df)
    fig.tight_layout()
    return fig


def knob_colours(values: pd.Series, knob: str) -> tuple[np.ndarray, Any, Any, dict[str, Any]]:
    """Colour values, colormap, norm and colour-bar settings for ``knob``: one colour and one integer tick per value for
    an integer knob with few values, integer ticks for one with many, a log scale for a float knob spanning 8x or more."""
    x = values.astype(float).to_numpy()
    if knob in INTEGER_KNOBS or np.all(np.mod(x, 1) == 0):
        levels = np.unique(x)
        if len(levels) <= MAX_DISCRETE:
            index = np.searchsorted(levels, x)
            norm = colors.BoundaryNorm(np.arange(len(levels) + 1) - 0.5, len(levels))
            return index, matplotlib.colormaps["viridis"].resampled(len(levels)), norm, {"ticks": range(len(levels)), "labels": [str(int(v)) for v in levels]}
        return x, matplotlib.colormaps["viridis"], colors.Normalize(x.min(), x.max()), {"locator": MaxNLocator(integer=True)}
    log = x.min() > 0 and x.max() / x.min() >= 8
    norm = colors.LogNorm(x.min(), x.max()) if log else colors.Normalize(x.min(), x.max())
    return x, matplotlib.colormaps["viridis"], norm, {}


def colour_scatter(ax: Any, df: pd.DataFrame, x: str, y: str, knob: str, pad: float = 0.05) -> Any:
    """``y`` against ``x``, one marker per method, coloured by ``knob``; returns the colour bar (``pad`` away from the axes)."""
    c, cmap, norm, bar = knob_colours(df[knob], knob)
    mappable = None
    for i, method in enumerate(sorted(df["method"].astype(str).unique()) if "method" in df else [None]):
        mask = (df["method"].astype(str) == method).to_numpy() if method is not None else np.ones(len(df), bool)
        mappable = ax.scatter(df[x][mask], df[y][mask], c=c[mask], cmap=cmap, norm=norm, s=34, marker=MARKERS[i % len(MARKERS)],
                              edgecolors="k", linewidths=0.3, label=method)
    cbar = ax.figure.colorbar(mappable, ax=ax, label=knob, pad=pad)
    if "ticks" in bar:
        cbar.set_ticks(list(bar["ticks"]), labels=bar["labels"])
    elif "locator" in bar:
        cbar.locator = bar["locator"]
        cbar.update_ticks()
    if "method" in df and df["method"].nunique() > 1:
        ax.legend(fontsize=7)
    return cbar


def _searched(df: pd.DataFrame, knobs: tuple[str, ...]) -> list[str]:
    """The knobs of ``knobs`` that vary between trials of one method and are known for every trial."""
    return [k for k in tables.varied_within_method(df, knobs) if df[k].notna().all()]


def score_by_knob(df: pd.DataFrame, knobs: tuple[str, ...] = ("depth", "rank", "lr")) -> Any | None:
    """Score against prompt count as points coloured by each knob that varied between trials of one method (None when
    none did): a sweep's trials differ in several knobs at once, so no line joins them."""
    df = with_score(df).dropna(subset=[SCORE, PROMPTS])
    varied = _searched(df, knobs)
    if not varied:
        return None
    fig, axes = plt.subplots(1, len(varied), figsize=(5.4 * len(varied), 4.0), dpi=100, squeeze=False)
    for ax, knob in zip(axes[0], varied):
        colour_scatter(ax, df, PROMPTS, SCORE, knob)
        _log2_x(ax, df)
        ax.set_ylabel(score_axis_label(df))
        ax.set_title(f"score vs prompt count, coloured by {knob}", fontsize=9)
    fig.tight_layout()
    return fig


def cost_by_knob(df: pd.DataFrame, knobs: tuple[str, ...] = ("depth", "rank")) -> Any | None:
    """Additional GMACs against prompt count as points coloured by each cost knob that varied (None when none did)."""
    df = df.dropna(subset=[COST, PROMPTS])
    varied = _searched(df, knobs)
    if not varied:
        return None
    fig, axes = plt.subplots(1, len(varied), figsize=(5.4 * len(varied), 4.0), dpi=100, squeeze=False)
    for ax, knob in zip(axes[0], varied):
        right = _percent_axis(ax, df)
        colour_scatter(ax, df, PROMPTS, COST, knob, pad=0.22 if right else 0.05)
        _log2_x(ax, df)
        ax.set_ylabel(COST_LABEL)
        ax.set_title(f"added computation vs prompt count, coloured by {knob}", fontsize=9)
    fig.tight_layout()
    return fig


def pareto(df: pd.DataFrame, front: pd.DataFrame) -> Any:
    """Every trial (marker per method) and the accuracy-compute Pareto front: the frontier of what the trials reached,
    drawn as a step line, its points labelled with their prompt count and the other knobs that varied."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    df, front = with_score(df), with_score(front)
    for (method, part), marker in zip(df.groupby("method"), MARKERS):
        cut = tables.pruned(part)  # "trained p, pruned to k" hollow beside "trained k" filled, at the same cost
        dots = ax.scatter(part[COST][~cut], part[SCORE][~cut], marker=marker, s=30, alpha=0.7, label=str(method))
        if cut.any():
            ax.scatter(part[COST][cut], part[SCORE][cut], marker=marker, s=30, facecolors="none",
                       edgecolors=dots.get_facecolor()[:1] if len(dots.get_offsets()) else None, label=f"{method}, pruned")
    if len(front):
        keys = [k for k in tables.config_keys(df) if k in front and k != "method"]
        fr = front.sort_values(COST)
        ax.step(fr[COST], fr[SCORE], where="post", color="tab:red", lw=1.2)
        ax.scatter(fr[COST], fr[SCORE], s=90, facecolors="none", edgecolors="tab:red", label="Pareto front", zorder=3)
        for _, r in fr.iterrows():
            text = describe({"method": r["method"], **{k: r[k] for k in keys}}) + f", p={r[PROMPTS]}"
            ax.annotate(text, (r[COST], r[SCORE]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(COST_LABEL)
    top = _percent_axis(ax, df, axis="x")
    ax.set_ylabel(score_axis_label(df))
    ax.set_title("accuracy vs added computation", pad=30 if top else 6)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def importance(imp: Importance) -> Any | None:
    """Horizontal bars of the knobs' importance (None when it was not computed: too few trials, or nothing varied)."""
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
