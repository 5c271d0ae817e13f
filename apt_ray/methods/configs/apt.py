"""APT's knobs (implementation: :mod:`apt_ray.methods.apt`)."""

from __future__ import annotations

from pydantic import Field

from apt_ray.methods.configs.pruning import PruneConfig
from apt_ray.methods.configs.shared import NUM_PROMPTS, RANK, PromptsConfig, RankConfig
from apt_ray.methods.registry import LR, PLACEMENT, register_method


class APTConfig(PruneConfig, PromptsConfig, RankConfig):
    """APT: ``num_prompts`` approximated prompts per site, low-rank key transform of rank ``rank``."""

    train_scale: bool | None = Field(
        None, description="apt: train the output scale s (the authors' ViLT code does, their METER code keeps it "
        "frozen at 1); default: the backbone's released layout")


register_method("apt", config=APTConfig, apply="apt_ray.methods.apt:apply",
                searchable={"num_prompts": NUM_PROMPTS, "rank": RANK, **PLACEMENT, "lr": LR})
