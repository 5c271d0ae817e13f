"""The cost of a method on a backbone, in one place: the measured profile (torch's flop counter) beside the
methods' closed forms, and the closed form alone on a weightless model (what a FLOPs budget checks).

Cost is reported in GMACs, one multiply-add = one FLOP as in the APT paper and
fvcore, so the flop counter's totals (2 per multiply-add) are halved. The
budget of a sweep, its trials and ``apt-ray profile`` all call this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode
from transformers import PretrainedConfig

from apt_ray import methods
from apt_ray.methods.configs.pruning import pruned_spec, pruning_summary
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.presets import build_backbone, get_preset
from apt_ray.models.task_model import TaskModel
from apt_ray.tasks import get_task

if TYPE_CHECKING:
    from apt_ray.config import TrainConfig

VQAV2_ANSWERS = 3129
# The layout knobs a profile reports per method (besides its sites and trained extras).
LAYOUT_KNOBS = {"apt": ("train_scale",), "deep_prompt": ("project_queries",), "kv_prompt": ("shared_kv", "deep_visual_prompts")}  # the standard VQAv2 answer vocabulary (ViLT/METER heads)
_aten = torch.ops.aten


def _register_cpu_sdpa() -> None:
    """Teach the flop counter CPU flash attention (torch counts only the CUDA kernels)."""
    op = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    bwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if bwd is not None and bwd not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa()


@dataclass
class Profile:
    """The cost of one model + method at given input shapes (the ``apt-ray profile`` contract)."""

    model: str
    method: str
    num_prompts: int
    rank: int
    depth: int
    placement: str
    layers: list[int]
    sites: int
    text_len: int
    image_hw: list[int]
    stream_lengths: dict[str, int]
    base_gmacs: float
    total_gmacs: float
    additional_gmacs: float
    measured_additional_gmacs: float
    analytic_additional_gmacs: float
    updated_params: int
    analytic_updated_params: int
    trainable_params: int
    head_params: int
    trainable_groups: dict[str, int] = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    per_site: list[dict] = field(default_factory=list)
    pruning: dict = field(default_factory=dict)  # a pruned method: trained and kept prompts (it is counted with the kept)
    task: str = "vqa"
    backbone_passes: int = 1
    convention: str = "GMACs: one multiply-add = one FLOP (as the APT paper and fvcore)"

    @property
    def additional_pct_of_base(self) -> float | None:
        """The method's additional GMACs as a percentage of the base model's (None for a base of zero)."""
        return 100.0 * self.additional_gmacs / self.base_gmacs if self.base_gmacs else None

    def to_dict(self) -> dict:
        return {**asdict(self), "additional_pct_of_base": self.additional_pct_of_base}


def measure_macs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, dict[str, int]]:
    """Multiply-adds of one inference forward pass, in total and per module path."""
    model.eval()
    with FlopCounterMode(display=False) as counter:  # no no_grad: its module tracker needs autograd
        model(*inputs.values())
    per_module = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() // 2, per_module


def profile(
    model: str,
    method: MethodSpec,
    text_len: int | None = None,
    image_hw: tuple[int, int] | None = None,
    num_answers: int | None = None,
    seed: int = 0,
    config: PretrainedConfig | None = None,
    task: str = "vqa",
) -> Profile:
    """Build ``model`` (random weights: cost does not depend on them) with ``task``'s head, count one example,
    apply ``method``, count again.

    ``num_answers``: the head's width (default: the task's ``default_head_width``); ``config``: the backbone config
    actually trained (a checkpoint's), when it differs from the preset's.
    """
    pruning = pruning_summary(method)
    method = pruned_spec(method)  # a pruned method costs what the method with its kept prompts costs
    preset = get_preset(model)
    text_len = text_len or preset.text_len
    image_hw = tuple(image_hw or preset.image_hw)
    image_tokens = (image_hw[0] // preset.patch_size) * (image_hw[1] // preset.patch_size) + 1
    torch.manual_seed(seed)
    # Counting needs shapes, not values: a preset whose forward runs on the meta device (METER) is counted there
    # (no memory, no compute); others (ViLT: its patch sampling is data-dependent) run on the CPU.
    device = torch.device("meta") if preset.meta_profile else torch.device("cpu")
    with device:
        net = _task_model(model, config, task, num_answers)
        backbone = net.backbone
        inputs = {k: v.to(device) for k, v in get_task(task).profile_inputs(backbone, text_len, image_hw, seed).items()}
        base, base_modules = measure_macs(net, inputs)
        applied = methods.apply(net, method)
        torch.manual_seed(seed)
        total, total_modules = measure_macs(net, inputs)

    lengths = backbone.stream_lengths(text_len, image_tokens)
    passes = get_task(task).backbone_passes
    analytic = {k: passes * v for k, v in applied.analytic_breakdown(text_len, image_tokens, lengths).items()}
    paths = {id(m): n for n, m in net.named_modules()}
    root = type(net).__name__
    per_site = []
    for site in applied.sites:
        key = f"{root}.{paths[id(site.module)]}"
        per_site.append({
            "site": site.name, "layer": site.layer, "stream": site.stream, "kind": site.kind,
            "query_tokens": lengths[site.stream], "key_tokens": lengths[site.key_stream],
            "analytic_gmacs": analytic[site.name] / 1e9,
            "measured_gmacs": (total_modules.get(key, 0) - base_modules.get(key, 0)) / 1e9,
            "updated_params": applied.site_params(site),
        })
    groups = applied.group_sizes()
    updated, head = groups.get("method", 0), groups.get("head", 0)
    # What the method adds to the backbone: the heads are left out (the linear probe swaps in a smaller one).
    head_key = f"{root}.head"
    additional = (total - total_modules.get(head_key, 0)) - (base - base_modules.get(head_key, 0))
    return Profile(
        model=model, method=method.name, num_prompts=method.num_prompts, rank=method.rank,
        depth=len(applied.layers), placement=method.placement if method.layers is None else "explicit",
        layers=applied.layers, sites=len(applied.sites), text_len=text_len, image_hw=list(image_hw), stream_lengths=lengths,
        base_gmacs=base / 1e9, total_gmacs=total / 1e9, additional_gmacs=additional / 1e9,
        measured_additional_gmacs=additional / 1e9, analytic_additional_gmacs=sum(analytic.values()) / 1e9,
        updated_params=updated, analytic_updated_params=applied.analytic_params(), trainable_params=sum(groups.values()),
        head_params=head, trainable_groups=groups, per_site=per_site, pruning=pruning,
        layout={k: getattr(applied.spec, k) for k in ("sites", *LAYOUT_KNOBS.get(method.name, ()))} | {"train_extras": list(applied.extras)},
        task=task, backbone_passes=passes,
    )


def _task_model(model: str, config: PretrainedConfig | None, task: str, width: int | None) -> TaskModel:
    """``model``'s backbone with the head ``task`` profiles (``width`` outputs, default the task's own)."""
    spec = get_task(task)
    backbone = build_backbone(model, config=config)
    return TaskModel(backbone, spec.profile_head(backbone, width or spec.default_head_width), features=spec.features)


# -- closed forms on the meta device: no weights, no compute -----------------------------------------

@dataclass(frozen=True)
class ModelLimits:
    """What bounds a search over a backbone: layers that can carry a method, and the width."""

    model: str
    num_layers: int
    hidden_size: int


@lru_cache(maxsize=None)
def model_limits(model: str) -> ModelLimits:
    """Layer count and hidden size of a preset (``UserError`` for an unknown preset)."""
    get_preset(model)
    with torch.device("meta"):
        backbone = build_backbone(model)
    return ModelLimits(model, int(backbone.num_layers), int(backbone.hidden_size))


@dataclass(frozen=True)
class Cost:
    """Closed-form cost of one method configuration."""

    additional_gmacs: float
    updated_params: int
    sites: int

    def metrics(self) -> dict[str, float]:
        """The cost as a trial reports it (what a sweep optimises and records)."""
        return {"additional_gmacs": self.additional_gmacs, "updated_params": float(self.updated_params)}


def closed_form_cost(model: str, spec: MethodSpec, text_len: int, image_hw: tuple[int, int],
                     config: PretrainedConfig | None = None, task: str = "vqa") -> Cost:
    """Additional GMACs and updated parameters from the methods' analytic formulas (what :func:`profile` reports as
    ``analytic_*``), on a weightless model; ``config``: a checkpoint's backbone config when it differs from the
    preset's; ``task``: its backbone passes per example scale the GMACs."""
    config_json = None if config is None else config.to_json_string()
    return _closed_form(model, spec.model_dump_json(), text_len, (int(image_hw[0]), int(image_hw[1])), config_json, task)


@lru_cache(maxsize=4096)
def _closed_form(model: str, spec_json: str, text_len: int, image_hw: tuple[int, int], config_json: str | None,
                 task: str) -> Cost:
    spec = pruned_spec(MethodSpec.model_validate_json(spec_json))
    preset = get_preset(model)
    image_tokens = (image_hw[0] // preset.patch_size) * (image_hw[1] // preset.patch_size) + 1
    config = None if config_json is None else preset.backbone.config_from_dict(json.loads(config_json))
    with torch.device("meta"):
        net = _task_model(model, config, task, 2)
        applied = methods.apply(net, spec)
    lengths = net.backbone.stream_lengths(text_len, image_tokens)
    macs = get_task(task).backbone_passes * sum(applied.analytic_breakdown(text_len, image_tokens, lengths).values())
    return Cost(macs / 1e9, int(applied.analytic_params()), len(applied.sites))


def trial_cost(cfg: "TrainConfig") -> Cost:
    """Closed-form cost of a trial config at the shapes its data will have (a checkpoint's config wins)."""
    from apt_ray.models.presets import checkpoint_config

    return closed_form_cost(cfg.model, cfg.method_spec(), cfg.text_len, cfg.profile_shape()[0],
                            checkpoint_config(cfg.model, cfg.checkpoint), cfg.task)


def trial_profile(cfg: "TrainConfig") -> dict[str, Any]:
    """The measured profile of a trial config at its input shapes, JSON-ready (a sweep's ``flops_profile.json``)."""
    from apt_ray.models.presets import checkpoint_config

    width = get_task(cfg.task).head_width_for(cfg)
    prof = profile(cfg.model, cfg.method_spec(), text_len=cfg.text_len, image_hw=cfg.profile_shape()[0], num_answers=width,
                   config=checkpoint_config(cfg.model, cfg.checkpoint), task=cfg.task)
    data = prof.to_dict()
    data["num_answers_assumed"] = width  # the head width counted in base_gmacs (additional_* do not depend on it)
    return data
