"""What every backbone's ``encode`` returns, and the token-type table an image pair needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BackboneOutput:
    """Final text states (B, Nt, d), image states (B, Ni, d) and pooled features (B, pooled_size)."""

    text_states: torch.Tensor
    image_states: torch.Tensor
    pooled: torch.Tensor


def with_image_token_types(table: nn.Embedding, count: int) -> nn.Embedding:
    """``table`` (text type 0, image type 1) with ``count`` image types, ids 1..count: the new rows start as copies of
    the image row 1, as ViLT's and METER's NLVR2 heads grow theirs for an image pair; a table that large already
    is returned as it is."""
    if table.num_embeddings >= count + 1:
        return table
    grown = nn.Embedding(count + 1, table.embedding_dim, device=table.weight.device, dtype=table.weight.dtype)
    with torch.no_grad():
        grown.weight[: table.num_embeddings] = table.weight
        grown.weight[table.num_embeddings:] = table.weight[1]
    grown.weight.requires_grad_(table.weight.requires_grad)
    return grown
