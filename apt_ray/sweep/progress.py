"""The sweep's console: one line per trial start and end, and at the end the sweep's efficiency.

Efficiency is the time trials spent in their epochs (training and evaluation),
summed, over the trial phase's wall time times its concurrency slots: what is
left is start-up, scheduling and idle slots.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from apt_ray.sweep.callback import trial_error
from apt_ray.tasks import SCORE_KEY


def efficiency(epoch_seconds: float, wall_s: float, slots: int) -> float:
    """Summed epoch time over wall time x slots (0 when nothing ran)."""
    return epoch_seconds / (wall_s * slots) if wall_s > 0 and slots > 0 else 0.0


class ProgressLine(Callback):
    """One line per trial start and end on the driver's stdout (Tune's own tables are off), then the efficiency."""

    KNOBS = (("num_prompts", "p"), ("rank", "r"), ("depth", "depth"), ("placement", ""), ("lr", "lr"))

    def __init__(self, total: int, slots: int) -> None:
        self.total, self.slots, self.done = total, slots, 0
        self.epoch_seconds = 0.0
        self._epochs: dict[str, set[int]] = {}
        self._t0: float | None = None

    def setup(self, **info: Any) -> None:
        self._t0 = time.monotonic()

    def _knobs(self, config: dict[str, Any]) -> str:
        parts = []
        for key, short in self.KNOBS:
            if key in config:
                v = config[key]
                v = f"{v:.2e}" if isinstance(v, float) else v
                parts.append(f"{short}={v}" if short else str(v))
        return " ".join(parts)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} started: {self._knobs(trial.config)}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        epoch = result.get("epoch")
        seen = self._epochs.setdefault(trial.trial_id, set())
        if SCORE_KEY in result and epoch not in seen:
            seen.add(epoch)
            self.epoch_seconds += float(result.get("epoch_time_s", 0.0))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        r = trial.last_result or {}
        score = r.get(SCORE_KEY)
        text = (f"val score {score:.2f}, +GMACs {r.get('additional_gmacs', float('nan')):.4g}, {r.get('epoch', 0)} epochs"
                if score is not None else "no result")
        print(f"trial {trial.trial_id} done ({self.done}/{self.total}): {text}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        print(f"trial {trial.trial_id} failed ({self.done}/{self.total}): {trial_error(trial)[:300]}", flush=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._t0 is None or not self.epoch_seconds:
            return
        wall = time.monotonic() - self._t0
        print(f"sweep efficiency {efficiency(self.epoch_seconds, wall, self.slots):.2f}: {self.epoch_seconds:.0f} s of trial epochs "
              f"(training and evaluation) in {wall:.0f} s on {self.slots} slot{'s' * (self.slots != 1)}", flush=True)
