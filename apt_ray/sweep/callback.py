"""The Tune callback that records a sweep in MLflow: one child run per trial under the sweep's parent run.


It runs on the driver, from Tune's own events, and writes through the sweep's
:class:`~apt_ray.tracking.writer.RunWriter`, so trials and their workers never
touch MLflow. Per trial: params and the closed-form cost when it starts, the
measured FLOPs profile (``flops_profile.json`` with its per-site table) from a
driver thread, every reported epoch's metrics, what the trial actually used
(tokenizer, image processing, recipe, trainable groups), its start-up time, and
its end: status, failure reason and restarts. (Ray's ``MLflowLoggerCallback``
does much of this but cannot nest runs.)
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ray.tune import Callback

from apt_ray.sweep.search import COST_KEY
from apt_ray.sweep.spec import StudySpec
from apt_ray.tasks import SCORE_KEY
from apt_ray.tracking.mlflow import COMMIT_TAG, KIND_TAG, STATUS_TAG, TRIAL_TAG
from apt_ray.tracking.writer import RunWriter

log = logging.getLogger("apt_ray.tracking")
PARENT_KEY = "sweep"
PROFILE_ARTIFACT = "flops_profile.json"
EPOCH_KEYS = ("train_loss", "samples_per_s", "step_time_ms", "epoch_time_s")  # lr is a param (its peak); the epoch is the step
PER_SITE_TABLE = "flops_per_site.json"
SHORT = {"num_prompts": "p", "prune_keep": "keep", "rank": "r", "depth": "d", "adapter_dim": "w", "seed": "s"}
# One profiling thread per process, shared by every callback: torch's flop counter tracks modules with process-wide
# hooks, so two profiles measured at once would count each other's modules.
PROFILER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flops-profile")
CUT_OFF_REASON = ("cut off when the sweep driver stopped, and not resumed: the sweep's saved Tune state did not yet "
                  "include this trial, so Tune started another in its place")


def epoch_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """What is logged per epoch: the score, the task's own metrics (``val_*``) and the training figures."""
    return {k: v for k, v in result.items() if k in EPOCH_KEYS or k.startswith("val_")}


NAME_ORDER = ("num_prompts", "prune_keep", "rank", "adapter_dim", "depth", "placement")  # then the other searched knobs, by name


def run_name(config: dict[str, Any], searched: list[str]) -> str:
    """A child run's name from its method and searched knobs, e.g. ``apt-p8-r38-d4-top``."""
    parts = [str(config.get("method", "trial"))]
    for key in sorted(searched, key=lambda k: (NAME_ORDER.index(k) if k in NAME_ORDER else len(NAME_ORDER), k)):
        if key == "method" or key not in config:
            continue
        value = config[key]
        if key in SHORT:
            parts.append(f"{SHORT[key]}{value:g}" if isinstance(value, float) else f"{SHORT[key]}{value}")
        elif isinstance(value, float):
            parts.append(f"{key}{value:.1e}")
        else:
            parts.append(str(value) if isinstance(value, str) else f"{key}{value}")
    return "-".join(parts)


def trial_error(trial: Any) -> str:
    """The last line of a Tune trial's error (its exception message), or a generic phrase. Read from the driver's own
    copy of the error file: the one in the sweep's storage is written later."""
    try:
        local = getattr(trial, "error_file", None)
        text = Path(local).read_text() if local and Path(local).is_file() else str(trial.get_error() or "")
    except Exception:  # noqa: BLE001 - the error file may be missing or unreadable
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:1000] if lines else "the trial process ended with an error"


def failure_of(trial: Any) -> tuple[str, str]:
    """``(status, reason)`` of a failed trial: ``diverged`` when its loss went NaN or infinite, else ``failed``."""
    reason = trial_error(trial)
    head, sep, rest = reason.partition(": ")
    if sep and "." in head and " " not in head:  # "module.ErrorType: message" -> the message
        reason = rest
    return ("diverged" if "training diverged" in reason else "failed"), reason


class MlflowSweepCallback(Callback):
    """Writes every trial of the sweep as a nested MLflow run (see the module docstring)."""

    def __init__(self, spec: StudySpec, uri: str, experiment: str, directory: str | Path, commit: str) -> None:
        self._args = (spec.model_dump_json(), uri, experiment, str(directory), commit)
        self.spec, self.commit = spec, commit
        self.writer = RunWriter.open(uri, experiment, directory)
        self.epochs = spec.epochs
        self.searched = list(spec.space())
        self.resources = spec.resources.model_dump()
        self._profiles: list[Future] = []
        self._started: dict[str, float] = {}

    # Tune pickles its run config (and the searcher that holds this): what travels is the description; a restored
    # sweep reattaches to the writer of the same directory
    def __reduce__(self) -> tuple:
        spec_json, *rest = self._args
        return (_restore, (spec_json, *rest))

    def log_dataset(self, key: str, config: dict[str, Any]) -> None:
        """The data a trial (or, with the study's base config, the sweep) trains on, as the run's dataset input."""
        import hashlib

        cfg = self.spec.train_config(config)
        data = cfg.data_spec()
        if cfg.data == "synthetic":
            from apt_ray.data.build import synthetic_dir

            source = str(synthetic_dir(data))
        else:
            source = str(cfg.data_path)
        defining = data.model_dump(mode="json", include={"kind", "path", "train_splits", "val_split", "num_train", "num_val",
                                                         "questions_per_image", "synthetic_seed", "max_train_questions",
                                                         "max_val_questions"})
        digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]
        self.writer.dataset(key, f"{cfg.task}-{cfg.data}", source, digest)

    def params(self, config: dict[str, Any]) -> dict[str, Any]:
        """A child run's params: the trial's whole config and the resources of the sweep."""
        cfg = self.spec.train_config(config).model_dump()
        return {**{k: v for k, v in cfg.items() if v is not None}, **self.resources}

    def cost(self, config: dict[str, Any]) -> dict[str, float]:
        """The closed-form cost of a trial config whose own config does not carry it (the search passes it in ``_cost``)."""
        from apt_ray.profile.cost import trial_cost

        return trial_cost(self.spec.train_config(config)).metrics()

    def profile(self, config: dict[str, Any]) -> dict[str, Any]:
        from apt_ray.profile.cost import trial_profile

        return trial_profile(self.spec.train_config(config))

    def tags(self, key: str, status: str) -> dict[str, str]:
        return {TRIAL_TAG: key, STATUS_TAG: status, COMMIT_TAG: self.commit, "mlflow.source.git.commit": self.commit,
                KIND_TAG: "trial"}

    def _closed(self, key: str) -> bool:
        return bool(self.writer.marks.get(key, {}).get("closed"))

    # -- Tune's events ----------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = trial.trial_id
        if self._closed(key):
            return  # it ended before the driver was stopped, after Tune last saved its state: Tune runs it once more
        self._started.setdefault(key, time.time())
        if key in self.writer.runs or self.writer.marks.get(key):
            self.writer.reopen(key)
            self.writer.tags(key, {STATUS_TAG: "running"})
            return
        config = {k: v for k, v in trial.config.items() if not k.startswith("_")}
        self.writer.create(key, run_name(config, self.searched), self.tags(key, "running"), parent=PARENT_KEY)
        self.writer.mark(key, epoch=0)
        cost = trial.config.get(COST_KEY) or self.cost(config)
        self.writer.params(key, {**self.params(config), "updated_params": int(cost["updated_params"])})
        self.writer.metrics(key, {"additional_gmacs": cost["additional_gmacs"]})
        self.log_dataset(key, config)
        self._profiles.append(PROFILER.submit(self._log_profile, key, config, cost))

    def _log_profile(self, key: str, config: dict[str, Any], cost: dict[str, float]) -> None:
        try:
            data = self.profile(config)
        except Exception as e:  # noqa: BLE001 - a missing profile must not fail the sweep
            log.warning("FLOPs profile of trial %s failed: %s", key, e)
            self.writer.tags(key, {"profile_error": str(e)[:500]})
            return
        self.writer.json(key, data, PROFILE_ARTIFACT)
        self.writer.table(key, data["per_site"], PER_SITE_TABLE)
        self.writer.params(key, {k: data[k] for k in ("base_gmacs", "sites", "trainable_params")})
        self.writer.metrics(key, {"additional_pct_of_base": data["additional_pct_of_base"]})  # None (skipped) for a zero base
        expected = cost["additional_gmacs"]
        if abs(data["additional_gmacs"] - expected) > 1e-9 * max(1.0, expected):
            self.writer.tags(key, {"profile_mismatch": f"measured {data['additional_gmacs']} vs closed form {expected}"})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        key = trial.trial_id
        if self._closed(key) or SCORE_KEY not in result:
            return
        marks = self.writer.marks.get(key, {})
        epoch = int(result.get("epoch", 0))
        if epoch > marks.get("epoch", 0):
            self.writer.metrics(key, epoch_metrics(result), step=epoch)
            self.writer.mark(key, epoch=epoch)
        if "used" in result and not marks.get("used"):
            self.writer.params(key, result["used"])
            self.writer.tags(key, {"ray_node_id": result.get("ray_node_id")})
            self.writer.mark(key, used=True)
        first_step = result.get("first_step_unix")
        if first_step and not marks.get("startup") and not result.get("restarts") and key in self._started:
            self.writer.params(key, {"startup_s": round(first_step - self._started[key], 2)})
            self.writer.mark(key, startup=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch", 0)
        self._close(trial, "finished" if epoch >= self.epochs else "stopped_early", "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status, reason = failure_of(trial)
        self._close(trial, status, "FAILED", reason)

    def _close(self, trial: Any, status: str, run_status: str, reason: str | None = None) -> None:
        key = trial.trial_id
        if self._closed(key):
            return
        tags: dict[str, Any] = {STATUS_TAG: status, "restarts": (trial.last_result or {}).get("restarts", 0)}
        if reason:
            tags["failure_reason"] = reason
        self.writer.tags(key, tags)
        self.writer.finish(key, run_status)
        self.writer.mark(key, closed=True)

    # -- outside Tune's events ------------------------------------------------------------
    def over_budget(self, number: int, config: dict[str, Any], cost: dict[str, float], reason: str) -> None:
        """An over-budget proposal of the search: a child run with its params and cost (as the search computed it),
        KILLED, never trained."""
        key = f"over_budget_{number:04d}"
        if key in self.writer.marks:
            return
        self.writer.create(key, f"{run_name(config, self.searched)}-over-budget", self.tags(key, "over_budget"), parent=PARENT_KEY)
        self.writer.params(key, {**self.params(config), "updated_params": int(cost["updated_params"])})
        self.writer.metrics(key, {"additional_gmacs": cost["additional_gmacs"]})
        self.writer.tags(key, {"failure_reason": reason, "optuna_trial_number": number})
        self.writer.finish(key, "KILLED")
        self.writer.mark(key, closed=True)

    def close_cut_off(self, known: set[str]) -> int:
        """End FAILED, with the reason, the runs of trials Tune no longer knows (started after its last saved state,
        before the driver was killed); returns how many."""
        cut = [k for k in self.writer.marks if k not in known and not self._closed(k) and k != PARENT_KEY]
        for key in cut:
            self.writer.tags(key, {STATUS_TAG: "failed", "failure_reason": CUT_OFF_REASON})
            self.writer.finish(key, "FAILED")
            self.writer.mark(key, closed=True)
        if cut:
            log.warning("%d trial run(s) cut off by the stopped driver could not be resumed: marked FAILED", len(cut))
        return len(cut)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close_cut_off({t.trial_id for t in trials})
        self.wait_for_profiles()  # their writes join the queue before the sweep's summary

    def wait_for_profiles(self) -> None:
        wait(self._profiles)


def _restore(spec_json: str, uri: str, experiment: str, directory: str, commit: str) -> MlflowSweepCallback:
    return MlflowSweepCallback(StudySpec.model_validate_json(spec_json), uri, experiment, directory, commit)
