"""The toy backbone of the registry tests: a 2-layer single-stream backbone defined outside apt_ray, which registers
itself (family ``toy``) and its presets (``toy-2l``, profiled on the meta device, and ``toy-2l-cpu``) on import.

Test modules import it as ``tests.toy_backbone`` (one module, so it registers once per session)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from apt_ray.methods.sites import AttentionSite, FFNSite, SiteAttention
from apt_ray.models.attention import site_attention
from apt_ray.models.output import BackboneOutput
from apt_ray.models.registry import Preset, register_backbone, register_preset

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
