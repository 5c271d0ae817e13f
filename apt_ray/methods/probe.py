"""The ends of the spectrum: a linear probe, the task head alone, and full fine-tuning."""

from __future__ import annotations

from apt_ray.methods.base import AppliedMethod, count, prepare
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.heads import VQAHead
from apt_ray.models.vqa import VQAModel


def apply_linear_probe(model: VQAModel, spec: MethodSpec) -> AppliedMethod:
    """The classic probe: one Linear layer on the frozen pooled features, in place of the MLP head."""
    spec, layers, _ = prepare(model, spec)
    old = model.head
    model.head = VQAHead(old.in_dim, None, old.num_answers, device=next(old.parameters()).device)
    return AppliedMethod(spec, layers, [])


def apply_head_only(model: VQAModel, spec: MethodSpec) -> AppliedMethod:
    """The backbone frozen and nothing added: only the task's MLP head (the one every other method trains) learns."""
    spec, layers, _ = prepare(model, spec)
    return AppliedMethod(spec, layers, [])


def apply_full(model: VQAModel, spec: MethodSpec) -> AppliedMethod:
    spec, layers, _ = prepare(model, spec)
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    return AppliedMethod(spec, layers, [], global_params=count(model.backbone))
