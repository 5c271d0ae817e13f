"""Deep prompt tuning (VPT-deep / P-Tuning v2), the APT paper's "Deep Prompt" baseline.

Each chosen site owns ``p`` prompt tokens. As in the APT authors' released code, a prompt enters
the site the way its real tokens do: through the site's ``prompt_norm()`` when it has one (ViLT:
the layer's pre-norm LayerNorm, the prompts being appended before the block's norm), then through
the site's own ``W_k``/``W_v``, joining the keys and values; queries come from the real tokens only.
With ``project_queries`` the prompts also go through ``W_q`` (the ViLT code's fused qkv layer
projects them; the result is discarded) so that the cost matches the authors' accounting.
Which sites carry prompts follows the backbone's released layout (``MethodSpec.sites``; METER:
cross-attention only, no query projection).

Init: U(-v, v), v = sqrt(6 / (3 * 16 * 16 + d)) (VPT's xavier-style value, 0.0625 at d = 768),
as the authors' ViLT and METER code initialise their prompts.

With ``reparam_hidden`` the prompts are OFA-PT's reparameterisation instead: one shared prefix
encoder emits every site's key and value prefixes directly in key/value space
(:mod:`apt_ray.methods.prefix_encoder`); :func:`fold` replaces it by fixed prefixes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from apt_ray.methods.base import AppliedMethod, prepare
from apt_ray.methods.pruning import PromptRows
from apt_ray.methods.prefix_encoder import PrefixEncoder, PrefixSite, fold_prefix_encoder
from apt_ray.methods.sites import AttentionSite, SiteAttention, SiteMethod
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.task_model import TaskModel

METHOD_KEY = "deep_prompt"


def prompt_init_bound(hidden: int, patch: int = 16) -> float:
    """VPT's xavier-style uniform bound ``sqrt(6 / (3 patch^2 + d))``."""
    return math.sqrt(6.0 / (3 * patch * patch + hidden))


class DeepPromptSite(PromptRows, SiteMethod):
    """``p`` prompt tokens of one site, entering through the site's norm and ``W_k``/``W_v`` (and ``W_q``). A pruning
    mask scales the prompts' projected keys and values (a scale on the token itself would be undone by the norm)."""

    prompt_params = ("prompts",)

    def __init__(self, hidden: int, num_prompts: int, project_queries: bool) -> None:
        super().__init__()
        bound = prompt_init_bound(hidden)
        self.prompts = nn.Parameter(torch.empty(num_prompts, hidden).uniform_(-bound, bound))
        self.project_queries = project_queries

    def extra_kv(self, x: torch.Tensor, y: torch.Tensor, site: SiteAttention) -> tuple[torch.Tensor, torch.Tensor]:
        w_q, w_k, w_v, _ = site.projections()
        p = self.prompts.to(y.dtype).unsqueeze(0)
        norm = site.prompt_norm()
        if norm is not None:
            p = norm(p)
        if self.project_queries:
            # The authors' fused qkv layer also projects the prompts' queries, which no
            # token uses; kept so that the cost matches the paper's accounting.
            w_q(p)
        return self.masked(w_k(p)), self.masked(w_v(p))


@torch.no_grad()
def fold(model: nn.Module) -> int:
    """Replace OFA-PT's prefix encoder by the fixed prefixes it emits (eval mode, no dropout) and remove it.

    Returns the number of sites folded (0 when the model has no prefix encoder). The folded model's output
    equals the unfolded one's in eval mode; its updated parameters become ``2 p d`` per site.
    """
    sites = [m for m in model.modules() if isinstance(m, PrefixSite) and m.encoder is not None]
    encoders = {id(s.encoder): s.encoder for s in sites}
    for encoder in encoders.values():
        fold_prefix_encoder(encoder, [s for s in sites if s.encoder is encoder])
    method_modules = getattr(model, "method_modules", None)
    if method_modules is not None and METHOD_KEY in method_modules and isinstance(method_modules[METHOD_KEY], PrefixEncoder):
        del method_modules[METHOD_KEY]
    return len(sites)


def _apply_reparam(model: TaskModel, spec: MethodSpec, layers: list[int], sites: list[AttentionSite]) -> AppliedMethod:
    p, h, n = spec.num_prompts, spec.reparam_hidden, len(sites)
    d = model.backbone.hidden_size
    if any(s.hidden_size != d for s in sites):
        raise ValueError("the shared prefix encoder needs every site to have the backbone's hidden size")
    encoder = PrefixEncoder(p, d, h, n, spec.reparam_dropout)
    model.method_modules[METHOD_KEY] = encoder
    encoder.attach_to(model.backbone)
    for i, site in enumerate(sites):
        site.module.attach(PrefixSite(encoder, i))
    return AppliedMethod(
        spec, layers, sites,
        site_macs=lambda s, nq, nk: 2 * nq * p * s.hidden_size,
        site_params=lambda s: 0,
        global_macs=lambda text_len, image_tokens: p * (d * h + h * 2 * d * n),
        global_params=p * d + d * h + h + h * 2 * d * n + 2 * d * n,
    )


def apply(model: TaskModel, spec: MethodSpec) -> AppliedMethod:
    spec, layers, sites = prepare(model, spec)
    if spec.reparam_hidden:
        return _apply_reparam(model, spec, layers, sites)
    p = spec.num_prompts
    proj = 3 if spec.project_queries else 2
    for site in sites:
        site.module.attach(DeepPromptSite(site.hidden_size, p, bool(spec.project_queries)))

    def site_macs(s: AttentionSite, nq: int, nk: int) -> int:
        d = s.hidden_size
        return proj * d * d * p + 2 * nq * p * d  # the prompt norm is elementwise: no multiply-adds

    return AppliedMethod(spec, layers, sites, site_macs=site_macs, site_params=lambda s: p * s.hidden_size)
