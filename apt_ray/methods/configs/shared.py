"""Knobs several built-in methods share: one declaration each, inherited by every method that reads them."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from apt_ray.methods.registry import MethodConfig, Search, hidden_size


class PromptsConfig(MethodConfig):
    """Methods with prompt tokens per site."""

    num_prompts: int = Field(16, ge=1, description="prompts per site")


class RankConfig(MethodConfig):
    """Methods with low-rank factors; the rank may not exceed the backbone's hidden size."""

    bounded_by_hidden: ClassVar[tuple[str, ...]] = ("rank",)

    rank: int = Field(4, ge=1, description="rank of the low-rank factors (APT's approximation rank, LoRA's rank)")


NUM_PROMPTS = Search.int_range(1, 256, log=True)
RANK = Search.int_range(1, hidden_size(64), log=True)
