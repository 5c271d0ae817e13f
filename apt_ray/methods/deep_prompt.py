"""Deep prompt tuning (VPT-deep / P-Tuning v2), the APT paper's "Deep Prompt" baseline.

Each site owns ``p`` prompt tokens that join its keys and values after the
site's own ``W_k``/``W_v``. With ``reparam_hidden`` the prompts are OFA-PT's
reparameterisation ``P = MLP(E)``; :func:`fold` replaces the MLP by plain prompts.
"""

from __future__ import annotations

import torch
from torch import nn

from apt_ray.methods.base import AppliedMethod, prepare
from apt_ray.methods.sites import SiteAttention, SiteMethod
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.vqa import VQAModel


class DeepPromptSite(SiteMethod):
    """Prompts for one site, plain or reparameterised."""

    def __init__(self, hidden: int, num_prompts: int, reparam_hidden: int | None, project_queries: bool) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(num_prompts, hidden) * 0.02)
        self.reparam = (
            nn.Sequential(nn.Linear(hidden, reparam_hidden), nn.Tanh(), nn.Linear(reparam_hidden, hidden)) if reparam_hidden else None
        )
        self.project_queries = project_queries

    def prompt_tokens(self) -> torch.Tensor:
        return self.prompts if self.reparam is None else self.reparam(self.prompts)

    def extra_kv(self, x: torch.Tensor, y: torch.Tensor, site: SiteAttention) -> tuple[torch.Tensor, torch.Tensor]:
        w_q, w_k, w_v, _ = site.projections()
        p = self.prompt_tokens().to(y.dtype).unsqueeze(0)
        if self.project_queries:
            # The authors' fused qkv layer also projects the prompts' queries, which no
            # token uses; kept (by default) so the cost matches the paper's accounting.
            w_q(p)
        return w_k(p), w_v(p)


@torch.no_grad()
def fold(model: nn.Module) -> int:
    """Replace every reparameterised prompt by its plain value ``MLP(E)``; returns sites folded."""
    folded = 0
    for m in model.modules():
        if isinstance(m, DeepPromptSite) and m.reparam is not None:
            m.prompts = nn.Parameter(m.prompt_tokens().detach().clone(), requires_grad=m.prompts.requires_grad)
            m.reparam = None
            folded += 1
    return folded


def apply(model: VQAModel, spec: MethodSpec) -> AppliedMethod:
    spec, layers, sites = prepare(model, spec)
    p, h = spec.num_prompts, spec.reparam_hidden
    proj = 3 if spec.project_queries else 2
    for site in sites:
        site.module.attach(DeepPromptSite(site.hidden_size, p, h, spec.project_queries))

    def site_macs(s, nq: int, nk: int) -> int:
        d = s.hidden_size
        return proj * d * d * p + 2 * nq * p * d + (2 * p * d * h if h else 0)

    def site_params(s) -> int:
        d = s.hidden_size
        return p * d + ((2 * d * h + h + d) if h else 0)

    return AppliedMethod(spec, layers, sites, site_macs=site_macs, site_params=site_params)
