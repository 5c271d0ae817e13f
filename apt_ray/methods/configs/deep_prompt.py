"""Deep prompt tuning's knobs (implementation: :mod:`apt_ray.methods.deep_prompt`)."""

from __future__ import annotations

from pydantic import Field

from apt_ray.methods.configs.pruning import PruneConfig
from apt_ray.methods.configs.shared import NUM_PROMPTS, PromptsConfig
from apt_ray.methods.registry import LR, PLACEMENT, register_method


class DeepPromptConfig(PruneConfig, PromptsConfig):
    """Deep prompts (VPT-deep / P-Tuning v2), optionally OFA-PT's reparameterisation."""

    reparam_hidden: int | None = Field(None, ge=1, description="deep_prompt: OFA-PT's shared prefix encoder of this width")
    reparam_dropout: float = Field(0.2, ge=0, lt=1, description="deep_prompt: dropout on the prefix encoder's output (OFA-PT: 0.2)")
    project_queries: bool | None = Field(
        None, description="deep_prompt: also project the prompts through W_q (the APT authors' fused-qkv ViLT code "
        "does; their METER code does not); default: the backbone's released layout")


register_method("deep_prompt", config=DeepPromptConfig, apply="apt_ray.methods.deep_prompt:apply",
                searchable={"num_prompts": NUM_PROMPTS, **PLACEMENT, "lr": LR})
