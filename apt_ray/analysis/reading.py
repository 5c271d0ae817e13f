"""A short written reading of a study's figures, derived from the numbers (so it stays true for any sweep)."""

from __future__ import annotations

import pandas as pd

from apt_ray.analysis.importance import Importance
from apt_ray.analysis.tables import SCORE, by_method_and_prompts, with_score, cost_ratio, gmacs_per_prompt, trend


def _score_lines(df: pd.DataFrame) -> list[str]:
    lines = []
    table = by_method_and_prompts(df)
    for method, part in table.groupby("method"):
        best = part.loc[part["score_mean"].idxmax()]
        worst = part.loc[part["score_mean"].idxmin()]
        rho = trend(df, str(method))
        shape = "" if rho is None else (f"; score rises with the prompt count (Spearman {rho:+.2f})" if rho > 0.5 else
                                        f"; score falls as prompts grow (Spearman {rho:+.2f})" if rho < -0.5 else
                                        f"; no clear trend with the prompt count (Spearman {rho:+.2f})")
        if best["score_mean"] == worst["score_mean"]:
            lines.append(f"- **{method}**: {best['score_mean']:.2f} at every prompt count tried{shape}.")
            continue
        lines.append(f"- **{method}**: best {best['score_mean']:.2f} at p={int(best['num_prompts'])}, "
                     f"worst {worst['score_mean']:.2f} at p={int(worst['num_prompts'])}{shape}.")
    return lines


def _cost_lines(df: pd.DataFrame) -> list[str]:
    slopes = gmacs_per_prompt(df)
    lines = []
    if slopes:
        parts = ", ".join(f"{m} {s * 1e3:.4g} MMACs" for m, s in sorted(slopes.items(), key=lambda kv: kv[1]))
        lines.append(f"- Added computation grows linearly with the prompt count; one more prompt per site costs: {parts}.")
    ratio = cost_ratio(df)
    if ratio is not None:
        p, r = ratio
        lines.append(f"- At p={int(p)}, APT adds {r:.2f}x the GMACs of deep prompting ({(1 - r) * 100:.0f}% less): it skips "
                     "projecting the prompts through W_k/W_v and keeps them out of the global softmax.")
    return lines


def _front_lines(front: pd.DataFrame) -> list[str]:
    if front.empty:
        return ["- No trial has both a score and a cost, so there is no Pareto front."]
    members = ", ".join(f"{r['method']} p={int(r['num_prompts'])} ({r[SCORE]:.2f})" for _, r in front.iterrows())
    counts = front["method"].value_counts()
    lead = f"; {counts.index[0]} holds {counts.iloc[0]} of its {len(front)} points" if len(counts) and 2 * counts.iloc[0] > len(front) else ""
    return [f"- Pareto front (best score first): {members}{lead}."]


def written_reading(df: pd.DataFrame, front: pd.DataFrame, imp: Importance, epochs: int | None = None) -> str:
    """Markdown: per-method score trend, cost growth and APT's saving, the front, the most important knob, and caveats."""
    df, front = with_score(df), with_score(front)
    if df.empty:
        return "No trial of this study finished with a validation score: there is nothing to read yet."
    lines = ["**What the figures say**", "", *_score_lines(df), *_cost_lines(df), *_front_lines(front)]
    if imp.values:
        top, share = next(iter(imp.values.items()))
        lines.append(f"- The knob that explains most of the score's variance is **{top}** ({share:.0%}, fANOVA on {imp.trials} trials, {imp.source}).")
    repeats = by_method_and_prompts(df)["trials"].max()
    caveat = (f"- Caveat: {len(df)} trials" + (f" of {epochs} epoch(s)" if epochs else "") +
              (", one run per point: differences of a few points can be seed noise; add seeds (--seeds) before trusting them."
               if repeats <= 1 else f", up to {repeats} seeds per point (error bars: std over seeds)."))
    lines.append(caveat)
    return "\n".join(lines)
