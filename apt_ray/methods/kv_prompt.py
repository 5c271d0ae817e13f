"""E2VPT (Han et al. 2023): key-value prompts plus input-layer visual prompts.

Key-value prompts are learnable tokens that join the keys and values of each
chosen self-attention site directly in key/value space (no ``W_k``/``W_v``).
Visual prompts are ``num_visual_prompts`` learnable tokens appended to the image
tokens at the input, so they pass through every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from apt_ray.methods.base import AppliedMethod, prepare
from apt_ray.methods.sites import SiteAttention, SiteMethod
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.vqa import VQAModel


class KVPromptSite(SiteMethod):
    """``p`` key prompts and ``p`` value prompts for one self-attention site."""

    def __init__(self, hidden: int, num_prompts: int) -> None:
        super().__init__()
        self.key_prompts = nn.Parameter(torch.randn(num_prompts, hidden) * 0.02)
        self.value_prompts = nn.Parameter(torch.randn(num_prompts, hidden) * 0.02)

    def extra_kv(self, x: torch.Tensor, y: torch.Tensor, site: SiteAttention) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_prompts.unsqueeze(0), self.value_prompts.unsqueeze(0)


def apply(model: VQAModel, spec: MethodSpec) -> AppliedMethod:
    spec, layers, sites = prepare(model, spec, allowed=("self",))
    p, v = spec.num_prompts, spec.num_visual_prompts
    backbone = model.backbone
    for site in sites:
        site.module.attach(KVPromptSite(site.hidden_size, p))
    d_in = backbone.input_prompt_dim
    if v:
        visual = nn.Parameter(torch.randn(v, d_in) * 0.02)
        holder = nn.Module()
        holder.visual_prompts = visual
        model.method_modules["kv_prompt"] = holder
        backbone.set_image_prompts(visual)

    def global_macs(text_len: int, image_tokens: int) -> int:
        # The visual prompts' own cost: the backbone's closed form with and without them.
        return backbone.analytic_macs(text_len, image_tokens, v) - backbone.analytic_macs(text_len, image_tokens, 0)

    return AppliedMethod(
        spec, layers, sites,
        site_macs=lambda s, nq, nk: 2 * nq * p * s.hidden_size,
        site_params=lambda s: 2 * p * s.hidden_size,
        global_macs=global_macs,
        global_params=v * d_in,
    )
