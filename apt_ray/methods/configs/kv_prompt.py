"""E2VPT's knobs (implementation: :mod:`apt_ray.methods.kv_prompt`)."""

from __future__ import annotations

from pydantic import Field

from apt_ray.methods.configs.pruning import PruneConfig
from apt_ray.methods.configs.shared import NUM_PROMPTS, PromptsConfig
from apt_ray.methods.registry import LR, PLACEMENT, register_method


class KVPromptConfig(PruneConfig, PromptsConfig):
    """E2VPT: key-value prompts at self-attention sites plus visual prompts."""

    shared_kv: bool = Field(True, description="kv_prompt: one tensor serves as key and value prompts (E2VPT's default)")
    num_visual_prompts: int = Field(8, ge=0, description="kv_prompt: E2VPT visual prompts")
    deep_visual_prompts: bool = Field(
        True, description="kv_prompt: new visual prompts at every layer of the image encoder (E2VPT's default) "
        "instead of the input only")


register_method("kv_prompt", config=KVPromptConfig, apply="apt_ray.methods.kv_prompt:apply",
                searchable={"num_prompts": NUM_PROMPTS, **PLACEMENT, "lr": LR})
