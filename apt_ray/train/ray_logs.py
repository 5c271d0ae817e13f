"""The worker set-up hook of a local Ray instance: quiet Ray Train's per-poll warnings.

Ray runs the hook in every worker process it starts (the Train controller and its helper
actors, Tune's trial actors, the training workers), so this module imports nothing but the
standard library: importing torch and transformers there cost each of those processes about
3 s of CPU, which on a small machine competed with the training itself.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Callable

QUIET_HOOK = "apt_ray.train.ray_logs.quiet_ray_logs"
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                 # a traceback per timed-out resource request while the CPUs are busy ("safe to ignore", says Ray)
                 "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client")


# Ray Train logs every report at INFO from a logger named after its file path, not "ray.train....",
# so the run's LoggingConfig does not reach it
REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"
# a Tune trial's "Checkpoint successfully created at ..." line, one per epoch
TUNE_CHECKPOINT_LOGGER = "ray.train._internal.storage"


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _warnings_and_up(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _add_filter(logger: logging.Logger, keep: Callable[[logging.LogRecord], bool]) -> None:
    if keep not in logger.filters:
        logger.addFilter(keep)


def report_logger_name() -> str | None:
    """The name of Ray Train's per-report logger (its module's file path), or None if this Ray has no such module.

    Found from Ray's install location rather than by importing the module's packages, which a process that
    never trains (a Tune trial actor, an idle worker) would otherwise pay for."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0], *REPORT_LOGGER_MODULE.split(".")[1:]).with_suffix(".py")
    return str(path) if path.is_file() else None


def quiet_ray_logs() -> None:
    """Ray worker setup hook for a local instance: keep only the errors of Ray Train loggers that
    warn on every poll there (the placement-group cleaner cannot query actor state without a
    dashboard; the autoscaling client times out, with a traceback, while the trials keep the CPUs busy).

    A filter, not a level: Ray Train's controller then runs ``logging.config.dictConfig``, which
    resets the levels of the ``ray.train`` child loggers but keeps their filters."""
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        _add_filter(logger, _errors_only)
    report = report_logger_name()
    if report:
        _add_filter(logging.getLogger(report), _warnings_and_up)
    _add_filter(logging.getLogger(TUNE_CHECKPOINT_LOGGER), _warnings_and_up)
