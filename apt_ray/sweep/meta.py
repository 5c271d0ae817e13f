"""Backbones built on the meta device: limits and closed-form costs without weights or compute.

Building on ``torch.device("meta")`` allocates nothing, so the driver can check
search bounds and FLOPs budgets of paper-size models in a fraction of a second.
"""

from __future__ import annotations

import json

from dataclasses import dataclass
from functools import lru_cache

import torch

from apt_ray import methods
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.presets import build_backbone, get_preset
from apt_ray.models.vqa import VQAModel


@dataclass(frozen=True)
class ModelLimits:
    """What bounds a search over a backbone: layers that can carry a method, and the width."""

    model: str
    num_layers: int
    hidden_size: int


@lru_cache(maxsize=None)
def model_limits(model: str) -> ModelLimits:
    """Layer count and hidden size of a preset (``UserError`` for an unknown preset)."""
    get_preset(model)
    with torch.device("meta"):
        backbone = build_backbone(model)
    return ModelLimits(model, int(backbone.num_layers), int(backbone.hidden_size))


@dataclass(frozen=True)
class Cost:
    """Closed-form cost of one method configuration (GMACs: one multiply-add = one FLOP)."""

    additional_gmacs: float
    updated_params: int
    sites: int


def closed_form_cost(model: str, spec: MethodSpec, text_len: int, image_hw: tuple[int, int], config_json: str | None = None) -> Cost:
    """Additional GMACs and updated parameters from the methods' analytic formulas (the same
    formulas ``apt_ray.profile`` reports as ``analytic_*``), on a weightless model; ``config_json``: a
    checkpoint's backbone config when it differs from the preset's."""
    return _cost(model, spec.model_dump_json(), text_len, (int(image_hw[0]), int(image_hw[1])), config_json)


@lru_cache(maxsize=4096)
def _cost(model: str, spec_json: str, text_len: int, image_hw: tuple[int, int], config_json: str | None) -> Cost:
    spec = MethodSpec.model_validate_json(spec_json)
    preset = get_preset(model)
    image_tokens = (image_hw[0] // preset.patch_size) * (image_hw[1] // preset.patch_size) + 1
    config = None if config_json is None else preset.backbone.config_from_dict(json.loads(config_json))
    with torch.device("meta"):
        vqa = VQAModel(build_backbone(model, config=config), 2)
        applied = methods.apply(vqa, spec)
    lengths = vqa.backbone.stream_lengths(text_len, image_tokens)
    macs = sum(applied.analytic_breakdown(text_len, image_tokens, lengths).values())
    return Cost(macs / 1e9, int(applied.analytic_params()), len(applied.sites))
