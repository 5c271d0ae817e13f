"""What every backbone's ``encode`` returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BackboneOutput:
    """Final text states (B, Nt, d), image states (B, Ni, d) and pooled features (B, pooled_size)."""

    text_states: torch.Tensor
    image_states: torch.Tensor
    pooled: torch.Tensor
