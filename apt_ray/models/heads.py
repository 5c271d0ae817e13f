"""Task heads on pooled backbone features."""

from __future__ import annotations

import torch
from torch import nn


class VQAHead(nn.Module):
    """ViLT/METER VQA classifier: Linear -> LayerNorm -> GELU -> Linear to answer logits.

    Trained with binary cross-entropy on soft VQA targets (see :func:`vqa_loss`).
    """

    def __init__(self, in_dim: int, hidden: int, num_answers: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_answers))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE on soft targets, summed over answers and averaged over questions (as ViLT/METER)."""
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]
