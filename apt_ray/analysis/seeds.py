"""Training runs over seeds, side by side, summarised per arm as mean ± sd (the comparison studies' engine).

An *arm* is a name and the trial settings that make it (``{"method": "apt"}``, or ``{"num_prompts": 32,
"prune_keep": 0.25}``); each arm runs once per seed through the standalone training loop (no Ray), and
:func:`summarise` gives each arm's mean and sample sd of every metric asked for.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from apt_ray.errors import UserError

SCORE = "val_score"
# What a run keeps of its result besides the metrics: the cost, the chance levels a task reports, what trained.
FACTS = ("updated_params", "additional_gmacs", "epochs", "recipe", "trainable_groups", "majority_baseline")


def configs(arms: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], common: Mapping[str, Any],
            output_dir: str | Path) -> list[dict[str, Any]]:
    """One validated trial config per (arm, seed), arms in order; ``common`` settings apply to every run and the
    arm's own settings win. Bad settings raise :class:`UserError` before anything runs."""
    from apt_ray.config import build_train_config

    if not arms or not seeds:
        raise UserError("nothing to run: give at least one arm (method) and one seed.")
    out = []
    for name, settings in arms.items():
        for seed in seeds:
            cfg = build_train_config(None, {**common, **settings, "seed": seed,
                                            "output_dir": str(Path(output_dir) / f"{_slug(name)}-seed{seed}")})
            out.append({**cfg.model_dump(), "_arm": name})
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-")


def run_one(config: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """One training run: its arm and seed, its ``val_*`` metrics, the :data:`FACTS` and chance levels it reports,
    and its wall time."""
    import torch

    from apt_ray.train.loop import train_loop_per_worker

    if threads:
        torch.set_num_threads(threads)
    arm = config.pop("_arm")
    t0 = time.perf_counter()
    result = train_loop_per_worker({**config, "_progress": threads is None})
    kept = {k: v for k, v in result.items() if k.startswith(("val_", "chance_")) or k in FACTS}
    return {"arm": arm, "seed": config["seed"], **kept, "seconds": time.perf_counter() - t0}


def run_all(runs: list[dict[str, Any]], parallel: int = 1) -> list[dict[str, Any]]:
    """Every run, ``parallel`` side by side with one torch thread each (the first alone: it builds the shared
    caches, the synthetic set and the pretrained backbone, before the others start)."""
    if parallel < 1:
        raise UserError(f"--parallel {parallel}: give at least 1.")
    if parallel == 1:
        return [run_one(dict(c), None) for c in runs]
    rows = [run_one(dict(runs[0]), 1)]
    with ProcessPoolExecutor(parallel, mp_context=get_context("spawn")) as pool:
        rows += list(pool.map(run_one, [dict(c) for c in runs[1:]], [1] * (len(runs) - 1)))
    return rows


def summarise(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = (SCORE,)) -> list[dict[str, Any]]:
    """Per arm, in the order arms first appear: the seeds, each metric's values, mean and sample sd (n - 1; NaN for
    one seed), the facts of its first run and the mean wall time."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        entry: dict[str, Any] = {"arm": arm, "seeds": [r["seed"] for r in mine],
                                 "seconds": statistics.fmean(r["seconds"] for r in mine)}
        entry.update({k: v for k, v in mine[0].items() if k in FACTS or k.startswith("chance_")})
        for metric in metrics:
            values = [float(r[metric]) for r in mine]
            entry[metric] = {"values": values, "mean": statistics.fmean(values),
                             "sd": statistics.stdev(values) if len(values) > 1 else float("nan")}
        out.append(entry)
    return out


def mean_sd(entry: Mapping[str, Any], metric: str = SCORE) -> str:
    """``"52.00 ± 2.00"`` for an arm's metric."""
    m = entry[metric]
    return f"{m['mean']:.2f} ± {m['sd']:.2f}"
