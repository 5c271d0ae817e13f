"""The two ends of the spectrum: a linear probe (head only) and full fine-tuning."""

from __future__ import annotations

from apt_ray.methods.base import AppliedMethod, count, prepare
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.vqa import VQAModel


def apply_linear_probe(model: VQAModel, spec: MethodSpec) -> AppliedMethod:
    layers, _ = prepare(model, spec)
    return AppliedMethod(spec, layers, [])


def apply_full(model: VQAModel, spec: MethodSpec) -> AppliedMethod:
    layers, _ = prepare(model, spec)
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    return AppliedMethod(spec, layers, [], global_params=count(model.backbone))
