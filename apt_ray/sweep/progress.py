"""The sweep's console: its own lines only. One line per finished trial, with the counts (done, running, pruned),
elapsed time, ETA and best score so far; a line per epoch of trials whose epochs are long; a progress bar on a
terminal; and at the end the sweep's efficiency.

Efficiency is the time trials spent in their epochs (training and evaluation),
summed, over the trial phase's wall time times its concurrency slots: what is
left is start-up, scheduling and idle slots.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback
from tqdm.auto import tqdm

from apt_ray.sweep.callback import run_name, trial_error
from apt_ray.tasks import SCORE_KEY

LONG_EPOCH_S = 30.0  # epochs at least this long get their own line


def efficiency(epoch_seconds: float, wall_s: float, slots: int) -> float:
    """Summed epoch time over wall time x slots (0 when nothing ran)."""
    return epoch_seconds / (wall_s * slots) if wall_s > 0 and slots > 0 else 0.0


def clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class SweepConsole(Callback):
    """The sweep's console lines (see the module docstring); also told of over-budget proposals by the search."""

    def __init__(self, total: int, slots: int, epochs: int, searched: list[str]) -> None:
        self.total, self.slots, self.epochs, self.searched = total, slots, epochs, searched
        self.done = self.running = self.pruned = 0
        self.best: tuple[float, str] | None = None
        self.epoch_seconds = 0.0
        self._epochs: dict[str, set[int]] = {}
        self._t0: float | None = None
        self._bar: Any = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks; the bar stays here
        return {**self.__dict__, "_bar": None}

    def setup(self, **info: Any) -> None:
        self._t0 = time.monotonic()
        self._bar = tqdm(total=self.total, desc="trials", unit="trial", file=sys.stdout, disable=None, leave=False)

    def _say(self, text: str) -> None:
        (self._bar.write if self._bar is not None else print)(text)

    def _status(self) -> str:
        elapsed = time.monotonic() - (self._t0 or time.monotonic())
        eta = f", ETA {clock(elapsed / self.done * (self.total - self.done))}" if self.done else ""
        best = f"; best {self.best[0]:.2f} ({self.best[1]})" if self.best else ""
        return (f"{self.done}/{self.total} done, {self.running} running, {self.pruned} pruned; "
                f"{clock(elapsed)} elapsed{eta}{best}")

    def _name(self, trial: Any) -> str:
        return run_name({k: v for k, v in trial.config.items() if not k.startswith("_")}, self.searched)

    def over_budget(self, number: int, config: dict[str, Any], cost: dict[str, float], reason: str) -> None:
        self.pruned += 1
        self._say(f"proposal {run_name(config, self.searched)} pruned before training: {reason}")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.running} running")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        epoch = result.get("epoch")
        seen = self._epochs.setdefault(trial.trial_id, set())
        if SCORE_KEY not in result or epoch in seen:
            return
        seen.add(epoch)
        seconds = float(result.get("epoch_time_s", 0.0))
        self.epoch_seconds += seconds
        if seconds >= LONG_EPOCH_S:
            self._say(f"  {self._name(trial)} epoch {epoch}/{self.epochs}: val score {result[SCORE_KEY]:.2f}, "
                      f"train loss {result.get('train_loss', float('nan')):.4f} ({clock(seconds)})")

    def _ended(self, trial: Any) -> None:
        self.done += 1
        self.running = max(0, self.running - 1)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{self.running} running")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial)
        r = trial.last_result or {}
        score = r.get(SCORE_KEY)
        if score is not None and (self.best is None or score > self.best[0]):
            self.best = (score, self._name(trial))
        text = (f"val score {score:.2f}, +{r.get('additional_gmacs', float('nan')):.4g} GMACs, {r.get('epoch', 0)} epochs"
                if score is not None else "no result")
        self._say(f"trial {self._name(trial)} done: {text}  [{self._status()}]")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial)
        self._say(f"trial {self._name(trial)} failed: {trial_error(trial)[:300]}  [{self._status()}]")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._t0 is None or not self.epoch_seconds:
            return
        wall = time.monotonic() - self._t0
        print(f"sweep efficiency {efficiency(self.epoch_seconds, wall, self.slots):.2f}: {self.epoch_seconds:.0f} s of trial epochs "
              f"(training and evaluation) in {wall:.0f} s on {self.slots} slot{'s' * (self.slots != 1)}", flush=True)
