"""``OptunaSearch`` with a FLOPs budget: over-budget proposals are told to Optuna as pruned and never become trials;
so are repeats of a configuration already proposed (TPE repeats itself in small discrete spaces).

A configuration's cost is known before training (the closed form of
``apt_ray.profile.cost``): the search computes it once, when it proposes the
configuration, and passes it to the trial in its config (``_cost``); the trial
adds it to every report, where Tune and Optuna read it as an objective. The Optuna study lives in an RDB storage (sqlite beside the sweep's
results), so it survives restarts and can be opened later with
``optuna.load_study``. Failed trials are told as FAIL even when they reported an
epoch before failing.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from apt_ray.profile.cost import trial_cost
from apt_ray.sweep.spec import StudySpec

log = logging.getLogger("apt_ray.sweep")
MAX_REJECTIONS = 500
COST_KEY = "_cost"  # in a trial's config: its closed-form cost metrics


class RejectionSink(Protocol):
    def over_budget(self, number: int, config: dict[str, Any], cost: dict[str, float], reason: str) -> None: ...


def over_budget_reason(additional_gmacs: float, limit: float) -> str:
    return f"over the FLOPs budget: {additional_gmacs:.4g} additional GMACs > max_additional_gmacs {limit:g}"


def optuna_storage(url: str) -> Any:
    """An Optuna RDB storage for ``url`` (e.g. ``sqlite:////abs/optuna.db``)."""
    import optuna

    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None)


class BudgetedOptunaSearch(OptunaSearch):
    """TPE (multi-objective when the study has several objectives) that skips configurations over the budget."""

    def __init__(self, spec: StudySpec, storage: Any, sinks: Sequence[RejectionSink] = ()) -> None:
        from apt_ray.sweep.space import optuna_distributions

        metric: Any = spec.metrics if spec.multi_objective else spec.metrics[0]
        mode: Any = spec.modes if spec.multi_objective else spec.modes[0]
        super().__init__(space=optuna_distributions(spec.space()), metric=metric, mode=mode, study_name=spec.name,
                         storage=storage, seed=spec.seed,
                         points_to_evaluate=[dict(p) for p in spec.initial_points] or None)
        self._limit = spec.max_additional_gmacs
        self._spec = spec
        self._sinks = list(sinks)  # told of each over-budget proposal (the MLflow record, the console)
        self.rejected = 0
        self.exhausted = False
        self._proposed: dict[tuple, int] = {}  # configuration -> Optuna trial number that first proposed it

    def suggest(self, trial_id: str) -> dict | None:
        for _ in range(MAX_REJECTIONS):
            params = super().suggest(trial_id)
            if params is None or params == Searcher.FINISHED:
                return params
            ot_trial = self._ot_trials[trial_id]
            key = _key(params)
            if key in self._proposed:
                ot_trial.set_user_attr("status", "duplicate")
                ot_trial.set_user_attr("duplicate_of", self._proposed[key])
                self._skip(trial_id)
                continue
            cost = trial_cost(self._spec.train_config(params))
            ot_trial.set_user_attr("additional_gmacs", cost.additional_gmacs)
            self._proposed[key] = ot_trial.number
            if self._limit is None or cost.additional_gmacs <= self._limit:
                ot_trial.set_user_attr("tune_trial_id", trial_id)
                return {**params, COST_KEY: cost.metrics()}
            # over budget: recorded as pruned in the study, never trained; ask again for this trial slot
            ot_trial.set_user_attr("status", "over_budget")
            self._skip(trial_id)
            self.rejected += 1
            log.info("Optuna trial %d is over the FLOPs budget (%.4g > %g GMACs): pruned before training",
                     ot_trial.number, cost.additional_gmacs, self._limit)
            for sink in self._sinks:
                sink.over_budget(ot_trial.number, {**self._spec.base_config(), **params}, cost.metrics(),
                                 over_budget_reason(cost.additional_gmacs, self._limit))
        self.exhausted = True
        log.warning("%d proposals in a row were over the FLOPs budget or repeats: the space is used up, stopping the search",
                    MAX_REJECTIONS)
        return Searcher.FINISHED

    def untold(self) -> list[str]:
        """Tune trials this search proposed but never heard the end of (stopped by an interrupted sweep)."""
        return [t for t in self._ot_trials if t not in self._completed_trials]

    def _skip(self, trial_id: str) -> None:
        """Tell Optuna a proposal was pruned without training, and free the Tune trial's slot for a new one."""
        self._ot_study.tell(self._ot_trials.pop(trial_id), state=_pruned())

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr("status", "failed")
            self._ot_study.tell(ot_trial, state=_failed(), skip_if_finished=True)  # told already by a killed driver
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, round(v, 12) if isinstance(v, float) else v) for k, v in params.items()))


def _pruned() -> Any:
    from optuna.trial import TrialState

    return TrialState.PRUNED


def _failed() -> Any:
    from optuna.trial import TrialState

    return TrialState.FAIL
