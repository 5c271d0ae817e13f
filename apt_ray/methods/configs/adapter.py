"""Bottleneck adapters' knobs (implementation: :mod:`apt_ray.methods.adapter`)."""

from __future__ import annotations

from pydantic import Field

from apt_ray.methods.registry import LR, PLACEMENT, MethodConfig, Search, hidden_size, register_method


class AdapterConfig(MethodConfig):
    """Adapters after every chosen attention site and the FFN of its layer."""

    adapter_dim: int = Field(32, ge=1, description="adapter bottleneck width")


register_method("adapter", config=AdapterConfig, apply="apt_ray.methods.adapter:apply",
                searchable={"adapter_dim": Search.int_range(1, hidden_size(256), log=True), **PLACEMENT, "lr": LR})
