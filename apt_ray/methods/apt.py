"""APT (Wu et al. 2023): prompts' effect as a cheap additive term on each site's output.

    K~ = P + (P A) B,   S = relu(X K~^T),   w = max_j S (detached),
    O' = (O + w * (S P)) * exp(s)
"""

from __future__ import annotations

import torch
from torch import nn

from apt_ray.methods.base import AppliedMethod, prepare
from apt_ray.methods.pruning import PromptRows
from apt_ray.methods.sites import SiteMethod
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.task_model import TaskModel


class APTSite(PromptRows, SiteMethod):
    """Per-site APT parameters: prompts P (p x d), low-rank A (d x r), B (r x d, zero), scale s. A pruning mask
    scales the rows of P, in the keys and in the diffused values alike."""

    prompt_params = ("prompts",)

    def __init__(self, hidden: int, num_prompts: int, rank: int) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(num_prompts, hidden) * 0.02)
        self.lora_a = nn.Parameter(torch.randn(hidden, rank))
        self.lora_b = nn.Parameter(torch.zeros(rank, hidden))
        self.log_scale = nn.Parameter(torch.zeros(()))

    def prompt_keys(self) -> torch.Tensor:
        """``K~ = P + (P A) B``: the low-rank stand-in for the prompts' key transform."""
        p = self.masked(self.prompts)
        return p + (p @ self.lora_a) @ self.lora_b

    def transform_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        keys = self.prompt_keys().to(x.dtype)
        scores = torch.relu(x @ keys.transpose(0, 1))  # (B, Nq, p)
        weight = scores.detach().amax(dim=-1, keepdim=True)
        diffusion = scores @ self.masked(self.prompts).to(x.dtype)  # (B, Nq, d)
        return (out + weight * diffusion) * self.log_scale.exp().to(out.dtype)


def apply(model: TaskModel, spec: MethodSpec) -> AppliedMethod:
    spec, layers, sites = prepare(model, spec)
    p, r = spec.num_prompts, spec.rank
    for site in sites:
        module = APTSite(site.hidden_size, p, r)
        module.log_scale.requires_grad_(bool(spec.train_scale))
        site.module.attach(module)
    scale = int(bool(spec.train_scale))
    return AppliedMethod(
        spec, layers, sites,
        site_macs=lambda s, nq, nk: 2 * nq * p * s.hidden_size + 2 * p * s.hidden_size * r,
        site_params=lambda s: p * s.hidden_size + 2 * s.hidden_size * r + scale,
    )
