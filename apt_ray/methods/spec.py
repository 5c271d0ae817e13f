"""``MethodSpec``: which method, its knobs, and where it goes (validated with pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MethodName = Literal["apt", "deep_prompt", "kv_prompt", "lora", "adapter", "linear_probe", "full"]
METHOD_NAMES: tuple[str, ...] = MethodName.__args__


class MethodSpec(BaseModel):
    """A method and its knobs. Bounds that depend on the backbone are checked when applied."""

    model_config = ConfigDict(extra="forbid")

    name: MethodName = "apt"
    num_prompts: int = Field(16, ge=1, description="prompts per site (apt, deep_prompt, kv_prompt)")
    rank: int = Field(4, ge=1, description="APT approximation rank; LoRA rank")
    depth: int | None = Field(None, ge=1, description="number of layers carrying the method (default: all)")
    placement: Literal["bottom", "top"] = "bottom"
    layers: list[int] | None = Field(None, description="explicit layer indices (overrides depth/placement)")
    reparam_hidden: int | None = Field(None, ge=1, description="deep_prompt: OFA-PT reparameterisation P = MLP(E)")
    project_queries: bool = Field(True, description="deep_prompt: project prompts through W_q too, as the APT authors' fused-qkv code does")
    num_visual_prompts: int = Field(8, ge=0, description="kv_prompt: E2VPT visual prompts at the input layer")
    adapter_dim: int = Field(32, ge=1, description="adapter bottleneck width")
    lora_alpha: float = Field(8.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
