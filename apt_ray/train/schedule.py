"""The optimiser and learning-rate schedule of every run: AdamW over named parameter groups, each at its own rate,
and linear warm-up followed by linear or cosine decay to zero."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def no_decay_ids(model: nn.Module) -> set[int]:
    """Biases and LayerNorm weights: what the ViLT/METER recipes exclude from weight decay."""
    ids = {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    ids |= {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    return ids


def build_optimizer(
    model: nn.Module,
    groups: dict[str, list[nn.Parameter]],
    rates: dict[str, float],
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    decay_norm_and_bias: bool = True,
) -> torch.optim.AdamW:
    """AdamW with one parameter group per named group (``method``, ``head``, extras) at ``rates[name]``; with
    ``decay_norm_and_bias=False`` each is split again so that biases and LayerNorm weights get no decay."""
    skip = set() if decay_norm_and_bias else no_decay_ids(model)
    param_groups = []
    for name, params in groups.items():
        for decayed in (True, False):
            chosen = [p for p in params if (id(p) not in skip) == decayed]
            if chosen:
                param_groups.append({"params": chosen, "lr": rates[name], "weight_decay": weight_decay if decayed else 0.0, "name": name})
    return torch.optim.AdamW(param_groups, betas=betas)


def warmup_then_decay(optimizer: Optimizer, warmup_steps: int, total_steps: int, shape: str = "cosine") -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then ``linear`` or ``cosine`` decay to zero at ``total_steps``: the
    schedules of transformers' ``get_linear_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup`` on
    torch's ``LambdaLR``, not imported from ``transformers.optimization``, which pulls in peft and costs
    seconds in every training process."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if shape == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, factor)
