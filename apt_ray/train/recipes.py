"""Training recipes: named sets of optimisation settings a trial starts from (``recipe=...``).

A recipe gives the base learning rate and one multiplier per trainable group (``method``, ``pooler``,
``token_type``, ``cls_token``, ``head``), the schedule, AdamW's betas, weight decay, clipping, epochs, global
batch and precision. Keys set explicitly on a trial (``lr``, ``head_lr``, ``epochs``, ...) override it.

``apt-vilt-vqa`` and ``apt-meter-vqa`` are the APT authors' VQAv2 settings for ViLT and METER;
``embedded`` is the CPU default tuned on the synthetic task.
"""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GroupName = Literal["method", "pooler", "token_type", "cls_token", "head"]


class Recipe(BaseModel):
    """Optimisation settings of one named recipe (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    lr: float = Field(gt=0, description="base learning rate")
    method_lr: dict[str, float] = Field(default_factory=dict, description="base rate per method, where it differs")
    lr_mult: dict[GroupName, float] = Field(default_factory=dict, description="rate of a group = lr x its multiplier (default 1)")
    method_lr_mult: dict[str, dict[GroupName, float]] = Field(default_factory=dict, description="per-method changes to lr_mult")
    head_lr: dict[str, float] = Field(default_factory=dict, description="absolute head rate per method ('*': every method); else lr x head multiplier")
    schedule: Literal["linear", "cosine"]
    warmup_ratio: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    decay_norm_and_bias: bool = Field(True, description="False: biases and LayerNorm weights get no weight decay")
    betas: tuple[float, float]
    grad_clip: float = Field(ge=0, description="max gradient norm; 0 = no clipping")
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="global batch")
    precision: Literal["bf16", "fp16", "fp32"] = Field(description="autocast dtype on GPU (the CPU always runs fp32)")

    def base_lr(self, method: str) -> float:
        return self.method_lr.get(method, self.lr)

    def multipliers(self, method: str) -> dict[str, float]:
        """Each group's multiplier of the base rate for ``method`` (1 where the recipe says nothing)."""
        mult = {**self.lr_mult, **self.method_lr_mult.get(method, {})}
        return {g: mult.get(g, 1.0) for g in GroupName.__args__}

    def head_rate(self, method: str, lr: float) -> float:
        """The head's rate for ``method`` when the trial's base rate is ``lr``."""
        absolute = self.head_lr.get(method, self.head_lr.get("*"))
        return absolute if absolute is not None else lr * self.multipliers(method)["head"]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="embedded",
            description="CPU defaults tuned on the embedded synthetic task (tiny backbones)",
            lr=1e-3,
            head_lr={"*": 3e-2, "linear_probe": 3.0},
            schedule="cosine", warmup_ratio=0.1, weight_decay=0.01, betas=(0.9, 0.999), grad_clip=1.0,
            epochs=3, batch_size=64, precision="bf16",
        ),
        Recipe(
            name="apt-vilt-vqa",
            description="APT authors, ViLT on VQAv2: lr 5e-4, head x10, AdamW (0.9, 0.98), linear warm-up 10% and decay, "
            "no clipping, 10 epochs, batch 256, fp16",
            lr=5e-4, lr_mult={"head": 10.0},
            schedule="linear", warmup_ratio=0.1, weight_decay=0.01, decay_norm_and_bias=False, betas=(0.9, 0.98),
            grad_clip=0.0, epochs=10, batch_size=256, precision="fp16",
        ),
        Recipe(
            name="apt-meter-vqa",
            description="APT authors, METER on VQAv2: base lr 2.5e-5, cross-modal parts (a method inside the fusion layers, "
            "the poolers) x5, head x50, AdamW (0.9, 0.98), linear warm-up 10% and decay, no clipping, 10 epochs, batch 512, fp32",
            lr=2.5e-5, lr_mult={"method": 5.0, "pooler": 5.0, "head": 50.0},
            # their deep prompts are a top-level tensor, outside the cross-modal modules: base rate
            method_lr_mult={"deep_prompt": {"method": 1.0}},
            schedule="linear", warmup_ratio=0.1, weight_decay=0.01, decay_norm_and_bias=False, betas=(0.9, 0.98),
            grad_clip=0.0, epochs=10, batch_size=512, precision="fp32",
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a ``ValueError`` with a did-you-mean otherwise (pydantic turns it into the
    one-paragraph configuration error)."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown recipe '{name}'{hint}: choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
