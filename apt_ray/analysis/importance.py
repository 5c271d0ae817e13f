"""Hyperparameter importance (Optuna's fANOVA) for a study's score: from the persisted Optuna study, or from the runs;
computed only from :data:`MIN_IMPORTANCE_TRIALS` scored trials up, and otherwise empty with the reason in its note."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from apt_ray.analysis.tables import SCORE, varied_within_method, with_score

DEFAULT_PARAMS = ("method", "num_prompts", "rank", "depth", "placement", "lr", "seed")
# fANOVA fits a random forest to the trials: with fewer than this many its shares are noise, not findings.
MIN_IMPORTANCE_TRIALS = 10


@dataclass
class Importance:
    """Importance of each varied knob (fractions summing to 1), where it came from, and on how many trials."""

    values: dict[str, float]
    source: str
    trials: int
    note: str = ""


def too_few_trials(trials: int) -> str | None:
    """Why importances are not computed on ``trials`` scored trials (None when there are enough)."""
    if trials >= MIN_IMPORTANCE_TRIALS:
        return None
    return (f"fANOVA importances need at least {MIN_IMPORTANCE_TRIALS} scored trials and this study has {trials}: "
            "with so few, the shares it gives the knobs are noise, so none are shown")


def _evaluator(seed: int) -> Any:
    from optuna.importance import FanovaImportanceEvaluator

    return FanovaImportanceEvaluator(seed=seed)


def _compute(study: Any, target: Any, seed: int) -> dict[str, float]:
    import optuna

    values = optuna.importance.get_param_importances(study, evaluator=_evaluator(seed), target=target, normalize=True)
    return {k: float(v) for k, v in values.items()}


def from_optuna_study(storage: str, study_name: str, objective: int = 0, seed: int = 0) -> Importance:
    """Importance for objective ``objective`` of the study a sweep persisted (its complete trials)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = _varied_params([t.params for t in complete])
    if reason := too_few_trials(len(complete)):
        return Importance({}, f"Optuna study '{study_name}'", len(complete), reason)
    if not varied:
        return Importance({}, f"Optuna study '{study_name}'", len(complete), "no knob varied between the finished trials")
    multi = len(study.directions) > 1
    values = _compute(study, (lambda t: t.values[objective]) if multi else None, seed)
    return Importance(values, f"Optuna study '{study_name}' ({storage})", len(complete))


def _varied_params(param_sets: Sequence[dict[str, Any]]) -> list[str]:
    keys = {k for p in param_sets for k in p}
    return sorted(k for k in keys if len({repr(p.get(k)) for p in param_sets}) > 1)


def _distribution(values: pd.Series) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        lo, hi = min(values), max(values)
        if all(float(v).is_integer() for v in values):
            return IntDistribution(int(lo), int(hi), log=lo > 0 and hi / lo >= 8)
        return FloatDistribution(float(lo), float(hi), log=lo > 0 and hi / lo >= 8)
    return CategoricalDistribution(sorted({str(v) for v in values}))


def from_runs(frame: pd.DataFrame, target: str = SCORE, params: Sequence[str] = DEFAULT_PARAMS, seed: int = 0) -> Importance:
    """Importance from the trials' logged params and ``target`` metric: the rows become trials of an in-memory
    Optuna study, scored by the same fANOVA evaluator (knobs that never changed are left out)."""
    import optuna

    frame = with_score(frame) if target == SCORE else frame
    df = frame[frame[target].notna()] if target in frame else frame.iloc[0:0]
    df = df[[math.isfinite(float(v)) for v in df[target]]] if len(df) else df
    knobs = [p for p in params if p in df and df[p].notna().all() and df[p].astype(str).nunique() > 1]
    aliases = _method_aliases(df, knobs)
    knobs = [k for k in knobs if k not in aliases]
    if reason := too_few_trials(len(df)):
        return Importance({}, "MLflow runs", len(df), reason)
    if not knobs:
        return Importance({}, "MLflow runs", len(df), "no knob varied between the scored trials")
    if df[target].astype(float).nunique() < 2:  # fANOVA has no variance to share out
        return Importance({}, "MLflow runs", len(df), f"every trial scored the same {target}: no knob made a difference")
    dists = {k: _distribution(df[k]) for k in knobs}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    for _, row in df.iterrows():
        values = {k: (str(row[k]) if isinstance(dists[k], optuna.distributions.CategoricalDistribution) else row[k]) for k in knobs}
        values = {k: int(v) if isinstance(dists[k], optuna.distributions.IntDistribution) else v for k, v in values.items()}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=dists, value=float(row[target])))
    note = (f"{', '.join(aliases)} changed only with the method (one value per method), so the method's share holds theirs"
            if aliases else "")
    return Importance(_compute(study, None, seed), "MLflow runs", len(df), note)


def _method_aliases(df: pd.DataFrame, knobs: Sequence[str]) -> list[str]:
    """Knobs that take one value per method (a per-method default): fANOVA cannot tell them from the method."""
    if "method" not in knobs:
        return []
    return [k for k in knobs if k != "method" and k not in varied_within_method(df, (k,))]


def parameter_importance(frame: pd.DataFrame, parent: dict[str, Any], seed: int = 0) -> Importance:
    """The persisted Optuna study's importance when its database is reachable from here, else the runs'."""
    import optuna

    from apt_ray.analysis.runs import optuna_storage_of

    storage, name = optuna_storage_of(parent), parent.get("study")
    if storage and name:
        try:
            return from_optuna_study(storage, name, seed=seed)
        except (KeyError, ValueError, RuntimeError, optuna.exceptions.OptunaError) as e:
            fallback = from_runs(frame, seed=seed)
            read = f"the Optuna study could not be read ({type(e).__name__}: {e}); computed from the runs"
            fallback.note = f"{read}; {fallback.note}" if fallback.note else read
            return fallback
    return from_runs(frame, seed=seed)
