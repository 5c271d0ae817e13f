"""The seam between backbones and methods: attention sites and placement rules.

A backbone lists its attention sites; a method only ever touches sites, so every
method works on every backbone that lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from apt_ray.errors import UserError

SiteKind = Literal["self", "cross"]
PLACEMENTS = ("bottom", "top")


class SiteMethod(nn.Module):
    """A method's per-site module. Override either hook (or both).

    ``extra_kv`` returns extra keys and values in the projected space
    (``(B or 1, p, d)`` each) that join the site's keys/values;
    ``transform_output`` maps the site's output (after ``W_o``) given the
    site's query-side input ``x``.
    """

    def extra_kv(self, x: torch.Tensor, y: torch.Tensor, site: "SiteAttention") -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def transform_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out


class SiteAttention(nn.Module):
    """Base for wrapped attention modules: holds the methods attached to one site.

    Subclasses reuse the backbone's own Linear layers and expose them through
    ``projections() -> (W_q, W_k, W_v, W_o)``, looked up on every call so that
    layers replaced later (peft's LoRA wrappers) are seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.site_methods = nn.ModuleList()

    def attach(self, method: SiteMethod) -> None:
        self.site_methods.append(method)

    def detach_all(self) -> None:
        self.site_methods = nn.ModuleList()

    def prompt_norm(self) -> nn.Module | None:
        """The normalisation the site's real tokens pass through before ``W_q, W_k, W_v`` (ViLT's pre-norm
        LayerNorm), which prompt tokens entering the layer also pass through; None where tokens enter unnormalised
        (METER's post-norm blocks)."""
        return None


@dataclass(frozen=True)
class AttentionSite:
    """One multi-head attention module of a backbone."""

    name: str
    layer: int
    stream: str  # "joint" (single-stream ViLT) or "text"/"image" (METER)
    kind: SiteKind
    module: SiteAttention
    hidden_size: int
    num_heads: int
    key_stream: str  # the stream keys/values come from (== stream for self-attention)


@dataclass(frozen=True)
class FFNSite:
    """The output projection of one feed-forward block (for adapters)."""

    name: str
    layer: int
    stream: str
    linear: nn.Linear


def resolve_layers(
    num_layers: int,
    depth: int | None = None,
    placement: str = "bottom",
    layers: Sequence[int] | None = None,
) -> list[int]:
    """Layer indices chosen by placement: the first/last ``depth`` layers or an explicit list."""
    if layers is not None:
        chosen = sorted(set(int(i) for i in layers))
        bad = [i for i in chosen if i < 0 or i >= num_layers]
        if not chosen or bad:
            raise UserError(
                f"layers {list(layers)} are out of range: this backbone has {num_layers} "
                f"prompt-able layers, so explicit layers must be a non-empty list of indices in 0..{num_layers - 1}."
            )
        return chosen
    if placement not in PLACEMENTS:
        raise UserError(f"placement '{placement}' is not allowed: use 'bottom' (first D layers) or 'top' (last D layers).")
    if depth is None:
        depth = num_layers
    if depth < 1 or depth > num_layers:
        raise UserError(
            f"depth {depth} is out of range: this backbone has {num_layers} prompt-able layers, "
            f"so depth must be between 1 and {num_layers}."
        )
    return list(range(depth)) if placement == "bottom" else list(range(num_layers - depth, num_layers))


def select_sites(sites: Sequence[AttentionSite], layers: Sequence[int], kinds: Sequence[str] = ("self", "cross")) -> list[AttentionSite]:
    """Sites whose layer is chosen and whose kind is allowed, in backbone order."""
    wanted = set(layers)
    return [s for s in sites if s.layer in wanted and s.kind in kinds]
