"""The task registry: which tasks exist and what each one builds (data, head, loss, evaluation, score).

A task is a class implementing :class:`apt_ray.tasks.base.Task`, registered by its own module with a class decorator
(as backbones are)::

    @register_task("toy")
    class ToyTask:
        score = "val_accuracy"   # one of the metrics it computes: the loop reports it again as ``val_score``
        ...

(the built-in ``vqa`` task, :mod:`apt_ray.tasks.vqa`, is the full example). Optional members (a custom forward over
several backbone passes, a task's own evaluation, what a cost profile feeds it) default to those of
:class:`~apt_ray.tasks.base.TaskDefaults`.

The registry holds one instance of the class (built without arguments). Lookups (:func:`get_task`,
:func:`task_names`, :func:`metric_aliases`) first import the built-in task modules (:data:`BUILTIN_TASKS`), once;
a task defined elsewhere (a plug-in, a test) registers on its own import. This module does not import torch, so
validating a config (``TaskName``) never imports it.

Registering a name twice raises :class:`RegistryError` at import; an unknown name raises
:class:`~apt_ray.errors.UserError` listing the registered ones, with a did-you-mean.

Metric aliases: a task may declare ``metric_aliases`` (old metric name -> its replacement), e.g. the VQA task maps
the name older versions gave the score to ``val_score``. :func:`canonical_metric` maps a name through them (study files written for older
versions), and :func:`read_metric` reads a metric from a mapping that may hold it under an alias only (runs logged
by older versions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Annotated, Any, Callable, TypeVar

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from apt_ray.errors import UserError
from apt_ray.registries import Builtins, RegistryError, registered_for_block, unknown_name
from apt_ray.tasks.base import OPTIONAL_MEMBERS, TaskDefaults

# Task name -> the module that registers it, imported on the first lookup.
BUILTIN_TASKS: dict[str, str] = {
    "vqa": "apt_ray.tasks.vqa",
    "classification": "apt_ray.tasks.classification",
    "retrieval": "apt_ray.tasks.retrieval",
    "nlvr2": "apt_ray.tasks.nlvr2",
}

T = TypeVar("T", bound=type)




_TASKS: dict[str, Any] = {}
_BUILTINS = Builtins(BUILTIN_TASKS.values())


def load_builtins() -> None:
    """Import the built-in task modules (once), which registers them."""
    _BUILTINS.load()


def _where(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_aliases(name: str, cls: type) -> None:
    mine = dict(getattr(cls, "metric_aliases", {}) or {})
    for other_name, other in _TASKS.items():
        for old, new in (getattr(other, "metric_aliases", {}) or {}).items():
            if old in mine and mine[old] != new:
                raise RegistryError(
                    f"task '{name}' ({_where(cls)}) maps metric '{old}' to '{mine[old]}', but task '{other_name}' "
                    f"({_where(other)}) maps it to '{new}': an old metric name has one replacement. Drop the alias."
                )


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: register a task class (see :class:`apt_ray.tasks.base.Task`) under ``name``; the registry
    keeps one instance built without arguments, and the class gets ``name``. Raises :class:`RegistryError` if
    ``name`` is taken (or an alias clashes); nothing is registered then."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"task name {name!r} is not a valid identifier: use letters, digits and underscores.")

    def decorate(cls: T) -> T:
        if cls.__module__ not in BUILTIN_TASKS.values():
            load_builtins()  # a plug-in taking a built-in name fails at its own import, not at a later lookup
        if name in _TASKS:
            raise RegistryError(
                f"task '{name}' is already registered (by {_where(_TASKS[name])}); {_where(cls)} cannot register it "
                "again: give it another name."
            )
        missing = [a for a in ("score", "eval_keys", "build_data", "make_head", "loss", "eval_batch", "metrics")
                   if not hasattr(cls, a)]
        if missing:
            raise TypeError(f"task '{name}' ({_where(cls)}) lacks {', '.join(missing)}: see apt_ray.tasks.base.Task.")
        _check_aliases(name, cls)
        for member in OPTIONAL_MEMBERS:
            if not hasattr(cls, member):
                setattr(cls, member, TaskDefaults.__dict__[member])
        cls.name = name
        _TASKS[name] = cls()
        return cls

    return decorate


def unregister_task(name: str) -> Any:
    """Remove a registered task (tests and notebooks that redefine one); returns it."""
    return _TASKS.pop(name)


def registered_task(name: str, cls: type) -> contextlib.AbstractContextManager[Any]:
    """Register ``cls`` as task ``name`` for the duration of a ``with`` block."""
    return registered_for_block(_TASKS, name, lambda: register_task(name)(cls), unregister_task)


def task_names() -> tuple[str, ...]:
    """The registered task names, in registration order."""
    load_builtins()
    return tuple(_TASKS)


def unknown_task_message(name: str) -> str:
    load_builtins()
    return unknown_name("task", name, _TASKS)


def get_task(name: str) -> Any:
    """The registered task ``name``; :class:`UserError` listing the registered ones (with a did-you-mean) if unknown."""
    if name not in _TASKS:
        load_builtins()
    if name not in _TASKS:
        raise UserError(unknown_task_message(name) + ".")
    return _TASKS[name]


def _known_task(name: str) -> str:
    if name not in task_names():
        raise PydanticCustomError("unknown_task", unknown_task_message(name).replace("{", "{{").replace("}", "}}"))
    return name


# A registered task's name, checked against the live registry (a task registered later is accepted too).
TaskName = Annotated[str, AfterValidator(_known_task)]


def score_label(name: str | None) -> str:
    """How figures name task ``name``'s score ("validation VQA score"); a generic name for an unknown task or None."""
    task = _TASKS.get(name) if name else None
    if task is None and name in BUILTIN_TASKS:
        task = get_task(name)
    if task is None:
        return "validation score"
    return task.score_label or "validation " + task.score.removeprefix("val_").replace("_", " ")


def metric_aliases() -> dict[str, str]:
    """Every registered task's metric aliases: old name -> the name that replaces it."""
    load_builtins()
    out: dict[str, str] = {}
    for task in _TASKS.values():
        out.update(getattr(task, "metric_aliases", {}) or {})
    return out


def canonical_metric(name: str) -> str:
    """``name``, or what replaces it when it is an old name a task declares as an alias (VQA's old score name ->
    ``val_score``)."""
    return metric_aliases().get(name, name)


def read_metric(values: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """``values[name]``; else the value under an old name that ``name`` replaces (runs of older versions logged
    only the VQA task's own score name); else ``default``."""
    if name in values:
        return values[name]
    for old, new in metric_aliases().items():
        if new == name and old in values:
            return values[old]
    return default
