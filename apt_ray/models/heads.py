"""Task heads on pooled backbone features."""

from __future__ import annotations

import torch
from torch import nn


class VQAHead(nn.Module):
    """ViLT/METER VQA classifier: Linear -> LayerNorm -> GELU -> Linear to answer logits; with ``hidden=None``
    a single Linear layer (the linear probe's classifier).

    Trained with binary cross-entropy on soft VQA targets (see :func:`vqa_loss`).
    """

    def __init__(self, in_dim: int, hidden: int | None, num_answers: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.in_dim, self.num_answers = in_dim, num_answers
        if hidden is None:
            self.net = nn.Linear(in_dim, num_answers, device=device)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden, device=device), nn.LayerNorm(hidden, device=device), nn.GELU(),
                                     nn.Linear(hidden, num_answers, device=device))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)

    def linear_probe(self) -> "VQAHead":
        """A single Linear layer with this head's input and output widths, on this head's device (the linear
        probe's classifier; see :func:`apt_ray.methods.probe.apply_linear_probe`)."""
        return VQAHead(self.in_dim, None, self.num_answers, device=next(self.parameters()).device)


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE on soft targets, summed over answers and averaged over questions (as ViLT/METER)."""
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]
