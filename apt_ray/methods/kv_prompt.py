"""E2VPT (Han et al. 2023): key-value prompts plus visual prompts.

Key-value prompts are learnable tokens that join the keys and values of each chosen
self-attention site directly in key/value space (no ``W_k``/``W_v``). With ``shared_kv``
(E2VPT's default) one tensor ``P`` (p x d) per site serves as both the extra keys and the extra
values; otherwise each site has separate key and value prompts.

Init (E2VPT's default, ``ORIGIN_INIT = 2``): ``nn.init.kaiming_uniform_(a=0, mode="fan_in",
nonlinearity="leaky_relu")`` on the per-head layout (heads, p, d_h) E2VPT stores them in, so
fan_in = p * d_h and the bound is ``sqrt(6 / (p d_h))``; the tensor is kept here as (p, d).

Visual prompts are ``num_visual_prompts`` learnable tokens appended at the end of the image
tokens (``backbone.set_image_prompts``). With ``deep_visual_prompts`` (E2VPT's default, VPT-deep)
every layer of the encoder that carries the image tokens gets its own set: the input set enters
with the image tokens and, at the input of each later layer, a forward pre-hook replaces the last
``v`` positions (the previous layer's outputs there are discarded) by that layer's set. Their
init is VPT's xavier-style U(-v, v), v = sqrt(6 / (3 patch^2 + d_in)), as E2VPT's.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from apt_ray.methods.base import AppliedMethod, prepare
from apt_ray.methods.pruning import PromptRows
from apt_ray.methods.sites import AttentionSite, SiteAttention, SiteMethod
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.task_model import TaskModel

METHOD_KEY = "kv_prompt"


def kaiming_prompts(num_heads: int, num_prompts: int, hidden: int) -> torch.Tensor:
    """E2VPT's kaiming-uniform init on its (heads, p, d_h) layout, returned as (p, d)."""
    per_head = torch.empty(num_heads, num_prompts, hidden // num_heads)
    nn.init.kaiming_uniform_(per_head, a=0, mode="fan_in", nonlinearity="leaky_relu")
    return per_head.transpose(0, 1).reshape(num_prompts, hidden)


class KVPromptSite(PromptRows, SiteMethod):
    """Key-value prompts of one self-attention site: one shared tensor, or separate key and value prompts."""

    prompt_params = ("key_prompts", "value_prompts")

    def __init__(self, hidden: int, num_heads: int, num_prompts: int, shared_kv: bool = True) -> None:
        super().__init__()
        self.key_prompts = nn.Parameter(kaiming_prompts(num_heads, num_prompts, hidden))
        self.value_prompts = None if shared_kv else nn.Parameter(kaiming_prompts(num_heads, num_prompts, hidden))

    def extra_kv(self, x: torch.Tensor, y: torch.Tensor, site: SiteAttention) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.masked(self.key_prompts).unsqueeze(0)
        return k, (k if self.value_prompts is None else self.masked(self.value_prompts).unsqueeze(0))


class VisualPrompts(nn.Module):
    """E2VPT's visual prompts: ``sets[0]`` enters with the image tokens; with ``deep``, ``sets[i]`` replaces
    the last ``v`` tokens at the input of image-encoder layer ``i``."""

    def __init__(self, num_prompts: int, width: int, num_layers: int, bound: float) -> None:
        super().__init__()
        self.num_prompts = num_prompts
        self.sets = nn.ParameterList(
            nn.Parameter(torch.empty(num_prompts, width).uniform_(-bound, bound)) for _ in range(num_layers)
        )
        self._handles: list[RemovableHandle] = []

    def attach_to(self, backbone: nn.Module) -> None:
        backbone.set_image_prompts(self.sets[0])
        for i, layer in enumerate(backbone.image_encoder_layers()):
            if 0 < i < len(self.sets):
                self._handles.append(layer.register_forward_pre_hook(functools.partial(self._replace, i), with_kwargs=True))

    def _replace(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        in_kwargs = "hidden_states" in kwargs
        h = kwargs["hidden_states"] if in_kwargs else args[0]
        v = self.num_prompts
        prompts = self.sets[index].to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        h = torch.cat([h[:, :-v], prompts], dim=1)
        if in_kwargs:
            return args, {**kwargs, "hidden_states": h}
        return (h, *args[1:]), kwargs


def apply(model: TaskModel, spec: MethodSpec) -> AppliedMethod:
    spec, layers, sites = prepare(model, spec, allowed=("self",))
    p, v = spec.num_prompts, spec.num_visual_prompts
    kv_tensors = 1 if spec.shared_kv else 2
    backbone = model.backbone
    for site in sites:
        site.module.attach(KVPromptSite(site.hidden_size, site.num_heads, p, spec.shared_kv))
    d_in = backbone.input_prompt_dim
    sets = len(backbone.image_encoder_layers()) if spec.deep_visual_prompts else 1
    if v:
        visual = VisualPrompts(v, d_in, sets, math.sqrt(6.0 / (3 * backbone.image_patch_size ** 2 + d_in)))
        model.method_modules[METHOD_KEY] = visual
        visual.attach_to(backbone)

    def global_macs(text_len: int, image_tokens: int) -> int:
        # The visual prompts' own cost: the backbone's closed form with and without them
        # (replacing them at every layer keeps the token count, so deep prompts cost the same).
        return backbone.analytic_macs(text_len, image_tokens, v) - backbone.analytic_macs(text_len, image_tokens, 0)

    def site_params(s: AttentionSite) -> int:
        return kv_tensors * p * s.hidden_size

    return AppliedMethod(
        spec, layers, sites,
        site_macs=lambda s, nq, nk: 2 * nq * p * s.hidden_size,
        site_params=site_params,
        global_macs=global_macs,
        global_params=v * d_in * sets if v else 0,
    )
