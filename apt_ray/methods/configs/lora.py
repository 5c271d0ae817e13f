"""LoRA's knobs (implementation: :mod:`apt_ray.methods.lora`, through peft)."""

from __future__ import annotations

from pydantic import Field

from apt_ray.methods.configs.shared import RANK, RankConfig
from apt_ray.methods.registry import LR, PLACEMENT, register_method


class LoRAConfig(RankConfig):
    """LoRA on each chosen site's W_q and W_v."""

    lora_alpha: float = Field(8.0, gt=0, description="lora: scaling numerator (the update is scaled by alpha / rank)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="lora: dropout on the LoRA branch's input")


register_method("lora", config=LoRAConfig, apply="apt_ray.methods.lora:apply",
                searchable={"rank": RANK, **PLACEMENT, "lr": LR})
