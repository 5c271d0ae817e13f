"""OFA-PT's reparameterised deep prompts: one shared prefix encoder for the whole model.

A learnable embedding ``E`` (p x d) goes through ``Linear(d, h) -> ReLU -> Linear(h, S * 2 * d)``;
for each of the ``S`` chosen sites the output holds a key prefix and a value prefix (p x d each)
that join that site's keys and values directly in key/value space (no ``W_k``/``W_v``).
Dropout acts on the emitted prefixes in training mode.

Layout of the encoder's output row (one row per prompt): site ``s`` reads its key prefix from
columns ``[2 s d, (2 s + 1) d)`` and its value prefix from ``[(2 s + 1) d, (2 s + 2) d)``.

The prefixes are computed once per model forward: a forward pre-hook on the backbone fills a
cache that every site reads, and a forward hook clears it. A site called outside a backbone
forward (a unit test calling one attention module) computes the prefixes on demand instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from apt_ray.methods.sites import SiteAttention, SiteMethod


class PrefixEncoder(nn.Module):
    """``E -> Linear(d, h) -> ReLU -> Linear(h, S * 2 * d)`` (+ dropout): every site's key/value prefixes."""

    def __init__(self, num_prompts: int, hidden: int, reparam_hidden: int, num_sites: int, dropout: float) -> None:
        super().__init__()
        self.num_prompts, self.hidden, self.num_sites = num_prompts, hidden, num_sites
        self.embedding = nn.Parameter(torch.randn(num_prompts, hidden))  # as nn.Embedding initialises its table
        self.net = nn.Sequential(nn.Linear(hidden, reparam_hidden), nn.ReLU(), nn.Linear(reparam_hidden, num_sites * 2 * hidden))
        self.dropout = nn.Dropout(dropout)
        self._cache: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def raw(self) -> torch.Tensor:
        """All prefixes without dropout, (S, 2, p, d): ``[s, 0]`` the key prefix of site ``s``, ``[s, 1]`` its value prefix."""
        p, d, s = self.num_prompts, self.hidden, self.num_sites
        return self.net(self.embedding).view(p, s, 2, d).permute(1, 2, 0, 3)

    def forward(self) -> torch.Tensor:
        """All prefixes, with dropout in training mode."""
        return self.dropout(self.raw())

    def prefixes(self) -> torch.Tensor:
        """The prefixes of the current backbone forward (cached), or freshly computed outside one."""
        return self._cache if self._cache is not None else self()

    def attach_to(self, backbone: nn.Module) -> None:
        """Compute the prefixes once at the start of every backbone forward, drop them at its end."""
        self.detach_hooks()
        self._handles = [
            backbone.register_forward_pre_hook(self._fill_cache),
            backbone.register_forward_hook(self._clear_cache),
        ]

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._cache = None

    def _fill_cache(self, module: nn.Module, args: tuple) -> None:
        self._cache = self()

    def _clear_cache(self, module: nn.Module, args: tuple, output: object) -> None:
        self._cache = None

    def macs(self) -> int:
        """Multiply-adds of one evaluation: ``p (d h + h 2 d S)``."""
        lin1, lin2 = self.net[0], self.net[2]
        return self.num_prompts * (lin1.in_features * lin1.out_features + lin2.in_features * lin2.out_features)


class PrefixSite(SiteMethod):
    """Key/value prefixes of one site: a slice of the shared encoder's output, or fixed tensors once folded."""

    def __init__(self, encoder: PrefixEncoder, index: int) -> None:
        super().__init__()
        self._encoder: tuple[PrefixEncoder, ...] = (encoder,)  # a tuple: the model owns the encoder, not each site
        self.index = index
        self.key_prefix: nn.Parameter | None = None
        self.value_prefix: nn.Parameter | None = None

    @property
    def encoder(self) -> PrefixEncoder | None:
        return self._encoder[0] if self._encoder else None

    def extra_kv(self, x: torch.Tensor, y: torch.Tensor, site: SiteAttention) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder is None:
            return self.key_prefix.unsqueeze(0), self.value_prefix.unsqueeze(0)
        kv = self.encoder.prefixes()[self.index]
        return kv[0].unsqueeze(0), kv[1].unsqueeze(0)

    def fix(self, key: torch.Tensor, value: torch.Tensor, requires_grad: bool) -> None:
        """Replace the encoder by fixed prefixes."""
        self.key_prefix = nn.Parameter(key.detach().clone(), requires_grad=requires_grad)
        self.value_prefix = nn.Parameter(value.detach().clone(), requires_grad=requires_grad)
        self._encoder = ()


@torch.no_grad()
def fold_prefix_encoder(encoder: PrefixEncoder, sites: list[PrefixSite]) -> None:
    """Evaluate ``encoder`` once without dropout and give each site its fixed prefixes; unhooks the encoder."""
    kv = encoder.raw()
    trainable = encoder.embedding.requires_grad
    for site in sites:
        site.fix(kv[site.index, 0], kv[site.index, 1], trainable)
    encoder.detach_hooks()
