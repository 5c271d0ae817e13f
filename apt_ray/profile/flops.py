"""FLOPs profile of a model with a method: measured (torch's flop counter) and analytic.

Cost is reported in GMACs, one multiply-add = one FLOP as in the APT paper and
fvcore, so the flop counter's totals (2 per multiply-add) are halved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode
from transformers import PretrainedConfig

from apt_ray import methods
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.presets import build_backbone, get_preset
from apt_ray.models.vqa import VQAModel

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
    convention: str = "GMACs: one multiply-add = one FLOP (as the APT paper and fvcore)"

    def to_dict(self) -> dict:
        return asdict(self)


def measure_macs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, dict[str, int]]:
    """Multiply-adds of one inference forward pass, in total and per module path."""
    model.eval()
    with FlopCounterMode(display=False) as counter:  # no no_grad: its module tracker needs autograd
        model(**inputs)
    per_module = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() // 2, per_module


def dummy_inputs(vocab_size: int, text_len: int, image_hw: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, vocab_size, (1, text_len), generator=g),
        "attention_mask": torch.ones(1, text_len, dtype=torch.long),
        "pixel_values": torch.randn(1, 3, *image_hw, generator=g),
    }


def profile(
    model: str,
    method: MethodSpec,
    text_len: int | None = None,
    image_hw: tuple[int, int] | None = None,
    num_answers: int = VQAV2_ANSWERS,
    seed: int = 0,
    config: PretrainedConfig | None = None,
) -> Profile:
    """Build ``model`` (random weights: cost does not depend on them), count, apply ``method``, count again.

    ``config``: the backbone config actually trained (a checkpoint's), when it differs from the preset's.
    """
    preset = get_preset(model)
    text_len = text_len or preset.text_len
    image_hw = tuple(image_hw or preset.image_hw)
    image_tokens = (image_hw[0] // preset.patch_size) * (image_hw[1] // preset.patch_size) + 1
    torch.manual_seed(seed)
    # Counting needs shapes, not values: a preset whose forward runs on the meta device (METER) is counted there
    # (no memory, no compute); others (ViLT: its patch sampling is data-dependent) run on the CPU.
    device = torch.device("meta") if preset.meta_profile else torch.device("cpu")
    with device:
        vqa = VQAModel(build_backbone(model, config=config), num_answers)
        backbone = vqa.backbone
        inputs = {k: v.to(device) for k, v in dummy_inputs(backbone.vocab_size, text_len, image_hw, seed).items()}
        base, base_modules = measure_macs(vqa, inputs)
        applied = methods.apply(vqa, method)
        torch.manual_seed(seed)
        total, total_modules = measure_macs(vqa, inputs)

    lengths = backbone.stream_lengths(text_len, image_tokens)
    analytic = applied.analytic_breakdown(text_len, image_tokens, lengths)
    paths = {id(m): n for n, m in vqa.named_modules()}
    root = type(vqa).__name__
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
        head_params=head, trainable_groups=groups, per_site=per_site,
        layout={k: getattr(applied.spec, k) for k in ("sites", *LAYOUT_KNOBS.get(method.name, ()))} | {"train_extras": list(applied.extras)},
    )
