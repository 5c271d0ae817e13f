"""Parameter-efficient methods, applied to a model's attention sites."""

from __future__ import annotations

from typing import Callable

from apt_ray.methods import adapter, apt, deep_prompt, kv_prompt, lora, probe
from apt_ray.methods.base import AppliedMethod, resolve_extras, train_extras
from apt_ray.methods.spec import METHOD_NAMES, MethodSpec
from apt_ray.models.vqa import VQAModel

REGISTRY: dict[str, Callable[[VQAModel, MethodSpec], AppliedMethod]] = {
    "apt": apt.apply,
    "deep_prompt": deep_prompt.apply,
    "kv_prompt": kv_prompt.apply,
    "lora": lora.apply,
    "adapter": adapter.apply,
    "linear_probe": probe.apply_linear_probe,
    "head_only": probe.apply_head_only,
    "full": probe.apply_full,
}
assert set(REGISTRY) == set(METHOD_NAMES)


def apply(model: VQAModel, spec: MethodSpec) -> AppliedMethod:
    """Freeze the backbone, inject the method at the sites its placement picks, and unfreeze the backbone extras
    the spec trains (by default the APT authors' set: poolers, token-type embeddings, a learnable [CLS])."""
    applied = REGISTRY[spec.name](model, spec)
    applied.extras = train_extras(model, resolve_extras(spec))
    applied.groups = model.trainable_groups(applied.extras)
    return applied


__all__ = ["AppliedMethod", "MethodSpec", "METHOD_NAMES", "REGISTRY", "apply"]
