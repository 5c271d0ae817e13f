"""The CLIP backbone: outputs equal to transformers' CLIPModel on the same weights, sites, costs, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apt_ray import methods
from apt_ray.cli import main as apt_ray_main
from apt_ray.errors import UserError
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.clip import ClipBackbone, ZeroShotHead, tiny_clip_config
from apt_ray.models.presets import build_backbone
from apt_ray.models.task_model import TaskModel
from apt_ray.profile.cost import closed_form_cost, measure_macs, profile


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[2, 11, 12, 13, 3, 0, 0], [2, 20, 21, 22, 23, 24, 3]])
    return ids, (ids != 0).long(), torch.randn(2, 3, 64, 64, generator=g)


def _reference(backbone: ClipBackbone):
    """A plain transformers CLIPModel holding the backbone's weights."""
    from transformers import CLIPModel

    ref = CLIPModel(tiny_clip_config())
    ref.load_state_dict(backbone.clip.state_dict())
    return ref.eval()


def test_wrapped_clip_equals_transformers_clipmodel() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("tiny-clip").eval()
    ref = _reference(backbone)
    ids, mask, pixels = _inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        got = backbone.clip(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        image = backbone.image_embeds(backbone.image_features(pixels))
        text = backbone.text_embeds(ids, mask)
    for a, b in ((got.image_embeds, want.image_embeds), (got.text_embeds, want.text_embeds),
                 (got.logits_per_image, want.logits_per_image),
                 (torch.nn.functional.normalize(image, dim=-1), want.image_embeds),
                 (torch.nn.functional.normalize(text, dim=-1), want.text_embeds)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("method", ["apt", "deep_prompt"])
def test_zeroed_method_parameters_against_clipvisionmodel(method: str) -> None:
    """With every method parameter at zero, APT adds nothing (S = relu(X 0) = 0, scale exp(0) = 1): the image path
    equals transformers' CLIPVisionModel to 1e-6. Zero deep prompts still join the softmax (their keys are W_k's
    bias), so that output moves: the comparison can tell the two apart."""
    torch.manual_seed(0)
    backbone = build_backbone("tiny-clip").eval()
    ref = _reference(backbone)
    model = TaskModel(backbone, torch.nn.Linear(backbone.pooled_size, 3))
    methods.apply(model, MethodSpec(name=method, num_prompts=2, rank=2, train_extras=[]))
    with torch.no_grad():
        for p in model.method_parameters():
            p.zero_()
        pixels = _inputs()[2]
        want = ref.vision_model(pixel_values=pixels).pooler_output
        got = backbone.image_features(pixels)
    if method == "apt":
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
    else:
        assert not torch.allclose(got, want, atol=1e-4)


def test_sites_image_only_by_default_and_text_on_request() -> None:
    backbone = build_backbone("tiny-clip")
    sites = backbone.attention_sites()
    assert [s.stream for s in sites] == ["image"] * 4 and {s.kind for s in sites} == {"self"}
    assert all(s.module.prompt_norm() is layer.layer_norm1
               for s, layer in zip(sites, backbone.clip.vision_model.encoder.layers))
    backbone.set_text_sites(True)
    assert [s.stream for s in backbone.attention_sites()] == ["image", "text"] * 4
    assert len(backbone.ffn_sites()) == 8


def test_text_sites_train_the_zero_shot_classifier() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("tiny-clip")
    backbone.set_text_sites(True)
    ids, mask, pixels = _inputs()
    head = ZeroShotHead(backbone, ids, mask)
    model = TaskModel(backbone, head, features=lambda b, px: b.image_features(px))
    applied = methods.apply(model, MethodSpec(name="apt", num_prompts=2, rank=2))
    loss = torch.nn.functional.cross_entropy(model(pixels), torch.tensor([0, 1]))
    loss.backward()
    text_sites = [s for s in applied.sites if s.stream == "text"]
    assert len(text_sites) == 4
    for site in text_sites:
        grads = [p.grad for p in site.module.site_methods.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert head.logit_scale.grad is not None  # the head's own parameter trains too
    assert not any(p.requires_grad for n, p in backbone.clip.text_model.named_parameters() if ".site_methods." not in n)


def test_base_cost_equals_analytic_macs() -> None:
    backbone = build_backbone("tiny-clip")
    pixels = torch.randn(1, 3, 64, 64)
    measured, _ = measure_macs(_ImagePath(backbone), {"pixel_values": pixels})
    assert measured == backbone.analytic_macs(0, 65)
    ids = torch.tensor([[2] + [9] * 10 + [3]])
    measured_both, _ = measure_macs(_DualPath(backbone), {"input_ids": ids, "pixel_values": pixels})
    assert measured_both == backbone.analytic_macs(12, 65)


class _ImagePath(torch.nn.Module):
    def __init__(self, backbone: ClipBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.image_features(pixel_values)


class _DualPath(_ImagePath):
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.backbone.image_embeds(self.backbone.image_features(pixel_values))
        return image, self.backbone.text_embeds(input_ids)


@pytest.mark.parametrize("spec", [
    MethodSpec(name="apt", num_prompts=8, rank=4),
    MethodSpec(name="deep_prompt", num_prompts=8),
    MethodSpec(name="lora", rank=4),
    MethodSpec(name="adapter", rank=8),
    MethodSpec(name="apt", num_prompts=4, rank=2, depth=2, placement="top"),
], ids=["apt", "deep_prompt", "lora", "adapter", "apt-top2"])
def test_profile_measured_equals_closed_form(spec: MethodSpec) -> None:
    prof = profile("tiny-clip", spec, image_hw=(64, 64), task="classification", num_answers=24)
    assert prof.sites == (spec.depth or 4)
    assert prof.measured_additional_gmacs == pytest.approx(prof.analytic_additional_gmacs, rel=1e-9, abs=1e-15)
    for site in prof.per_site:
        assert site["stream"] == "image" and site["query_tokens"] == 65
        assert site["measured_gmacs"] == pytest.approx(site["analytic_gmacs"], rel=1e-9, abs=1e-15)
    assert prof.updated_params == prof.analytic_updated_params
    backbone = build_backbone("tiny-clip")
    head_macs = backbone.pooled_size * 24
    assert round(prof.base_gmacs * 1e9) == backbone.analytic_macs(0, 65) + head_macs
    cost = closed_form_cost("tiny-clip", spec, 40, (64, 64), task="classification")
    assert cost.additional_gmacs == pytest.approx(prof.analytic_additional_gmacs)
    assert cost.updated_params == prof.analytic_updated_params


def test_profile_cli_on_tiny_clip(capsys: pytest.CaptureFixture[str]) -> None:
    code = apt_ray_main(["profile", "--model", "tiny-clip", "--task", "classification", "--method", "apt",
                         "--num-prompts", "8", "--rank", "4", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["task"] == "classification" and data["sites"] == 4
    assert data["measured_additional_gmacs"] == pytest.approx(data["analytic_additional_gmacs"], rel=1e-9)
    # APT per image site: 2 N p d + 2 p d r with N = 65 tokens, p = 8, d = 64, r = 4
    assert round(data["analytic_additional_gmacs"] * 1e9) == 4 * (2 * 65 * 8 * 64 + 2 * 8 * 64 * 4)


def test_checkpoint_directory_loads(tmp_path: Path) -> None:
    """A transformers CLIPModel directory (written here with save_pretrained) loads through checkpoint=DIR."""
    from transformers import CLIPModel

    torch.manual_seed(3)
    ref = CLIPModel(tiny_clip_config()).eval()
    ref.save_pretrained(tmp_path / "clip")
    backbone = build_backbone("tiny-clip", tmp_path / "clip").eval()
    pixels = _inputs()[2]
    with torch.no_grad():
        assert torch.allclose(backbone.image_features(pixels), ref.vision_model(pixel_values=pixels).pooler_output, atol=1e-6)
    (tmp_path / "vilt").mkdir()
    (tmp_path / "vilt" / "config.json").write_text(json.dumps({"model_type": "vilt"}))
    with pytest.raises(UserError, match="holds a 'vilt' model, not a clip backbone"):
        build_backbone("tiny-clip", tmp_path / "vilt")


def test_text_fed_to_clip_is_refused() -> None:
    backbone = build_backbone("tiny-clip")
    ids, mask, pixels = _inputs()
    with pytest.raises(UserError, match="no joint image-text features"):
        backbone(ids, mask, pixels)
