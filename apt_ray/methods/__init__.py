"""Parameter-efficient methods, applied to a model's attention sites.

Methods are registered in :mod:`apt_ray.methods.registry` (the built-in ones by :mod:`apt_ray.methods.configs`);
importing this package is light (no torch): implementations are imported when a method is applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apt_ray.methods.registry import (
    MethodConfig, Search, get_method, method_names, register_method, registered_method, unregister_method,
)
from apt_ray.methods.spec import MethodSpec

if TYPE_CHECKING:
    from apt_ray.methods.base import AppliedMethod
    from apt_ray.models.task_model import TaskModel


def apply(model: "TaskModel", spec: MethodSpec) -> "AppliedMethod":
    """Freeze the backbone, inject the method at the sites its placement picks, and unfreeze the backbone extras
    the spec trains (by default the APT authors' set: poolers, token-type embeddings, a learnable [CLS])."""
    from apt_ray.methods.base import resolve_extras, train_extras

    applied = get_method(spec.name).load_apply()(model, spec)
    applied.extras = train_extras(model, resolve_extras(spec))
    applied.groups = model.trainable_groups(applied.extras)
    return applied


def __getattr__(attr: str) -> Any:
    if attr == "METHOD_NAMES":
        return method_names()
    if attr == "REGISTRY":  # name -> apply function (imports every implementation)
        return {name: get_method(name).load_apply() for name in method_names()}
    if attr == "AppliedMethod":
        from apt_ray.methods.base import AppliedMethod

        return AppliedMethod
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["AppliedMethod", "MethodConfig", "MethodSpec", "METHOD_NAMES", "REGISTRY", "Search", "apply", "get_method",
           "method_names", "register_method", "registered_method", "unregister_method"]
