"""FLOPs budget: a configuration's additional GMACs are known before training, so over-budget ones never train.

The cost comes from the methods' closed-form formulas on a weightless (meta
device) model at the trial's input shapes; ``apt_ray.profile`` reports the same
formulas as ``analytic_additional_gmacs`` and its tests check them against the
measured count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apt_ray.config import TrainConfig
from apt_ray.sweep.meta import Cost, closed_form_cost

if TYPE_CHECKING:
    from apt_ray.sweep.spec import StudySpec


def trial_cost(cfg: TrainConfig) -> Cost:
    """Closed-form cost of a trial config at the shapes its data will have (as the training loop profiles it)."""
    from apt_ray.models.presets import checkpoint_config

    config = checkpoint_config(cfg.model, cfg.checkpoint)
    return closed_form_cost(cfg.model, cfg.method_spec(), cfg.text_len, cfg.profile_shape()[0],
                            None if config is None else config.to_json_string())


@dataclass(frozen=True)
class Verdict:
    """The budget's answer for one configuration."""

    within: bool
    additional_gmacs: float
    updated_params: int
    limit: float | None

    @property
    def reason(self) -> str:
        if self.within:
            return ""
        return f"over the FLOPs budget: {self.additional_gmacs:.4g} additional GMACs > max_additional_gmacs {self.limit:g}"


def check_budget(cfg: TrainConfig, limit: float | None) -> Verdict:
    """Whether ``cfg`` fits ``limit`` additional GMACs (always true without a limit)."""
    cost = trial_cost(cfg)
    return Verdict(limit is None or cost.additional_gmacs <= limit, cost.additional_gmacs, cost.updated_params, limit)


def cheapest_cost(spec: "StudySpec") -> float:
    """Additional GMACs of the cheapest corner of the space (every int/float knob at its low bound, each choice tried)."""
    params: dict[str, Any] = {}
    categorical: dict[str, list[Any]] = {}
    for name, knob in spec.space().items():
        if knob.type == "categorical":
            categorical[name] = list(knob.choices or [])
        else:
            params[name] = knob.bounds()[0]
    combos: list[dict[str, Any]] = [dict(params)]
    for name, choices in categorical.items():
        combos = [{**c, name: v} for c in combos for v in choices]
    return min(trial_cost(spec.train_config(c)).additional_gmacs for c in combos[:64])
