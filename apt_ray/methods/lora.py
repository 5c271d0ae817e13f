"""LoRA (through peft) on the query and value projections of the chosen sites."""

from __future__ import annotations

from apt_ray.methods.base import AppliedMethod, prepare
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.task_model import TaskModel


def apply(model: TaskModel, spec: MethodSpec) -> AppliedMethod:
    from peft import LoraConfig, inject_adapter_in_model  # heavy import, only when LoRA is used

    spec, layers, sites = prepare(model, spec)
    backbone = model.backbone
    names = {id(m): n for n, m in backbone.named_modules()}
    targets: list[str] = []
    for site in sites:
        w_q, _, w_v, _ = site.module.projections()
        targets += [names[id(w_q)], names[id(w_v)]]
    r = spec.rank
    config = LoraConfig(r=r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, backbone)
    for n, p in backbone.named_parameters():
        p.requires_grad_("lora_" in n)
    # Each adapted d x d Linear adds A (r x d) and B (d x r): 2 d r MACs per token.
    return AppliedMethod(
        spec, layers, sites,
        site_macs=lambda s, nq, nk: 2 * s.hidden_size * r * (nq + nk),
        site_params=lambda s: 2 * 2 * s.hidden_size * r,
    )
