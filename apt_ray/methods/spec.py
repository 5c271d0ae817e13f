"""``MethodSpec``: which method, its knobs, and where it goes (validated with pydantic).

The knobs are declared once, in each method's config (see :mod:`apt_ray.methods.registry`); ``MethodSpec`` is the
flat union generated from the registered configs: ``name`` plus one field per knob, so that every spec answers
every knob (``spec.num_prompts`` of a LoRA spec is the default). ``spec.config()`` is the chosen method's own config.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from apt_ray.methods import registry
from apt_ray.methods.configs.pruning import check_pruning
from apt_ray.methods.registry import AUTHORS_EXTRAS, ExtraName, MethodConfig, MethodName, SiteChoice

registry.load_builtins()


class MethodSpec(BaseModel):
    """A method and its knobs (generated: one field per registered knob). Bounds that depend on the backbone are
    checked when applied."""

    model_config = ConfigDict(extra="forbid")

    name: MethodName = "apt"

    @property
    def entry(self) -> registry.MethodEntry:
        return registry.get_method(self.name)

    @model_validator(mode="after")
    def _check_pruning(self) -> "MethodSpec":
        check_pruning(self.name, self)
        return self

    def config(self) -> MethodConfig:
        """The chosen method's config, from the knobs it declares."""
        return self.entry.config_from(self.model_dump())


registry.on_registry_change(lambda: registry.sync_knob_fields(MethodSpec, after="name"))


def __getattr__(attr: str) -> Any:
    if attr == "METHOD_NAMES":  # live: the names registered now
        return registry.method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["AUTHORS_EXTRAS", "ExtraName", "METHOD_NAMES", "MethodConfig", "MethodName", "MethodSpec", "SiteChoice"]
