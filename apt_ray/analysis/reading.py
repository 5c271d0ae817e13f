"""A short written reading of a study's figures, derived from the numbers so it stays true for any sweep: a trend with
the prompt count is stated only within configurations that differ in the prompt count alone, run at enough prompt
counts, with its n and effect size; otherwise the reading says why no trend is stated."""

from __future__ import annotations

from typing import Any

import pandas as pd

from apt_ray.analysis import tables
from apt_ray.analysis.importance import Importance
from apt_ray.analysis.tables import MIN_LINEAR_R2, MIN_PROMPT_COUNTS, PROMPTS, SCORE, describe

STRONG_RHO = 0.5  # |Spearman rho| from which the score is said to rise or fall with p ...
MAX_P_VALUE = 0.05  # ... when a correlation that strong is also this unlikely without a trend
MAX_LISTED = 8  # configurations listed one by one before the reading summarises them per method
STATS = ("trials", "prompt_counts", "rho", "p_value", "per_doubling", "slope", "r2", "gmacs_per_prompt", "pct_per_prompt")


def _key(row: pd.Series) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in STATS}


def _n(row: pd.Series) -> str:
    return f"n={int(row['trials'])} trials at {int(row['prompt_counts'])} prompt counts"


def _at_most(trends: pd.DataFrame) -> str:
    n, most = len(trends), int(trends["prompt_counts"].max())
    return f"the {n} configuration{'s' if n > 1 else ''} here ran at {most} prompt count{'s' if most > 1 else ''} at most"


def _knobs_held(df: pd.DataFrame, knobs: tuple[str, ...]) -> str:
    held = [k for k in tables.config_keys(df, knobs) if k != "method"]
    return ", ".join(["method", *held]) if held else "method"


def _score_trend(row: pd.Series) -> str:
    what = f"- **{describe(_key(row))}**: "
    change = f"{row['per_doubling']:+.2f} percentage points per doubling of p"
    if pd.isna(row["rho"]):
        return what + f"the score is the same at every prompt count ({_n(row)})."
    corr = f"Spearman ρ {row['rho']:+.2f}, p-value {row['p_value']:.2g}; {_n(row)}"
    if abs(row["rho"]) >= STRONG_RHO and row["p_value"] < MAX_P_VALUE:
        verb = "rises with p" if row["rho"] > 0 else "falls as p grows"
        return what + f"score {verb} ({corr}); {change}."
    return what + f"no monotone trend of the score with p ({corr}; least-squares change {change})."


def score_lines(df: pd.DataFrame) -> list[str]:
    """Score against p within each configuration run at :data:`MIN_PROMPT_COUNTS` or more prompt counts; why not, elsewhere."""
    trends = tables.score_trends(df)
    if trends.empty:
        return []
    enough = trends[trends["prompt_counts"] >= MIN_PROMPT_COUNTS]
    lines = [_score_trend(r) for _, r in enough.iterrows()]
    short = len(trends) - len(enough)
    if enough.empty:
        lines.append(f"- No trend of the score with the prompt count is stated: that needs one configuration (same "
                     f"{_knobs_held(df, tables.HELD)}; seeds repeat it) run at {MIN_PROMPT_COUNTS} or more prompt counts; "
                     f"{_at_most(trends)}.")
    elif short:
        lines.append(f"- {short} other configuration(s) ran at fewer than {MIN_PROMPT_COUNTS} prompt counts: no trend is stated for them.")
    return lines


def best_lines(df: pd.DataFrame) -> list[str]:
    """The best trial of each method, with every knob that varied (a fact about trials, not a trend)."""
    keys = [k for k in tables.config_keys(df) if k != "method"]
    lines = []
    for method, part in df.dropna(subset=[SCORE]).groupby("method"):
        best = part.loc[part[SCORE].idxmax()]
        knobs = f", {describe({k: best[k] for k in keys})}" if keys else ""
        lines.append(f"- Best **{method}** trial of {len(part)}: {best[SCORE]:.2f}% at p={int(best[PROMPTS])}{knobs}.")
    return lines


def _cost_trend(row: pd.Series) -> str:
    fit = f"R² {row['r2']:.4f}, {_n(row)}"
    if row["r2"] >= MIN_LINEAR_R2 and row["slope"] > 0:
        return (f"- Added computation of **{describe(_key(row))}** grows linearly with p: "
                f"{row['slope'] * 1e3:.4g} MMACs per prompt per site ({fit}).")
    return f"- Added computation of **{describe(_key(row))}** is not a straight line in p (slope {row['slope'] * 1e3:.4g} MMACs, {fit})."


def _per_prompt(row: pd.Series) -> str:
    pct = "" if pd.isna(row["pct_per_prompt"]) else f" ({row['pct_per_prompt']:.3g}% of the base model)"
    return f"{describe(_key(row))}: {row['gmacs_per_prompt'] * 1e3:.4g} MMACs{pct}"


def per_prompt_lines(df: pd.DataFrame) -> list[str]:
    """The closed-form cost of one more prompt per site at each configuration's own settings (or why it is not given)."""
    if "model" not in df or df["model"].isna().all():
        return ["- The closed-form cost of one more prompt is not given: the trials' runs do not record their model."]
    per = tables.cost_per_prompt(df)
    if per.empty:
        return ["- The closed-form cost of one more prompt is not given: no trial's method has prompts, "
                "or its configuration could not be rebuilt here."]
    if len(per) <= MAX_LISTED:
        items = "; ".join(_per_prompt(r) for _, r in per.iterrows())
    else:
        span = per.groupby("method")["gmacs_per_prompt"].agg(["min", "max", "size"])
        items = "; ".join(f"{m}: {r['min'] * 1e3:.4g} to {r['max'] * 1e3:.4g} MMACs over {int(r['size'])} configurations"
                          for m, r in span.iterrows())
    return [f"- One more prompt per site adds, by the closed form at each configuration's own settings: {items}."]


def cost_lines(df: pd.DataFrame) -> list[str]:
    """Cost against p within configurations that differ in p alone, the closed-form cost per prompt, APT's saving."""
    trends = tables.cost_trends(df)
    enough = trends[trends["prompt_counts"] >= MIN_PROMPT_COUNTS] if len(trends) else trends
    lines = [_cost_trend(r) for _, r in enough.iterrows()]
    if len(trends) and enough.empty:
        lines.append(f"- No growth of the logged cost with the prompt count is stated: that needs one configuration (same "
                     f"{_knobs_held(df, tables.COST_KNOBS)}) run at {MIN_PROMPT_COUNTS} or more prompt counts; {_at_most(trends)}.")
    lines += per_prompt_lines(df)
    ratio = tables.cost_ratio(df)
    if ratio is not None:
        p, r = ratio
        why = (": it skips projecting the prompts through W_k/W_v and keeps them out of the global softmax" if r < 1 else "")
        lines.append(f"- At p={int(p)}, APT adds {r:.2f}x the GMACs of deep prompting ({abs(1 - r) * 100:.0f}% "
                     f"{'less' if r < 1 else 'more'}, every other knob of the cost equal){why}.")
    return lines


def front_lines(df: pd.DataFrame, front: pd.DataFrame) -> list[str]:
    """The Pareto front's members, each with its prompt count and the other knobs that varied."""
    if front.empty:
        return ["- No trial has both a score and a cost, so there is no Pareto front."]
    keys = [k for k in tables.config_keys(df) if k in front]
    members = ", ".join(f"{describe({k: r[k] for k in keys})}, p={int(r[PROMPTS])} ({r[SCORE]:.2f}%)" for _, r in front.iterrows())
    counts = front["method"].value_counts()
    lead = f"; {counts.index[0]} holds {counts.iloc[0]} of its {len(front)} points" if len(counts) and 2 * counts.iloc[0] > len(front) else ""
    return [f"- Pareto front (best score first): {members}{lead}."]


def importance_line(imp: Importance) -> str:
    """The knob that explains most of the score's variance, or why importances are not shown."""
    if not imp.values:
        return f"- Parameter importances are not shown: {imp.note or 'they could not be computed'}."
    top, share = next(iter(imp.values.items()))
    note = f"; {imp.note}" if imp.note else ""
    return f"- The knob that explains most of the score's variance is **{top}** ({share:.0%}, fANOVA on {imp.trials} trials, {imp.source}{note})."


def _caveat(df: pd.DataFrame, epochs: int | None) -> str:
    repeats = int(tables.means_over_seeds(df)["trials"].max())
    return (f"- Caveat: {len(df)} trials" + (f" of {epochs} epoch(s)" if epochs else "") +
            (", one run per point: differences of a few points can be seed noise; add seeds (--seeds) before trusting them."
             if repeats <= 1 else f", up to {repeats} seeds per point (error bars: std over seeds)."))


def written_reading(df: pd.DataFrame, front: pd.DataFrame, imp: Importance, epochs: int | None = None) -> str:
    """Markdown: what varied, per-configuration score and cost trends (where supported), the closed-form cost of one
    more prompt, APT's saving, the front, importances (or why none) and caveats."""
    df, front = tables.with_score(df), tables.with_score(front)
    if df.empty:
        return "No trial of this study finished with a validation score: there is nothing to read yet."
    knobs = tables.varied(df, (*tables.HELD, PROMPTS))
    lines = ["**What the figures say**", "",
             f"- Knobs that varied between the {len(df)} trials: {', '.join(knobs) or 'none'} (seeds repeat a point). "
             "A trend with p is read only within one configuration: trials equal in every other knob.",
             *score_lines(df), *best_lines(df), *cost_lines(df), *front_lines(df, front), importance_line(imp), _caveat(df, epochs)]
    return "\n".join(lines)
