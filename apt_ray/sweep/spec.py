"""``StudySpec``: one sweep, read from YAML + overrides and checked against the model before Ray starts."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from apt_ray.config import TrainConfig, load_mapping
from apt_ray.data.spec import ARROW_KINDS, DataKind
from apt_ray.errors import UserError, validation_message
from apt_ray.methods.registry import get_method
from apt_ray.methods.spec import MethodName
from apt_ray.sweep.space import ParamSpec, default_space
from apt_ray.tasks import SCORE_KEY, canonical_metric

EPOCH_METRICS = (SCORE_KEY, "train_loss", "samples_per_s", "step_time_ms")
CONSTANT_METRICS = ("additional_gmacs", "updated_params")
TOP_LEVEL = ("model", "method", "data")


class Objective(BaseModel):
    """One optimisation target: a reported metric and its direction."""

    model_config = ConfigDict(extra="forbid")

    # val_score: the task's score; an old name that a task declares as an alias of a metric (the VQA task: the name
    # older study files used for the score) reads as that metric
    metric: Annotated[Literal["val_score", "train_loss", "samples_per_s", "step_time_ms", "additional_gmacs", "updated_params"],
                      BeforeValidator(lambda v: canonical_metric(v) if isinstance(v, str) else v)]
    mode: Literal["max", "min"]


class SchedulerSpec(BaseModel):
    """Trial scheduler: ``auto`` is ASHA for single-objective studies on a per-epoch metric, else FIFO."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "asha", "fifo"] = "auto"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung")


class Resources(BaseModel):
    """What one trial reserves: Ray Train workers, and CPUs/GPUs per worker."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_failures: int = Field(0, ge=-1, description="Ray Train restarts of a trial's workers from their latest checkpoint (-1: no limit)")


def _default_objectives() -> list[Objective]:
    return [Objective(metric=SCORE_KEY, mode="max"), Objective(metric="additional_gmacs", mode="min")]


class StudySpec(BaseModel):
    """A sweep: backbone, data and method; fixed trial settings; the searched space; objectives; budget; resources."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("apt-study", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="study name (MLflow experiment, Optuna study)")
    model: str = "tiny-meter"
    method: MethodName = "apt"
    data: DataKind = "synthetic"
    fixed: dict[str, Any] = Field(default_factory=dict, description="TrainConfig settings every trial shares")
    search_space: dict[str, ParamSpec] | None = Field(None, description="replaces the default space when given")
    initial_points: list[dict[str, Any]] = Field(default_factory=list, description="configurations tried first (every searched knob set)")
    objectives: list[Objective] = Field(default_factory=_default_objectives, min_length=1, max_length=3)
    num_trials: int = Field(8, ge=1)
    concurrency: int = Field(2, ge=1, description="trials running at once")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: Resources = Field(default_factory=Resources)
    max_additional_gmacs: float | None = Field(None, gt=0, description="reject configurations above this cost before training")
    seed: int = Field(0, ge=0, description="seed of Optuna's sampler")
    tracking_uri: str | None = None
    experiment: str | None = None
    storage_path: str | None = None

    # -- derived -------------------------------------------------------------
    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]

    def space(self) -> dict[str, ParamSpec]:
        """The searched knobs: the given space, else the default for this method and backbone."""
        if self.search_space is not None:
            return dict(self.search_space)
        from apt_ray.profile.cost import model_limits

        limits = model_limits(self.model)
        return default_space(self.method, limits.num_layers, limits.hidden_size)

    def use_asha(self) -> bool:
        kind = self.scheduler.kind
        return kind == "asha" or (kind == "auto" and not self.multi_objective and self.objectives[0].metric in EPOCH_METRICS)

    def base_config(self) -> dict[str, Any]:
        """The settings every trial shares (sampled knobs are added per trial)."""
        return {"model": self.model, "method": self.method, "data": self.data, **self.fixed}

    def train_config(self, params: dict[str, Any]) -> TrainConfig:
        """The validated trial config for sampled ``params``."""
        try:
            return TrainConfig.model_validate({**self.base_config(), **params})
        except ValidationError as e:
            raise UserError(validation_message(e, list(TrainConfig.model_fields))) from None

    @property
    def epochs(self) -> int:
        """Epochs of every trial: ``fixed.epochs``, else its recipe's."""
        return int(self.train_config({}).epochs)


# -- loading -------------------------------------------------------------------

def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw["a"]["b"] = value`` for ``key="a.b"`` (creating mappings on the way)."""
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override '{key}': '{part}' is not a mapping in the study config, so it has no '{last}'.")
        node = child
    node[last] = value


def load_study_spec(path: str | Path | None, overrides: dict[str, Any] | None = None) -> StudySpec:
    """Read YAML, apply dotted overrides (``fixed.epochs``, ``resources.workers``), validate, check against the model."""
    raw = load_mapping(path)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(validation_message(e, _all_keys(), _trial_key_hints(raw))) from None
    check_spec(spec)
    return spec


def _all_keys() -> list[str]:
    return [*StudySpec.model_fields, *Resources.model_fields, *SchedulerSpec.model_fields, *Objective.model_fields,
            *ParamSpec.model_fields]


def _trial_key_hints(raw: dict[str, Any]) -> dict[str, str]:
    """For each top-level key that is a trial setting (``num_prompts=32``), where it goes in a study instead."""
    hints = {}
    for key, value in raw.items():
        if key in StudySpec.model_fields or key not in TrainConfig.model_fields or key.startswith("_"):
            continue
        shown = value if isinstance(value, str) else json.dumps(value)
        hints[key] = (f"'{key}' is a trial setting: give fixed.{key}={shown} to set it for every trial, "
                      f"or search_space.{key}={_search_example(value)} to search it")
    return hints


def _search_example(value: Any) -> str:
    """A search-space entry of the kind that suits ``value``, with placeholders for the bounds or choices."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "{type: categorical, choices: [...]}"
    return "{type: %s, low: ..., high: ...}" % ("int" if isinstance(value, int) else "float")


# -- checks against the model ----------------------------------------------------

def check_spec(spec: StudySpec) -> None:
    """Everything that can be checked without Ray: keys, bounds against the backbone, objectives, budget."""
    from apt_ray.profile.cost import model_limits

    limits = model_limits(spec.model)  # UserError for an unknown preset
    _check_fixed(spec)
    _check_value(spec, None, None, limits)
    space = spec.space()
    if not space:
        raise UserError("the search space is empty: give search_space at least one knob (or leave it out for the default).")
    fields = list(TrainConfig.model_fields)
    for name, knob in space.items():
        if name not in fields or name.startswith("_"):
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"search_space.{name}: '{name}' is not a trial setting{hint}. Search TrainConfig keys such as num_prompts, rank, depth, placement, lr.")
        if name == "method" and knob.type == "categorical":
            pass  # a study may compare methods: each trial's method is one of the choices (prompt-length grids)
        elif name in TOP_LEVEL or name == "layers":
            raise UserError(f"search_space.{name}: '{name}' cannot be searched ({'a list' if name == 'layers' else 'it is fixed per study'}); "
                            "search depth and placement instead, or run one study per value.")
        if name in spec.fixed:
            raise UserError(f"'{name}' is both in fixed and in search_space: keep it in one of them.")
        for value in knob.bounds():
            _check_value(spec, name, value, limits)
    _check_points(spec, space)
    _check_objectives(spec)
    _check_resources(spec)
    if spec.max_additional_gmacs is not None:
        low = cheapest_cost(spec)
        if low > spec.max_additional_gmacs:
            raise UserError(
                f"max_additional_gmacs={spec.max_additional_gmacs:g} rejects the whole search space: its cheapest configuration "
                f"already adds {low:.4g} GMACs. Raise the budget or lower the search bounds (num_prompts, rank, depth)."
            )


def cheapest_cost(spec: StudySpec) -> float:
    """Additional GMACs of the cheapest corner of the space (every int/float knob at its low bound, each choice tried)."""
    from apt_ray.profile.cost import trial_cost

    params: dict[str, Any] = {}
    combos: list[dict[str, Any]] = [{}]
    for name, knob in spec.space().items():
        if knob.type == "categorical":
            combos = [{**c, name: v} for c in combos for v in knob.choices or []]
        else:
            params[name] = knob.bounds()[0]
    return min(trial_cost(spec.train_config({**params, **c})).additional_gmacs for c in combos[:64])


def _check_fixed(spec: StudySpec) -> None:
    for key in spec.fixed:
        if key in TOP_LEVEL:
            raise UserError(f"fixed.{key}: set '{key}' at the top level of the study config, not under fixed.")
        if key.startswith("_"):
            raise UserError(f"fixed.{key}: keys starting with '_' are reserved for apt_ray.")
    try:
        TrainConfig.model_validate(spec.base_config())
    except ValidationError as e:
        raise UserError(validation_message(e, list(TrainConfig.model_fields)).replace("invalid configuration", "invalid fixed settings", 1)) from None


def _check_value(spec: StudySpec, name: str | None, value: Any, limits: Any) -> None:
    """One bound (or the fixed settings alone when ``name`` is None) against TrainConfig and the backbone."""
    where = f"search_space.{name}" if name else "fixed"
    params = {name: value} if name else {}
    try:
        cfg = TrainConfig.model_validate({**spec.base_config(), **params})
    except ValidationError as e:
        msgs = "; ".join(err["msg"] for err in e.errors())
        raise UserError(f"{where}: the bound {value!r} is not a valid {name} ({msgs}). Fix the bounds of {name} and run again.") from None
    cfg.check_text_len()
    if cfg.depth is not None and cfg.depth > limits.num_layers:
        raise UserError(
            f"{where}: depth {cfg.depth} is above the {limits.num_layers} layers of {spec.model} that can carry {cfg.method}: "
            f"use depth between 1 and {limits.num_layers}."
        )
    for knob in get_method(cfg.method).config.bounded_by_hidden:
        value = getattr(cfg, knob)
        if value is not None and value > limits.hidden_size:
            raise UserError(
                f"{where}: {knob} {value} is above the hidden size {limits.hidden_size} of {spec.model}: "
                f"use a {knob} between 1 and {limits.hidden_size}."
            )
    if cfg.layers is not None and any(i < 0 or i >= limits.num_layers for i in cfg.layers):
        raise UserError(f"{where}: layers {cfg.layers} name layers outside 0..{limits.num_layers - 1} of {spec.model}.")


def _check_points(spec: StudySpec, space: dict[str, ParamSpec]) -> None:
    for i, point in enumerate(spec.initial_points):
        if set(point) != set(space):
            raise UserError(f"initial_points[{i}] sets {sorted(point)} but the search space has {sorted(space)}: set exactly the searched knobs.")
        for name, value in point.items():
            knob = space[name]
            inside = value in (knob.choices or []) if knob.type == "categorical" else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and knob.low <= value <= knob.high
                and (knob.type == "float" or value == int(value)))
            if not inside:
                raise UserError(f"initial_points[{i}].{name}={value!r} is outside the search space ({knob.describe()}).")


def _check_objectives(spec: StudySpec) -> None:
    metrics = spec.metrics
    if len(set(metrics)) != len(metrics):
        raise UserError(f"objectives repeat a metric ({', '.join(metrics)}): list each metric once.")
    if not any(m in EPOCH_METRICS for m in metrics):
        raise UserError(f"objectives ({', '.join(metrics)}) need at least one trained metric, e.g. val_score (mode: max).")
    if spec.scheduler.kind == "asha":
        if spec.multi_objective:
            raise UserError("scheduler.kind=asha needs a single objective (ASHA stops trials on one score): use kind auto or fifo, or keep one objective.")
        if metrics[0] not in EPOCH_METRICS:
            raise UserError(f"scheduler.kind=asha needs a per-epoch objective, not '{metrics[0]}': use val_score or kind fifo.")


def check_data(spec: StudySpec) -> None:
    """Real data must be where the study says, before any trial starts. Checked for local sweeps only (by
    ``run_study``): a cluster's data lives on its nodes, and a laptop loading the study cannot see it."""
    cfg = spec.train_config({})
    if cfg.data == "synthetic":
        return
    from apt_ray.data.vqav2 import _looks_like_hub_id

    arrow = cfg.data in ARROW_KINDS
    where = "the folder holding the task's arrow files" if arrow else "a dataset folder or a Hugging Face hub id"
    if not cfg.data_path:
        raise UserError(f"data={cfg.data} needs fixed.data_path: set it to {where}.")
    path = Path(cfg.data_path).expanduser()
    exists = path.is_dir() if arrow else path.exists() or _looks_like_hub_id(cfg.data_path)
    if not exists:
        raise UserError(f"fixed.data_path {cfg.data_path} does not exist on this machine: set it to {where} "
                        "(on a cluster, a shared path every node mounts).")


def _check_resources(spec: StudySpec) -> None:
    cfg = spec.train_config({})
    workers = spec.resources.workers
    if cfg.batch_size % workers:
        raise UserError(f"batch_size {cfg.batch_size} cannot be split evenly over {workers} workers per trial: use a multiple of {workers}.")
    if spec.resources.gpus_per_worker > 0 and cfg.device == "cpu":
        raise UserError("resources.gpus_per_worker > 0 but fixed.device=cpu: set device to auto or cuda, or gpus_per_worker to 0.")
