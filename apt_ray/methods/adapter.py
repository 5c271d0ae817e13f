"""Bottleneck adapters after every chosen attention site and the FFN of its layer and stream."""

from __future__ import annotations

import torch
from torch import nn

from apt_ray.methods.base import AppliedMethod, prepare
from apt_ray.methods.sites import SiteMethod
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.task_model import TaskModel


class Bottleneck(nn.Module):
    """``h + up(gelu(down(h)))`` with ``up`` zero-initialised, so it starts as the identity."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(h)))


class AdapterSite(SiteMethod):
    """An adapter on a site's output (after ``W_o``, before dropout and residual)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.adapter = Bottleneck(hidden, width)

    def transform_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.adapter(out)


def apply(model: TaskModel, spec: MethodSpec) -> AppliedMethod:
    spec, layers, sites = prepare(model, spec)
    m = spec.adapter_dim
    for site in sites:
        site.module.attach(AdapterSite(site.hidden_size, m))
    ffn_sites = [f for f in model.backbone.ffn_sites() if f.layer in set(layers)]
    ffn_adapters = nn.ModuleDict()
    for f in ffn_sites:
        adapter = Bottleneck(f.linear.out_features, m)
        ffn_adapters[f.name.replace(".", "_")] = adapter
        f.linear.register_forward_hook(lambda mod, args, out, a=adapter: a(out))
    model.method_modules["adapter"] = ffn_adapters

    def params(d: int) -> int:
        return 2 * d * m + m + d

    return AppliedMethod(
        spec, layers, sites, ffn_sites,
        site_macs=lambda s, nq, nk: 2 * nq * s.hidden_size * m,
        ffn_macs=lambda n: 2 * n * model.backbone.hidden_size * m,
        site_params=lambda s: params(s.hidden_size),
        ffn_params=lambda f: params(f.linear.out_features),
    )
