"""A backbone with its VQA head: the model every method is applied to."""

from __future__ import annotations

import torch
from torch import nn

from apt_ray.models.heads import VQAHead


class VQAModel(nn.Module):
    """``backbone`` (ViLT or METER) + ``head``; ``method_modules`` holds a method's non-site parts."""

    def __init__(self, backbone: nn.Module, num_answers: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = VQAHead(backbone.pooled_size, 2 * backbone.hidden_size, num_answers)
        self.method_modules = nn.ModuleDict()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(input_ids, attention_mask, pixel_values, pixel_mask))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def method_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that are not the head's: what the method updates."""
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in head]
