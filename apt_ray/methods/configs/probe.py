"""The ends of the spectrum (implementation: :mod:`apt_ray.methods.probe`): no knobs besides the shared ones."""

from __future__ import annotations

from typing import ClassVar

from apt_ray.methods.registry import LR, MethodConfig, register_method


class LinearProbeConfig(MethodConfig):
    """One Linear layer on frozen pooled features: leaves the backbone alone (no extras by default)."""

    default_extras: ClassVar[tuple[str, ...]] = ()


class HeadOnlyConfig(MethodConfig):
    """The task's MLP head alone (with the authors' extras)."""


class FullConfig(MethodConfig):
    """Full fine-tuning: already trains every backbone part (no extras to add)."""

    default_extras: ClassVar[tuple[str, ...]] = ()


register_method("linear_probe", config=LinearProbeConfig, apply="apt_ray.methods.probe:apply_linear_probe", searchable={"lr": LR})
register_method("head_only", config=HeadOnlyConfig, apply="apt_ray.methods.probe:apply_head_only", searchable={"lr": LR})
register_method("full", config=FullConfig, apply="apt_ray.methods.probe:apply_full", searchable={"lr": LR})
