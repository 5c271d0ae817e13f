"""ViLT backbone: transformers' ``ViltModel`` with its attention modules wrapped as sites."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import ViltConfig

from apt_ray.methods.sites import AttentionSite, FFNSite, SiteAttention
from apt_ray.models.attention import site_attention
from apt_ray.models.output import BackboneOutput, with_image_token_types
from apt_ray.models.registry import TINY_VOCAB, Preset, register_backbone, register_preset

if TYPE_CHECKING:  # transformers' modeling code is imported when a model is built, not when presets are looked up
    from transformers import ViltModel
    from transformers.models.vilt.modeling_vilt import ViltAttention


def vilt_b32_config(vocab_size: int | None = None, pad_token_id: int | None = None) -> ViltConfig:
    """ViLT-B/32 (BERT-base width, 12 layers, patch 32); 40 text positions."""
    # 40 text tokens; a 320x640 image at patch 32 gives exactly the paper's 200 patches.
    return ViltConfig(
        vocab_size=vocab_size or 30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, image_size=384, patch_size=32, max_position_embeddings=40, max_image_length=-1,
    )


def tiny_vilt_config(vocab_size: int | None = None, pad_token_id: int | None = None) -> ViltConfig:
    """CPU-sized ViLT: width 128, 4 layers, patch 8, 24 text positions, no dropout."""
    return ViltConfig(
        vocab_size=vocab_size or TINY_VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=256, image_size=64, patch_size=8, max_position_embeddings=24, max_image_length=-1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


class ViltSiteAttention(SiteAttention):
    """Drop-in for ``ViltAttention`` reusing its Linear layers (state-dict keys unchanged)."""

    def __init__(self, original: ViltAttention, num_heads: int, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.attention = original.attention  # query / key / value / dropout
        self.output = original.output  # dense / dropout
        self.num_heads = num_heads
        self._norm = (norm,)  # the layer's layernorm_before, owned by the layer (a tuple keeps it out of the state dict)

    def prompt_norm(self) -> nn.Module:
        return self._norm[0]

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        a = self.attention
        return a.query, a.key, a.value, self.output.dense

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False, **_: object):
        out = site_attention(
            self, *self.projections(), hidden_states, hidden_states, self.num_heads,
            mask=attention_mask, dropout_p=self.attention.dropout.p if self.training else 0.0,
        )
        return (self.output.dropout(out),)


@register_backbone("vilt", model_type="vilt", processor="vilt", tokenizer="bert-base-uncased")
class ViltBackbone(nn.Module):
    """Single-stream ViLT: text tokens, image CLS and patches share one transformer.

    Every layer has one self-attention site on the joint stream.
    """

    family = "vilt"
    config_class = ViltConfig
    method_layouts: dict[str, dict] = {}  # the generic layouts (all sites, queries projected) are ViLT's released ones

    def __init__(self, config: ViltConfig, vilt: ViltModel | None = None) -> None:
        super().__init__()
        self.config = config
        if vilt is None:
            from transformers import ViltModel

            vilt = ViltModel(config, add_pooling_layer=True)
        self.vilt = vilt
        for layer in self.vilt.encoder.layer:
            if not isinstance(layer.attention, ViltSiteAttention):
                layer.attention = ViltSiteAttention(layer.attention, config.num_attention_heads, layer.layernorm_before)
        self._image_prompts: tuple[nn.Parameter, ...] = ()  # a tuple, so the method (not the backbone) owns it
        self._cls_token: tuple[nn.Parameter, ...] = ()  # likewise owned by the model's extras
        self.vilt.embeddings.register_forward_hook(self._append_image_prompts)
        self.vilt.embeddings.text_embeddings.register_forward_hook(self._replace_cls)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path) -> "ViltBackbone":
        from transformers import ViltModel
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar per load is noise in every trial's log
        try:
            vilt = ViltModel.from_pretrained(str(path_or_id), add_pooling_layer=True)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        return cls(vilt.config, vilt)

    def save_pretrained(self, path: str | Path) -> None:
        self.vilt.save_pretrained(str(path))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def attention_sites(self) -> list[AttentionSite]:
        c = self.config
        return [
            AttentionSite(f"layer{i}.joint.self", i, "joint", "self", layer.attention, c.hidden_size, c.num_attention_heads, "joint")
            for i, layer in enumerate(self.vilt.encoder.layer)
        ]

    def ffn_sites(self) -> list[FFNSite]:
        return [FFNSite(f"layer{i}.joint.ffn", i, "joint", layer.output.dense) for i, layer in enumerate(self.vilt.encoder.layer)]

    def stream_lengths(self, text_len: int, image_tokens: int) -> dict[str, int]:
        """Tokens per stream for the given text length and image tokens (patches + CLS)."""
        return {"joint": text_len + image_tokens + self.num_image_prompts}

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def pad_token_id(self) -> int | None:
        """The padding id the text embeddings were trained with (BERT: 0)."""
        return getattr(self.config, "pad_token_id", None)

    def image_encoder_layers(self) -> nn.ModuleList:
        """The layers that carry the image tokens (ViLT's joint encoder): where deep visual prompts go."""
        return self.vilt.encoder.layer

    @property
    def image_patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def input_prompt_dim(self) -> int:
        """Width of the tokens :meth:`set_image_prompts` appends."""
        return self.config.hidden_size

    def analytic_macs(self, text_len: int, image_tokens: int, image_prompts: int = 0) -> int:
        """Closed-form multiply-adds of one forward pass (matmuls and the patch convolution)."""
        c = self.config
        d, ps = c.hidden_size, c.patch_size
        n = text_len + image_tokens + image_prompts
        layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * c.intermediate_size
        return (image_tokens - 1) * 3 * ps * ps * d + c.num_hidden_layers * layer + d * d

    @property
    def num_image_prompts(self) -> int:
        return self._image_prompts[0].shape[0] if self._image_prompts else 0

    def set_image_prompts(self, prompts: nn.Parameter | None) -> None:
        """Learnable tokens appended to the input sequence (E2VPT visual prompts)."""
        self._image_prompts = () if prompts is None else (prompts,)

    def extra_modules(self) -> dict[str, list[nn.Module]]:
        """Backbone parts the APT authors train with every method: the pooler, and the token-type embeddings
        (the modality embedding and BERT's own text token-type embedding both match their name filter)."""
        e = self.vilt.embeddings
        return {"pooler": [self.vilt.pooler], "token_type": [e.token_type_embeddings, e.text_embeddings.token_type_embeddings]}

    @torch.no_grad()
    def cls_token_init(self, token_id: int) -> torch.Tensor:
        """The text embedding of ``token_id`` at position 0 (word + position + type, LayerNorm): the start value
        of the learnable [CLS] replacement, as the authors' ``token4classifier``."""
        emb = self.vilt.embeddings.text_embeddings
        ids = torch.tensor([[token_id]], device=emb.word_embeddings.weight.device)
        was = emb.training
        emb.eval()
        out = emb(input_ids=ids)[0, 0]
        emb.train(was)
        return out

    def set_cls_token(self, token: nn.Parameter | None) -> None:
        """A learnable (hidden,) vector that replaces the first text token's embedding (None: no replacement)."""
        self._cls_token = () if token is None else (token,)

    def _replace_cls(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self._cls_token:
            return output
        token = self._cls_token[0].to(output.dtype).expand(output.shape[0], 1, -1)
        return torch.cat([token, output[:, 1:]], dim=1)

    def _append_image_prompts(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        if not self._image_prompts:
            return output
        embeddings, masks = output
        b = embeddings.shape[0]
        p = self._image_prompts[0].to(embeddings.dtype).unsqueeze(0).expand(b, -1, -1)
        ones = torch.ones(b, p.shape[1], dtype=masks.dtype, device=masks.device)
        return torch.cat([embeddings, p], dim=1), torch.cat([masks, ones], dim=1)

    @property
    def image_token_types(self) -> int:
        """How many image token types the modality embedding holds (1, or 2 once grown for image pairs)."""
        return self.vilt.embeddings.token_type_embeddings.num_embeddings - 1

    def grow_image_token_types(self, count: int = 2) -> None:
        """Give the modality embedding ``count`` image token types (ids 1..count), the new rows copied from the
        image row 1, as ViLT's NLVR2 head does for its two images; a table that large already is left alone."""
        emb = self.vilt.embeddings
        emb.token_type_embeddings = with_image_token_types(emb.token_type_embeddings, count)
        self.config.modality_type_vocab_size = emb.token_type_embeddings.num_embeddings

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
               image_token_type: int = 1) -> BackboneOutput:
        """Per-token text and image states plus pooled features; ``image_token_type``: the image tokens' type id
        (1; an image pair's second image uses 2, see :meth:`grow_image_token_types`)."""
        out = self.vilt(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, pixel_mask=pixel_mask,
                        image_token_type_idx=image_token_type)
        seq = out.last_hidden_state
        n_text = input_ids.shape[1]
        return BackboneOutput(seq[:, :n_text], seq[:, n_text:], out.pooler_output)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                image_token_type: int = 1) -> torch.Tensor:
        """Pooled multimodal features (B, pooled_size)."""
        return self.encode(input_ids, attention_mask, pixel_values, pixel_mask, image_token_type).pooled

    @property
    def pooled_size(self) -> int:
        return self.config.hidden_size


register_preset(Preset(
    "vilt-b32", "vilt", 40, (320, 640), 32, vilt_b32_config,
    "ViLT-B/32 at the paper's VQA shapes (40 text + 200 patches + CLS); images: shorter side 384, longer at most 640",
    processor_size=384,
))
# ViLT's patch sampling (pixel-mask dependent) does not run on the meta device: its profile runs on the CPU.
register_preset(Preset("tiny-vilt", "vilt", 24, (64, 64), 8, tiny_vilt_config, "CPU-sized ViLT for the embedded default",
                       self_pretrained=True))
