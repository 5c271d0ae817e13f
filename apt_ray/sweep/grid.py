"""Grids as studies: every point of a product of choices, run through the ordinary sweep path.

A grid is a ``StudySpec`` whose knobs are categorical and whose ``initial_points``
enumerate the whole product, with ``num_trials`` equal to its size: Optuna runs
the enqueued points first, so every point trains exactly once and nothing is
sampled. Tracking, figures and the persisted Optuna study are those of any sweep.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from apt_ray.errors import UserError
from apt_ray.methods import registry
from apt_ray.sweep.space import ParamSpec
from apt_ray.sweep.spec import StudySpec, check_spec


def prompt_methods() -> tuple[str, ...]:
    """The registered methods with prompts (those whose config declares ``num_prompts``)."""
    return tuple(registry.knob_users("num_prompts"))


def grid_points(axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, in order (the last axis varies fastest)."""
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def grid_spec(axes: dict[str, Sequence[Any]], **fields: Any) -> StudySpec:
    """A checked ``StudySpec`` running every point of ``axes`` once (``fields``: name, model, fixed, concurrency, ...)."""
    for name, values in axes.items():
        if not values:
            raise UserError(f"grid axis '{name}' has no values: give at least one.")
        if len({repr(v) for v in values}) != len(values):
            raise UserError(f"grid axis '{name}' repeats a value ({', '.join(map(str, values))}): list each value once.")
    points = grid_points(axes)
    space = {name: ParamSpec(type="categorical", choices=list(values)) for name, values in axes.items()}
    spec = StudySpec.model_validate({**fields, "search_space": space, "initial_points": points, "num_trials": len(points),
                                     "scheduler": {"kind": "fifo"}})
    check_spec(spec)
    return spec


def prompt_length_spec(
    methods: Sequence[str],
    prompts: Sequence[int],
    *,
    rank: int,
    depth: int | None,
    seeds: Sequence[int] = (0,),
    model: str = "tiny-meter",
    name: str = "prompt-length",
    fixed: dict[str, Any] | None = None,
    concurrency: int = 2,
    workers: int = 1,
) -> StudySpec:
    """The prompt-length grid: methods x prompt counts (x seeds) at one rank and depth."""
    with_prompts = prompt_methods()
    unknown = [m for m in methods if m not in registry.method_names()]
    if unknown:
        raise UserError(f"unknown method {', '.join(map(repr, unknown))}: a prompt-length grid compares {', '.join(with_prompts)}.")
    no_prompts = [m for m in methods if m not in with_prompts]
    if no_prompts:
        raise UserError(f"{', '.join(no_prompts)} has no prompts, so a prompt-count grid says nothing about it: "
                        f"use {', '.join(with_prompts)}.")
    bad = [p for p in prompts if isinstance(p, bool) or not isinstance(p, int) or p < 1]
    if bad:
        raise UserError(f"prompt counts must be positive whole numbers, got {', '.join(map(str, bad))}.")
    if rank < 1 or (depth is not None and depth < 1):
        raise UserError(f"rank ({rank}) and depth ({depth}) must be positive: give --rank and --depth of 1 or more.")
    if any(s < 0 for s in seeds):
        raise UserError(f"seeds must be 0 or more, got {', '.join(map(str, seeds))}.")
    fixed = {**(fixed or {}), "rank": rank, **({"depth": depth} if depth is not None else {})}
    axes: dict[str, Sequence[Any]] = {"method": list(methods), "num_prompts": sorted(prompts)}
    if len(seeds) > 1:
        axes["seed"] = list(seeds)
    else:
        fixed["seed"] = seeds[0]
    return grid_spec(axes, name=name, model=model, method=methods[0], fixed=fixed, concurrency=concurrency,
                     resources={"workers": workers})
