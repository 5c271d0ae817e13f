"""Tasks: what a trial trains the backbone for (data, head, loss, evaluation, score). See :mod:`apt_ray.tasks.registry`."""

from apt_ray.tasks.base import SCORE_KEY, Task
from apt_ray.tasks.registry import (
    RegistryError, canonical_metric, get_task, metric_aliases, read_metric, register_task, registered_task, task_names,
    unregister_task,
)

__all__ = ["SCORE_KEY", "Task", "RegistryError", "canonical_metric", "get_task", "metric_aliases", "read_metric",
           "register_task", "registered_task", "task_names", "unregister_task"]
