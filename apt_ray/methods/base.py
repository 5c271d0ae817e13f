"""What every method shares: freezing, placement checks, and the record of what it added."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from apt_ray.errors import UserError
from apt_ray.methods.sites import AttentionSite, FFNSite, resolve_layers, select_sites
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.task_model import TaskModel


@dataclass
class AppliedMethod:
    """A method as applied to one model.

    ``site_macs(site, n_q, n_k)`` is the closed-form additional multiply-adds of
    one attention site; ``ffn_macs(n)`` of one FFN site for ``n`` tokens;
    ``global_macs(text_len, image_tokens)`` anything not tied to a site (input prompts).
    """

    spec: MethodSpec
    layers: list[int]
    sites: list[AttentionSite]
    ffn_sites: list[FFNSite] = field(default_factory=list)
    site_macs: Callable[[AttentionSite, int, int], int] = lambda s, nq, nk: 0
    ffn_macs: Callable[[int], int] = lambda n: 0
    global_macs: Callable[[int, int], int] = lambda text_len, image_tokens: 0
    site_params: Callable[[AttentionSite], int] = lambda s: 0
    ffn_params: Callable[[FFNSite], int] = lambda s: 0
    global_params: int = 0
    extras: tuple[str, ...] = ()
    groups: dict[str, list[nn.Parameter]] = field(default_factory=dict)

    def group_sizes(self) -> dict[str, int]:
        """Trainable parameters per group (``method``, ``head`` and each trained extra)."""
        return {name: sum(p.numel() for p in ps) for name, ps in self.groups.items()}

    @property
    def name(self) -> str:
        return self.spec.name

    def analytic_params(self) -> int:
        """Closed-form count of the parameters the method updates (head excluded)."""
        return sum(self.site_params(s) for s in self.sites) + sum(self.ffn_params(f) for f in self.ffn_sites) + self.global_params

    def analytic_breakdown(self, text_len: int, image_tokens: int, lengths: dict[str, int]) -> dict[str, int]:
        """Additional MACs per site (and ``input`` for global parts).

        ``lengths``: tokens per stream as the backbone sees them (input prompts included).
        """
        out = {s.name: self.site_macs(s, lengths[s.stream], lengths[s.key_stream]) for s in self.sites}
        out.update({f.name: self.ffn_macs(lengths[f.stream]) for f in self.ffn_sites})
        extra = self.global_macs(text_len, image_tokens)
        if extra:
            out["input"] = extra
        return out


SITE_KINDS: dict[str, tuple[str, ...]] = {"all": ("self", "cross"), "self": ("self",), "cross": ("cross",)}


def resolve_layout(spec: MethodSpec, backbone: nn.Module) -> MethodSpec:
    """Fill the layout knobs left unset (``sites``, ``project_queries``, ``train_scale``) from the backbone's released layout for
    this method (``backbone.method_layouts``), then from the generic default (all sites, queries projected)."""
    layout = {**{"sites": "all", "project_queries": True, "train_scale": True}, **getattr(backbone, "method_layouts", {}).get(spec.name, {})}
    return spec.model_copy(update={k: v for k, v in layout.items() if getattr(spec, k) is None})


def prepare(
    model: TaskModel, spec: MethodSpec, allowed: tuple[str, ...] = ("self", "cross")
) -> tuple[MethodSpec, list[int], list[AttentionSite]]:
    """Freeze the backbone, keep the head trainable, check the backbone-dependent bounds, pick sites.

    Returns the spec with its layout resolved for this backbone, the chosen layers and the sites of the
    allowed kinds that ``spec.sites`` selects in them.
    """
    backbone = model.backbone
    spec = resolve_layout(spec, backbone)
    for p in backbone.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    for knob in spec.entry.config.bounded_by_hidden:
        value = getattr(spec, knob)
        if value is not None and value > backbone.hidden_size:
            raise UserError(
                f"{knob} {value} is above the hidden size {backbone.hidden_size} of this backbone: "
                f"use a {knob} between 1 and {backbone.hidden_size}."
            )
    all_sites = backbone.attention_sites()
    available = sorted({s.kind for s in all_sites})
    if spec.sites != "all" and spec.sites not in available:
        raise UserError(
            f"sites={spec.sites}: this backbone has no {spec.sites}-attention sites (it has {', '.join(available)} "
            f"attention only). Use sites=all{''.join(f' or sites={k}' for k in available)}."
        )
    kinds = tuple(k for k in SITE_KINDS[spec.sites] if k in allowed)
    layers = resolve_layers(backbone.num_layers, spec.depth, spec.placement, spec.layers)
    return spec, layers, select_sites(all_sites, layers, kinds)


def resolve_extras(spec: MethodSpec) -> tuple[str, ...]:
    """The backbone extras a spec trains: its ``train_extras``, else its method config's ``default_extras`` (the
    authors' set; none for methods whose definition leaves the rest of the backbone alone: a linear probe reads
    frozen features, and full fine-tuning already trains every backbone part)."""
    if spec.train_extras is not None:
        return tuple(dict.fromkeys(spec.train_extras))
    return tuple(spec.entry.config.default_extras)


def train_extras(model: TaskModel, extras: tuple[str, ...]) -> tuple[str, ...]:
    """Unfreeze the named backbone extras; ``cls_token`` adds the learnable [CLS] replacement, started from the
    embedding of ``model.cls_token_id``."""
    backbone = model.backbone
    parts = backbone.extra_modules()
    for name in extras:
        if name == "cls_token":
            token = nn.Parameter(backbone.cls_token_init(model.cls_token_id).detach().clone())
            model.extras["cls_token"] = token
            backbone.set_cls_token(token)
            continue
        for module in parts[name]:
            for p in module.parameters():
                p.requires_grad_(True)
    model.trained_extras = extras
    return extras


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
