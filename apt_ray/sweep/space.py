"""Search spaces: the knobs a study samples, their default ranges, and their Optuna distributions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Scalar = int | float | str | bool


class ParamSpec(BaseModel):
    """One searched knob: an int or float range (optionally log-scaled) or a list of choices."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Scalar] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ParamSpec":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical knob needs 'choices' (a non-empty list)")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("a categorical knob takes only 'choices', not low/high/log")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"choices {self.choices} repeat a value")
            return self
        if self.choices is not None:
            raise ValueError(f"an {self.type} knob takes low/high, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"an {self.type} knob needs both 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an int knob needs whole-number bounds, got {self.low}..{self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scaled knob needs low > 0, got {self.low}")
        return self

    def bounds(self) -> list[Scalar]:
        """The extreme values this knob can take (the choices for a categorical)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def describe(self) -> str:
        """Short human form, e.g. ``int 1..256 (log)`` or ``{bottom, top}``."""
        if self.type == "categorical":
            return "{" + ", ".join(map(str, self.choices or [])) + "}"
        lo, hi = self.bounds()
        return f"{self.type} {lo:g}..{hi:g}" + (" (log)" if self.log else "")


def default_space(method: str, num_layers: int, hidden_size: int) -> dict[str, ParamSpec]:
    """The default space of ``method``: the ``searchable`` ranges it registered (see
    :mod:`apt_ray.methods.registry`), on this backbone. The built-in methods search only the knobs they read, among
    prompts log 1..256, rank log 1..min(64, hidden), adapter width log 1..min(256, hidden), depth 1..layers,
    placement, and lr log 1e-4..3e-2."""
    from apt_ray.methods.registry import get_method

    return {k: ParamSpec(**s.resolve(num_layers, hidden_size)) for k, s in get_method(method).searchable.items()}


def optuna_distributions(space: dict[str, ParamSpec]) -> dict[str, Any]:
    """The space as Optuna distributions (what ``OptunaSearch(space=...)`` takes)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.type == "int":
            out[name] = IntDistribution(int(p.low), int(p.high), log=p.log)
        elif p.type == "float":
            out[name] = FloatDistribution(float(p.low), float(p.high), log=p.log)
        else:
            out[name] = CategoricalDistribution(list(p.choices or []))
    return out


def space_as_dict(space: dict[str, ParamSpec]) -> dict[str, dict[str, Any]]:
    """JSON-ready form of a space (for the parent run's artifact)."""
    return {k: p.model_dump(exclude_none=True) for k, p in space.items()}
