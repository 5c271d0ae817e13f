"""Summaries of a study's trials that hold the other knobs fixed: means over seeds, trends with the prompt count
(only within configurations that differ in the prompt count alone), the closed-form cost of one more prompt, the
Pareto front."""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from apt_ray.errors import UserError
from apt_ray.methods.spec import MethodSpec
from apt_ray.sweep.summary import pareto_front
from apt_ray.tasks import SCORE_KEY, metric_aliases

SCORE = SCORE_KEY  # the task's score, whatever the task (VQA: the VQA accuracy, in percent)
COST = "additional_gmacs"
BASE = "base_gmacs"  # the base model's GMACs at the trial's shapes (absent for runs of older versions)
COST_PCT = "cost_pct"  # additional GMACs in percent of the base model's
PROMPTS = "num_prompts"
# What a trial's closed-form cost depends on besides the prompt count: the backbone, its input shapes, the method's knobs.
SETTINGS = ("model", "checkpoint", "data", "max_text_len", "image_size", "method",
            *(k for k in MethodSpec.model_fields if k not in ("name", PROMPTS)))
COST_KNOBS = SETTINGS  # what a cost configuration holds fixed (lr, epochs and the seed do not change the cost)
HELD = (*SETTINGS, "lr", "epochs", "workers")  # held fixed for a score trend (seed is a repeat, not a knob)
MIN_PROMPT_COUNTS = 3  # distinct prompt counts a configuration needs before a trend with p is stated
PRUNE = "prune_keep"  # a knob like any other: a pruned trial is never in the configuration of an unpruned one
MIN_LINEAR_R2 = 0.999  # how closely a line must fit the cost before "grows linearly" is stated
LABELS = {"max_text_len": "text length", "image_size": "image size"}


def with_score(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a :data:`SCORE` column: as it is when it has one, else copied from a column under an old name of
    the score that a task declares as an alias (frames of runs logged by older versions, whose only score was the VQA task's own metric)."""
    if SCORE in df:
        return df
    for old, new in metric_aliases().items():
        if new == SCORE and old in df:
            return df.assign(**{SCORE: df[old]})
    return df


def with_cost_pct(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with :data:`COST_PCT`: additional GMACs in percent of the base model's (NaN where the base is unknown)."""
    if COST not in df:
        return df.assign(**{COST_PCT: np.nan})
    base = pd.to_numeric(df[BASE], errors="coerce") if BASE in df else pd.Series(np.nan, index=df.index)
    return df.assign(**{COST_PCT: 100.0 * pd.to_numeric(df[COST], errors="coerce") / base.where(base > 0)})


def has_base(df: pd.DataFrame) -> bool:
    """Whether every trial of ``df`` carries its base model's GMACs (so cost can be read in % of the base)."""
    return BASE in df and len(df) > 0 and bool(pd.to_numeric(df[BASE], errors="coerce").gt(0).all())


# -- configurations: trials that differ in the prompt count (and seed) only -------------------------------------

def pruned(df: pd.DataFrame) -> pd.Series:
    """Which trials trained more prompts than they kept (``prune_keep`` below 1); runs without the knob did not prune."""
    if PRUNE not in df:
        return pd.Series(False, index=df.index)
    return pd.to_numeric(df[PRUNE], errors="coerce").fillna(1.0) < 1.0


def varied(df: pd.DataFrame, knobs: Sequence[str]) -> list[str]:
    """The knobs of ``knobs`` that take more than one value in ``df``."""
    return [k for k in knobs if k in df and df[k].astype(str).nunique() > 1]


def varied_within_method(df: pd.DataFrame, knobs: Sequence[str]) -> list[str]:
    """The knobs of ``knobs`` that vary between trials of one method (not only from one method's default to another's)."""
    if "method" not in df:
        return varied(df, knobs)
    parts = [part for _, part in df.groupby("method", dropna=False)]
    return [k for k in varied(df, knobs) if k != "method" and any(varied(part, (k,)) for part in parts)]


def config_keys(df: pd.DataFrame, knobs: Sequence[str] = HELD) -> list[str]:
    """The columns that tell ``df``'s configurations apart: the method, then every other knob of ``knobs`` that varied
    between trials of one method (a knob that is fixed per method, such as a per-method learning rate, adds nothing)."""
    return ["method", *varied_within_method(df, knobs)] if "method" in df else varied(df, knobs)


def _plain(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, (tuple, list)) and bool(pd.isna(value)))


def describe(key: dict[str, Any]) -> str:
    """A configuration in words: ``apt, rank 4, depth 2`` (a missing depth means every layer)."""
    parts = []
    for k, v in key.items():
        if k == "method":
            parts.insert(0, str(v))
        elif k == "depth" and _missing(v):
            parts.append("depth all")
        else:
            v = f"{v:.3g}" if isinstance(v, float) and not v.is_integer() else _plain(v)
            parts.append(f"{LABELS.get(k, k)} {'-' if _missing(v) else v}")
    return ", ".join(parts)


def configurations(df: pd.DataFrame, knobs: Sequence[str] = HELD) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """Each configuration (values of :func:`config_keys`) and its trials, which differ only in what ``knobs`` leaves out."""
    keys = config_keys(df, knobs)
    if not keys:
        yield {}, df
        return
    for values, part in df.groupby(keys, dropna=False, sort=True):
        yield dict(zip(keys, values)), part


def means_over_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and prompt count: trials, mean and std (over seeds) of the score, mean cost (GMACs, % of base)."""
    df = with_cost_pct(with_score(df if COST in df else df.assign(**{COST: np.nan})))
    keys = [*config_keys(df), PROMPTS]
    cols = [*keys, "trials", "score_mean", "score_std", "gmacs", COST_PCT]
    if df.empty or SCORE not in df:
        return pd.DataFrame(columns=cols)
    out = df.groupby(keys, dropna=False, as_index=False).agg(
        trials=(SCORE, "size"), score_mean=(SCORE, "mean"), score_std=(SCORE, "std"), gmacs=(COST, "mean"), **{COST_PCT: (COST_PCT, "mean")})
    return out[cols].sort_values(keys).reset_index(drop=True)


# -- trends with the prompt count, within configurations ---------------------------------------------------------

def score_trends(df: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: trials, distinct prompt counts and, with at least :data:`MIN_PROMPT_COUNTS` of them, the
    Spearman correlation of score with p (and its p-value) and the least-squares score change per doubling of p."""
    df = with_score(df)
    rows = []
    for key, part in configurations(df.dropna(subset=[PROMPTS, SCORE]) if SCORE in df else df.iloc[0:0]):
        row = {**key, "trials": len(part), "prompt_counts": part[PROMPTS].nunique(),
               "rho": np.nan, "p_value": np.nan, "per_doubling": np.nan}
        if row["prompt_counts"] >= MIN_PROMPT_COUNTS:
            x, y = part[PROMPTS].astype(float), part[SCORE].astype(float)
            row["per_doubling"] = float(stats.linregress(np.log2(x), y).slope)
            if y.nunique() > 1:  # a constant score has no rank correlation
                rho = stats.spearmanr(x, y)
                row.update(rho=float(rho.statistic), p_value=float(rho.pvalue))
        rows.append(row)
    return pd.DataFrame(rows)


def cost_trends(df: pd.DataFrame) -> pd.DataFrame:
    """Per cost configuration (the knobs cost depends on, other than p): trials, distinct prompt counts and, with at
    least :data:`MIN_PROMPT_COUNTS`, the least-squares slope of additional GMACs against p and the line's R²."""
    rows = []
    for key, part in configurations(df.dropna(subset=[PROMPTS, COST]) if COST in df else df.iloc[0:0], COST_KNOBS):
        row = {**key, "trials": len(part), "prompt_counts": part[PROMPTS].nunique(), "slope": np.nan, "r2": np.nan}
        if row["prompt_counts"] >= MIN_PROMPT_COUNTS:
            fit = stats.linregress(part[PROMPTS].astype(float), part[COST].astype(float))
            row.update(slope=float(fit.slope), r2=float(fit.rvalue ** 2) if np.isfinite(fit.rvalue) else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


# -- the closed-form cost of one more prompt ------------------------------------------------------------------------

def _settings_of(row: pd.Series) -> dict[str, Any]:
    return {k: _plain(row[k]) for k in (*SETTINGS, PROMPTS) if k in row and not _missing(row[k])}


def _extra_prompt_cost(settings: dict[str, Any]) -> float:
    """cost(p + 1) - cost(p) at the trial's other settings, from the closed form (NaN where it cannot be built here)."""
    from apt_ray.config import build_train_config
    from apt_ray.profile.cost import trial_cost

    p = int(settings[PROMPTS])
    try:
        at = [trial_cost(build_train_config(overrides={**settings, PROMPTS: q})).additional_gmacs for q in (p, p + 1)]
    except (UserError, OSError, ValueError):  # e.g. a checkpoint that is not readable from here
        return math.nan
    return at[1] - at[0]


def closed_form_per_prompt(df: pd.DataFrame) -> pd.Series:
    """Per trial, the GMACs one more prompt per site adds at the trial's other settings (the closed forms are linear in
    p, so this is their slope); NaN for methods without prompts and for trials whose model is not known."""
    from apt_ray.methods import registry

    with_prompts = set(registry.knob_users(PROMPTS))
    out = pd.Series(np.nan, index=df.index, dtype=float)
    done: dict[str, float] = {}
    for idx, row in df.iterrows():
        settings = _settings_of(row)
        if settings.get("method") not in with_prompts or "model" not in settings or PROMPTS not in settings:
            continue
        key = repr(sorted((k, v) for k, v in settings.items() if k != PROMPTS))  # the same slope at every p
        if key not in done:
            done[key] = _extra_prompt_cost(settings)
        out[idx] = done[key]
    return out


def cost_per_prompt(df: pd.DataFrame) -> pd.DataFrame:
    """Per cost configuration: the closed-form GMACs of one more prompt per site, and in % of the base model's GMACs."""
    keys = config_keys(df, COST_KNOBS)
    cols = [*keys, "gmacs_per_prompt", "pct_per_prompt"]
    if df.empty or "model" not in df:
        return pd.DataFrame(columns=cols)
    base = pd.to_numeric(df[BASE], errors="coerce") if BASE in df else pd.Series(np.nan, index=df.index)
    per = df.assign(gmacs_per_prompt=closed_form_per_prompt(df), base=base.where(base > 0))
    out = per.groupby(keys, dropna=False, as_index=False).agg(gmacs_per_prompt=("gmacs_per_prompt", "first"), base=("base", "mean"))
    out["pct_per_prompt"] = 100.0 * out["gmacs_per_prompt"] / out["base"]
    return out.dropna(subset=["gmacs_per_prompt"])[cols].reset_index(drop=True)


# -- comparisons and the front ---------------------------------------------------------------------------------------

def cost_ratio(df: pd.DataFrame, method: str = "apt", reference: str = "deep_prompt") -> tuple[float, float] | None:
    """``(prompt count, method GMACs / reference GMACs)`` at the largest prompt count both ran with every other knob
    that cost depends on equal, if any. A knob that takes one value per method (a method's own layout, e.g. which
    attention sites it uses) belongs to the method and is not held equal."""
    if COST not in df or "method" not in df:
        return None
    other = [k for k in varied(df, COST_KNOBS) if k != "method" and df.groupby("method")[k].nunique(dropna=False).max() > 1]
    cost = df.dropna(subset=[COST]).groupby([*other, PROMPTS, "method"], dropna=False)[COST].mean().unstack("method")
    if method not in cost or reference not in cost:
        return None
    both = cost[[method, reference]].dropna()
    both = both[both[reference] > 0]
    if both.empty:
        return None
    prompts = both.index.get_level_values(PROMPTS)
    at = both[prompts == prompts.max()].iloc[0]
    return float(prompts.max()), float(at[method] / at[reference])


def front(df: pd.DataFrame, metrics: tuple[str, str] = (SCORE, COST), modes: tuple[str, str] = ("max", "min")) -> pd.DataFrame:
    """The accuracy-compute Pareto front (best score first), as rows of ``df``."""
    df = with_score(df)
    rows = pareto_front(df.to_dict("records"), list(metrics), list(modes))
    return pd.DataFrame(rows, columns=df.columns)
