"""``MethodSpec``: which method, its knobs, and where it goes (validated with pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MethodName = Literal["apt", "deep_prompt", "kv_prompt", "lora", "adapter", "linear_probe", "head_only", "full"]
METHOD_NAMES: tuple[str, ...] = MethodName.__args__
SiteChoice = Literal["all", "self", "cross"]
# Backbone parts the APT authors train in every method besides the method and the head: the poolers,
# the token-type embeddings and a learnable replacement of the [CLS] token ("token4classifier").
ExtraName = Literal["pooler", "token_type", "cls_token"]
AUTHORS_EXTRAS: tuple[str, ...] = ExtraName.__args__


class MethodSpec(BaseModel):
    """A method and its knobs. Bounds that depend on the backbone are checked when applied."""

    model_config = ConfigDict(extra="forbid")

    name: MethodName = "apt"
    num_prompts: int = Field(16, ge=1, description="prompts per site (apt, deep_prompt, kv_prompt)")
    rank: int = Field(4, ge=1, description="APT approximation rank; LoRA rank")
    depth: int | None = Field(None, ge=1, description="number of layers carrying the method (default: all)")
    placement: Literal["bottom", "top"] = "bottom"
    layers: list[int] | None = Field(None, description="explicit layer indices (overrides depth/placement)")
    sites: SiteChoice | None = Field(
        None, description="which attention sites of the chosen layers: all, self or cross (default: the method's "
        "layout on this backbone, e.g. deep_prompt on METER: cross, as the APT authors' released code)")
    reparam_hidden: int | None = Field(None, ge=1, description="deep_prompt: OFA-PT's shared prefix encoder of this width")
    reparam_dropout: float = Field(0.2, ge=0, lt=1, description="deep_prompt: dropout on the prefix encoder's output (OFA-PT: 0.2)")
    project_queries: bool | None = Field(
        None, description="deep_prompt: also project the prompts through W_q (the APT authors' fused-qkv ViLT code "
        "does; their METER code does not); default: the backbone's released layout")
    train_scale: bool | None = Field(
        None, description="apt: train the output scale s (the authors' ViLT code does, their METER code keeps it "
        "frozen at 1); default: the backbone's released layout")
    shared_kv: bool = Field(True, description="kv_prompt: one tensor serves as key and value prompts (E2VPT's default)")
    num_visual_prompts: int = Field(8, ge=0, description="kv_prompt: E2VPT visual prompts")
    deep_visual_prompts: bool = Field(True, description="kv_prompt: new visual prompts at every layer of the image encoder (E2VPT's default) instead of the input only")
    train_extras: list[ExtraName] | None = Field(
        None, description="backbone parts trained besides the method and the head: pooler, token_type, cls_token "
        "(default: all three, the APT authors' set; none for linear_probe)")
    adapter_dim: int = Field(32, ge=1, description="adapter bottleneck width")
    lora_alpha: float = Field(8.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
