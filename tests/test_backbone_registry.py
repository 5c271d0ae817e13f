"""The backbone registry: a backbone defined here, in the test, registers itself and its preset, and the profiler,
the methods and the CLI use it with nothing outside this file changed; name collisions and unknown names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

from apt_ray.cli import main
from apt_ray.errors import UserError
from apt_ray.methods.sites import AttentionSite, FFNSite, SiteAttention
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.attention import site_attention
from apt_ray.models.backbone import Backbone
from apt_ray.models.output import BackboneOutput
from apt_ray.models.presets import build_backbone, check_model_type, get_preset
from apt_ray.models.registry import Preset, RegistryError, get_backbone, preset_names, register_backbone, register_preset
from apt_ray.profile import profile

TOY = "toy-2l"


class ToyConfig(PretrainedConfig):
    model_type = "apt_ray_toy"

    def __init__(self, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                 intermediate_size: int = 64, image_size: int = 32, patch_size: int = 8, max_text_len: int = 16,
                 **kwargs) -> None:
        self.vocab_size, self.hidden_size, self.num_layers, self.num_heads = vocab_size, hidden_size, num_layers, num_heads
        self.intermediate_size, self.image_size, self.patch_size, self.max_text_len = intermediate_size, image_size, patch_size, max_text_len
        super().__init__(**kwargs)


class ToyAttention(SiteAttention):
    """Pre-norm self-attention over its own four Linear layers (the site methods run inside ``site_attention``)."""

    def __init__(self, d: int, heads: int, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.num_heads = heads
        self._norm = (norm,)  # owned by the layer

    def prompt_norm(self) -> nn.Module:
        return self._norm[0]

    def projections(self):
        return self.query, self.key, self.value, self.out

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return site_attention(self, *self.projections(), x, x, self.num_heads, mask=mask)


class ToyLayer(nn.Module):
    def __init__(self, c: ToyConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.hidden_size), nn.LayerNorm(c.hidden_size)
        self.attention = ToyAttention(c.hidden_size, c.num_heads, self.norm1)
        self.fc1, self.fc2 = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.attention(self.norm1(h), mask)
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(h))))


@register_backbone("toy", model_type="apt_ray_toy", processor="vilt", config_class=ToyConfig)
class ToyBackbone(nn.Module):
    """Single-stream: text tokens, image CLS, patches (and image prompts) through two pre-norm layers."""

    method_layouts: dict = {}
    base_model_prefix = ""  # read by peft (LoRA)

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        c = self.config = config
        d = c.hidden_size
        self.word = nn.Embedding(c.vocab_size, d)
        self.text_pos = nn.Embedding(c.max_text_len, d)
        self.patch = nn.Conv2d(3, d, c.patch_size, c.patch_size)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, d))
        self.token_type = nn.Embedding(2, d)
        self.layers = nn.ModuleList(ToyLayer(c) for _ in range(c.num_layers))
        self.pooler = nn.Linear(d, d)
        self._image_prompts: tuple[nn.Parameter, ...] = ()
        self._cls_token: tuple[nn.Parameter, ...] = ()

    # sizes
    hidden_size = property(lambda self: self.config.hidden_size)
    num_layers = property(lambda self: self.config.num_layers)
    pooled_size = property(lambda self: self.config.hidden_size)
    vocab_size = property(lambda self: self.config.vocab_size)
    pad_token_id = property(lambda self: None)
    input_prompt_dim = property(lambda self: self.config.hidden_size)
    image_patch_size = property(lambda self: self.config.patch_size)

    def attention_sites(self) -> list[AttentionSite]:
        c = self.config
        return [AttentionSite(f"layer{i}.joint.self", i, "joint", "self", layer.attention, c.hidden_size, c.num_heads, "joint")
                for i, layer in enumerate(self.layers)]

    def ffn_sites(self) -> list[FFNSite]:
        return [FFNSite(f"layer{i}.joint.ffn", i, "joint", layer.fc2) for i, layer in enumerate(self.layers)]

    def extra_modules(self) -> dict[str, list[nn.Module]]:
        return {"pooler": [self.pooler], "token_type": [self.token_type]}

    def stream_lengths(self, text_len: int, image_tokens: int) -> dict[str, int]:
        prompts = self._image_prompts[0].shape[0] if self._image_prompts else 0
        return {"joint": text_len + image_tokens + prompts}

    def analytic_macs(self, text_len: int, image_tokens: int, image_prompts: int = 0) -> int:
        c = self.config
        d, n = c.hidden_size, text_len + image_tokens + image_prompts
        layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * c.intermediate_size
        return (image_tokens - 1) * 3 * c.patch_size ** 2 * d + c.num_layers * layer + d * d

    def set_image_prompts(self, prompts: nn.Parameter | None) -> None:
        self._image_prompts = () if prompts is None else (prompts,)

    def image_encoder_layers(self) -> nn.ModuleList:
        return self.layers

    @torch.no_grad()
    def cls_token_init(self, token_id: int) -> torch.Tensor:
        return self.word.weight[token_id] + self.text_pos.weight[0]

    def set_cls_token(self, token: nn.Parameter | None) -> None:
        self._cls_token = () if token is None else (token,)

    def encode(self, input_ids, attention_mask, pixel_values, pixel_mask=None) -> BackboneOutput:
        b, nt = input_ids.shape
        x = self.word(input_ids) + self.text_pos(torch.arange(nt, device=input_ids.device))
        if self._cls_token:
            x = torch.cat([self._cls_token[0].to(x.dtype).expand(b, 1, -1), x[:, 1:]], dim=1)
        y = self.patch(pixel_values).flatten(2).transpose(1, 2)
        y = torch.cat([self.image_cls.expand(b, -1, -1), y], dim=1)
        if self._image_prompts:
            y = torch.cat([y, self._image_prompts[0].to(y.dtype).expand(b, -1, -1)], dim=1)
        zeros = torch.zeros(1, 1, dtype=torch.long, device=x.device)
        h = torch.cat([x + self.token_type(zeros), y + self.token_type(zeros + 1)], dim=1)
        keep = torch.cat([attention_mask.bool(), torch.ones(b, y.shape[1], dtype=torch.bool, device=h.device)], dim=1)
        mask = keep[:, None, None, :]
        for layer in self.layers:
            h = layer(h, mask)
        return BackboneOutput(h[:, :nt], h[:, nt:], torch.tanh(self.pooler(h[:, 0])))

    def forward(self, input_ids, attention_mask, pixel_values, pixel_mask=None) -> torch.Tensor:
        return self.encode(input_ids, attention_mask, pixel_values, pixel_mask).pooled

    def save_pretrained(self, path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(path))
        torch.save(self.state_dict(), Path(path) / "weights.pt")

    @classmethod
    def from_pretrained(cls, path) -> "ToyBackbone":
        model = cls(ToyConfig.from_pretrained(str(path)))
        model.load_state_dict(torch.load(Path(path) / "weights.pt"))
        return model


def toy_config(vocab_size: int | None, pad_token_id: int | None = None) -> ToyConfig:
    return ToyConfig(vocab_size=vocab_size or 64)


register_preset(Preset(TOY, "toy", 12, (32, 32), 8, toy_config, "a 2-layer backbone defined in a test",
                       self_pretrained=False, meta_profile=True))
# The same backbone profiled on the CPU (real tensors), as presets whose forward cannot run on the meta device are.
register_preset(Preset(f"{TOY}-cpu", "toy", 12, (32, 32), 8, toy_config, "the toy, profiled on the CPU"))

SITE_METHODS = ["apt", "deep_prompt", "kv_prompt", "lora", "adapter", "head_only", "linear_probe", "full"]


def test_the_toy_is_registered_and_implements_the_protocol():
    preset = get_preset(TOY)
    assert preset.family == "toy" and not preset.self_pretrained and preset.meta_profile
    assert preset.backbone.cls is ToyBackbone and preset.processor == "vilt"
    assert TOY in preset_names() and {"tiny-vilt", "tiny-meter"} <= set(preset_names())
    backbone = build_backbone(TOY)
    assert isinstance(backbone, ToyBackbone) and isinstance(backbone, Backbone)


def test_builtin_backbones_implement_the_protocol():
    for name in ("tiny-vilt", "tiny-meter"):
        assert isinstance(build_backbone(name), Backbone), name
    assert get_preset("tiny-vilt").self_pretrained and get_preset("tiny-meter").self_pretrained
    assert not get_preset("vilt-b32").self_pretrained and not get_preset("meter-clip16-roberta").self_pretrained
    assert get_preset("tiny-meter").meta_profile and not get_preset("tiny-vilt").meta_profile


@pytest.mark.parametrize("method", SITE_METHODS)
def test_profile_runs_on_the_toy_with_measured_equal_to_analytic(method):
    spec = MethodSpec(name=method, num_prompts=6, rank=4, num_visual_prompts=3 if method == "kv_prompt" else 0)
    prof = profile(TOY, spec)
    assert prof.model == TOY and prof.method == method
    assert prof.measured_additional_gmacs == pytest.approx(prof.analytic_additional_gmacs, rel=1e-9, abs=1e-12)
    assert prof.updated_params == prof.analytic_updated_params
    if method in ("apt", "deep_prompt", "kv_prompt", "lora", "adapter"):
        assert prof.sites == 2 and prof.additional_gmacs > 0
    if method == "kv_prompt":  # the visual prompts join the joint stream
        assert prof.stream_lengths == {"joint": 12 + 17 + 3}


def test_profile_on_the_cpu_matches_the_meta_device():
    spec = MethodSpec(name="kv_prompt", num_prompts=6, num_visual_prompts=3)
    on_meta, on_cpu = profile(TOY, spec), profile(f"{TOY}-cpu", spec)
    assert not get_preset(f"{TOY}-cpu").meta_profile
    assert on_cpu.measured_additional_gmacs == pytest.approx(on_cpu.analytic_additional_gmacs, rel=1e-9)
    assert on_cpu.total_gmacs == pytest.approx(on_meta.total_gmacs, rel=1e-9) and on_cpu.base_gmacs > 0


def test_cli_profiles_the_toy(capsys):
    assert main(["profile", "--model", TOY, "--method", "apt", "--num-prompts", "4", "--rank", "2", "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["model"] == TOY and prof["sites"] == 2
    assert math.isclose(prof["measured_additional_gmacs"], prof["analytic_additional_gmacs"], rel_tol=1e-9)


def test_toy_checkpoints_round_trip_and_are_type_checked(tmp_path):
    torch.manual_seed(0)
    model = build_backbone(TOY)
    model.save_pretrained(tmp_path / "toy")
    check_model_type(tmp_path / "toy", "toy")
    loaded = build_backbone(TOY, tmp_path / "toy")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(UserError, match="holds a 'apt_ray_toy' model, not a vilt backbone"):
        build_backbone("tiny-vilt", tmp_path / "toy")


def test_registering_a_name_twice_raises():
    with pytest.raises(RegistryError, match="backbone 'toy' is already registered"):
        register_backbone("toy", model_type="x", processor="vilt")(type("Other", (nn.Module,), {}))
    with pytest.raises(RegistryError, match="backbone 'vilt' is already registered"):
        register_backbone("vilt", model_type="x", processor="vilt")(type("Other", (nn.Module,), {}))
    with pytest.raises(RegistryError, match="preset 'tiny-meter' is already registered"):
        register_preset(Preset("tiny-meter", "toy", 12, (32, 32), 8, toy_config, "a clash"))
    with pytest.raises(RegistryError, match=f"preset '{TOY}' is already registered"):
        register_preset(Preset(TOY, "toy", 12, (32, 32), 8, toy_config, "a clash"))
    assert get_preset("tiny-meter").family == "meter" and get_backbone("toy").cls is ToyBackbone


def test_unknown_names_list_the_registered_ones_with_a_did_you_mean():
    with pytest.raises(UserError) as err:
        get_preset("tiny-vit")
    msg = str(err.value)
    assert "unknown model 'tiny-vit'" in msg and "did you mean 'tiny-vilt'" in msg
    for name in ("vilt-b32", "tiny-vilt", "meter-clip16-roberta", "tiny-meter", TOY):
        assert name in msg
    with pytest.raises(UserError, match="did you mean 'toy-2l'"):
        get_preset("toy-2")
    with pytest.raises(UserError) as err:
        get_preset("zzzzzz")
    assert "did you mean" not in str(err.value) and "choose one of" in str(err.value)
    with pytest.raises(UserError, match="unknown backbone 'meterr'.*did you mean 'meter'"):
        get_backbone("meterr")
