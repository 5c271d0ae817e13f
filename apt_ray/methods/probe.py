"""The ends of the spectrum: a linear probe, the task head alone, and full fine-tuning."""

from __future__ import annotations

from apt_ray.errors import UserError
from apt_ray.methods.base import AppliedMethod, count, prepare
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.task_model import TaskModel


def apply_linear_probe(model: TaskModel, spec: MethodSpec) -> AppliedMethod:
    """The classic probe: one Linear layer on the frozen pooled features, in place of the MLP head (the task's
    head gives it: ``head.linear_probe()``)."""
    spec, layers, _ = prepare(model, spec)
    old = model.head
    if not hasattr(old, "linear_probe"):
        raise UserError(f"method linear_probe needs a head with a linear form, but this task's head ({type(old).__name__}) "
                        "has no linear_probe(): give the task's head one, or use method head_only.")
    model.head = old.linear_probe()
    return AppliedMethod(spec, layers, [])


def apply_head_only(model: TaskModel, spec: MethodSpec) -> AppliedMethod:
    """The backbone frozen and nothing added: only the task's MLP head (the one every other method trains) learns."""
    spec, layers, _ = prepare(model, spec)
    return AppliedMethod(spec, layers, [])


def apply_full(model: TaskModel, spec: MethodSpec) -> AppliedMethod:
    spec, layers, _ = prepare(model, spec)
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    return AppliedMethod(spec, layers, [], global_params=count(model.backbone))
