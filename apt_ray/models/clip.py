"""CLIP backbone: transformers' ``CLIPModel`` with the attention modules of its encoders wrapped as sites.

The sites are the self-attention modules of the vision encoder (stream ``image``); those of the text encoder
(stream ``text``) join them only after :meth:`ClipBackbone.set_text_sites` (the classification task does so for
``text_sites=true`` with the zero-shot classifier, where the text side feeds the logits). Both encoders are
pre-norm, so a site's query-side input is the output of its layer's ``layer_norm1``.

The backbone's pooled features are the vision encoder's ``pooler_output`` (the [CLS] state after
``post_layernorm``), what CLIP's linear probe reads; the zero-shot classifier projects them with
``visual_projection`` and compares them with the class prompts' text embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import CLIPConfig

from apt_ray.errors import UserError
from apt_ray.methods.sites import AttentionSite, FFNSite, SiteAttention
from apt_ray.models.attention import site_attention
from apt_ray.models.output import BackboneOutput
from apt_ray.models.registry import TINY_VOCAB, Preset, register_backbone, register_preset

if TYPE_CHECKING:  # transformers' modeling code is imported when a model is built, not when presets are looked up
    from transformers import CLIPModel
    from transformers.models.clip.modeling_clip import CLIPAttention

TINY_TEXT_LEN = 40  # the longest synthetic caption (4 objects) is 37 tokens with [CLS] and [SEP]


def clip_vit_b16_config(vocab_size: int | None = None, pad_token_id: int | None = None) -> CLIPConfig:
    """openai/clip-vit-base-patch16: ViT-B/16 at 224 px (12 layers, width 768) and a 12-layer, 512-wide text
    encoder over 77 tokens; 512-d joint embedding."""
    text = dict(vocab_size=vocab_size or 49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)


def tiny_clip_config(vocab_size: int | None = None, pad_token_id: int | None = None) -> CLIPConfig:
    """CPU-sized CLIP: width 64, 4 layers on each side, patch 8 on 64 px images, 40 text positions, no dropout.
    Text pooling reads the [SEP] position of the synthetic WordLevel tokenizer ([PAD]=0, [CLS]=2, [SEP]=3)."""
    text = dict(vocab_size=vocab_size or TINY_VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=TINY_TEXT_LEN, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, pad_token_id=pad_token_id or 0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=64,
                  patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


class ClipSiteAttention(SiteAttention):
    """Drop-in for ``CLIPAttention`` reusing its Linear layers (state-dict keys unchanged)."""

    def __init__(self, original: CLIPAttention, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = original.q_proj, original.k_proj, original.v_proj, original.out_proj
        self.num_heads = original.num_heads
        self.dropout = float(original.dropout)
        self._norm = (norm,)  # the layer's layer_norm1, owned by the layer (a tuple keeps it out of the state dict)

    def prompt_norm(self) -> nn.Module:
        return self._norm[0]

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        return self.q_proj, self.k_proj, self.v_proj, self.out_proj

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, is_causal: bool = False,
                **_: object) -> tuple[torch.Tensor, None]:
        mask = attention_mask
        if mask is None and is_causal:  # the text encoder leaves causality to the attention kernel when unpadded
            n = hidden_states.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool, device=hidden_states.device).tril()
        out = site_attention(self, *self.projections(), hidden_states, hidden_states, self.num_heads, mask=mask,
                             dropout_p=self.dropout if self.training else 0.0)
        return out, None


def _wrap_layers(layers: nn.ModuleList) -> None:
    for layer in layers:
        if not isinstance(layer.self_attn, ClipSiteAttention):
            layer.self_attn = ClipSiteAttention(layer.self_attn, layer.layer_norm1)


@register_backbone("clip", model_type="clip", processor="meter", tokenizer="openai/clip-vit-base-patch16")
class ClipBackbone(nn.Module):
    """Dual-encoder CLIP. The image path (:meth:`image_features`) is what the classification task reads; the
    text path (:meth:`text_embeds`) serves the zero-shot classifier and contrastive pretraining."""

    family = "clip"
    config_class = CLIPConfig
    method_layouts: dict[str, dict] = {}
    pretraining = "itc"  # apt_ray.train.pretrain: image-text contrast only (CLIP's own objective)
    pretrain_steps = 200  # ITC steps of the tiny preset's self-pretraining (batch 64: about 6 passes over 2000 captions)
    base_model_prefix = ""  # read by peft (LoRA) on models whose config has a model_type

    def __init__(self, config: CLIPConfig, clip: CLIPModel | None = None) -> None:
        super().__init__()
        if clip is None:
            from transformers import CLIPModel

            clip = CLIPModel(config)
        self.config = clip.config
        self.clip = clip
        _wrap_layers(clip.vision_model.encoder.layers)
        _wrap_layers(clip.text_model.encoder.layers)
        self.text_sites = False
        self._image_prompts: tuple[nn.Parameter, ...] = ()  # a tuple, so the method (not the backbone) owns it
        self._cls_token: tuple[nn.Parameter, ...] = ()  # likewise owned by the model's extras

    # ----------------------------------------------------------------- weights

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path) -> "ClipBackbone":
        """A ``CLIPModel`` directory written by ``save_pretrained`` (ours or transformers'), or a hub id."""
        from transformers import CLIPModel
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            clip = CLIPModel.from_pretrained(str(path_or_id))
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        return cls(clip.config, clip)

    def save_pretrained(self, path: str | Path) -> None:
        self.clip.save_pretrained(str(path))

    # ----------------------------------------------------------------- shapes

    @property
    def hidden_size(self) -> int:
        """The vision encoder's width (the image sites')."""
        return int(self.config.vision_config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Vision encoder layers (with text sites: the deeper of the two encoders)."""
        layers = self.config.vision_config.num_hidden_layers
        return max(layers, self.config.text_config.num_hidden_layers) if self.text_sites else layers

    @property
    def pooled_size(self) -> int:
        return self.hidden_size

    @property
    def vocab_size(self) -> int:
        return int(self.config.text_config.vocab_size)

    @property
    def pad_token_id(self) -> int | None:
        """None: CLIP's text encoder is causal and pools at the end-of-text token, so padding ids never matter."""
        return None

    # ----------------------------------------------------------------- sites

    def set_text_sites(self, enabled: bool) -> None:
        """List the text encoder's attention modules as sites too (set before a method is applied)."""
        self.text_sites = bool(enabled)

    def _encoders(self) -> list[tuple[str, nn.Module, object]]:
        out = [("image", self.clip.vision_model.encoder, self.config.vision_config)]
        if self.text_sites:
            out.append(("text", self.clip.text_model.encoder, self.config.text_config))
        return out

    def attention_sites(self) -> list[AttentionSite]:
        """Per layer, the image site, then (with text sites) the text site of the same index."""
        sites = []
        for stream, encoder, cfg in self._encoders():
            for i, layer in enumerate(encoder.layers):
                sites.append(AttentionSite(f"layer{i}.{stream}.self", i, stream, "self", layer.self_attn,
                                           cfg.hidden_size, cfg.num_attention_heads, stream))
        return sorted(sites, key=lambda s: s.layer)

    def ffn_sites(self) -> list[FFNSite]:
        sites = [FFNSite(f"layer{i}.{stream}.ffn", i, stream, layer.mlp.fc2)
                 for stream, encoder, _ in self._encoders() for i, layer in enumerate(encoder.layers)]
        return sorted(sites, key=lambda s: s.layer)

    def extra_modules(self) -> dict[str, list[nn.Module]]:
        """The image pooler (``post_layernorm``) and the visual projection; CLIP has no token-type embeddings."""
        return {"pooler": [self.clip.vision_model.post_layernorm, self.clip.visual_projection], "token_type": []}

    # ----------------------------------------------------------------- cost

    def stream_lengths(self, text_len: int, image_tokens: int) -> dict[str, int]:
        return {"image": image_tokens + self.num_image_prompts, "text": text_len}

    def analytic_macs(self, text_len: int, image_tokens: int, image_prompts: int = 0) -> int:
        """Closed-form multiply-adds of the image path (patch convolution and encoder); with ``text_len > 0`` also
        one text of that length through the text encoder and both projections (a CLIPModel forward)."""
        v, t = self.config.vision_config, self.config.text_config

        def layer(n: int, d: int, ff: int) -> int:
            return 4 * n * d * d + 2 * n * n * d + 2 * n * d * ff

        n = image_tokens + image_prompts
        macs = (image_tokens - 1) * 3 * v.patch_size ** 2 * v.hidden_size
        macs += v.num_hidden_layers * layer(n, v.hidden_size, v.intermediate_size)
        if text_len > 0:
            proj = self.config.projection_dim
            macs += t.num_hidden_layers * layer(text_len, t.hidden_size, t.intermediate_size)
            macs += (v.hidden_size + t.hidden_size) * proj
        return macs

    # ----------------------------------------------------------------- input prompts and the [CLS] replacement

    @property
    def input_prompt_dim(self) -> int:
        return self.hidden_size

    @property
    def num_image_prompts(self) -> int:
        return self._image_prompts[0].shape[0] if self._image_prompts else 0

    def set_image_prompts(self, prompts: nn.Parameter | None) -> None:
        """Learnable (p, vision width) tokens appended to the image tokens after the patch embedding."""
        self._image_prompts = () if prompts is None else (prompts,)

    def image_encoder_layers(self) -> nn.ModuleList:
        return self.clip.vision_model.encoder.layers

    @property
    def image_patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @torch.no_grad()
    def cls_token_init(self, token_id: int) -> torch.Tensor:
        """The image [CLS] input (class embedding + position 0): CLIP classifies from the image [CLS], so the
        learnable classifier token replaces that one (``token_id`` names a text token and is not used)."""
        e = self.clip.vision_model.embeddings
        return e.class_embedding + e.position_embedding.weight[0]

    def set_cls_token(self, token: nn.Parameter | None) -> None:
        """A learnable (hidden,) vector replacing the image [CLS] input (None: none)."""
        self._cls_token = () if token is None else (token,)

    # ----------------------------------------------------------------- forward

    def image_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision encoder states (B, N, d) and pooled features (B, d), as ``CLIPVisionModel`` computes them, with
        the image prompts appended and the [CLS] replacement in place."""
        vm = self.clip.vision_model
        size = self.config.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise UserError(
                f"this CLIP backbone takes (B, 3, {size}, {size}) images, got pixel_values of shape "
                f"{tuple(pixel_values.shape)}: set image_size={size} (or use a checkpoint made for that size)."
            )
        h = vm.embeddings(pixel_values)
        if self._cls_token:
            h = torch.cat([self._cls_token[0].to(h.dtype).expand(h.shape[0], 1, -1), h[:, 1:]], dim=1)
        if self._image_prompts:
            h = torch.cat([h, self._image_prompts[0].to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)], dim=1)
        h = vm.encoder(inputs_embeds=vm.pre_layrnorm(h)).last_hidden_state
        return h, vm.post_layernorm(h[:, 0])

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled image features (B, pooled_size): what a linear head reads."""
        return self.image_states(pixel_values)[1]

    def image_embeds(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled image features -> CLIP's joint embedding space (not normalised)."""
        return self.clip.visual_projection(pooled)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Texts -> CLIP's joint embedding space (not normalised)."""
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
               pixel_mask: torch.Tensor | None = None) -> BackboneOutput:
        """Final text and image states and the pooled image features (two separate encoders: no fusion)."""
        text = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        states, pooled = self.image_states(pixel_values)
        return BackboneOutput(text, states, pooled)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled image features (B, pooled_size). CLIP fuses no text into them, so a task that feeds text
        (VQA, NLVR2) is refused rather than silently given image-only features."""
        if input_ids is not None or pixel_values is None:
            raise UserError(
                "the CLIP backbone has no joint image-text features (its encoders meet only in the contrastive "
                "similarity), so it cannot serve a task that feeds text and image together: use task=classification "
                "with a CLIP model, or a ViLT/METER model for this task."
            )
        return self.image_features(pixel_values)


register_preset(Preset(
    "clip-vit-b16", "clip", 77, (224, 224), 16, clip_vit_b16_config,
    "CLIP ViT-B/16 (openai/clip-vit-base-patch16's shapes): 224 px, 196 patches + CLS, 77 text tokens",
    meta_profile=True,
))
register_preset(Preset("tiny-clip", "clip", TINY_TEXT_LEN, (64, 64), 8, tiny_clip_config,
                       "CPU-sized CLIP for the embedded default (image classification)",
                       self_pretrained=True, meta_profile=True))


class ZeroShotHead(nn.Module):
    """CLIP's zero-shot classifier: logits = exp(logit_scale) x cosine(image embedding, each class prompt's text
    embedding). The prompts go through the text encoder on every call, so text-encoder sites (and full
    fine-tuning) train the classifier's text side; the temperature starts from the backbone's and is the head's
    only parameter. The backbone is held by reference (a tuple): it is not part of the head."""

    def __init__(self, backbone: ClipBackbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        super().__init__()
        self._backbone = (backbone,)
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)
        self.logit_scale = nn.Parameter(backbone.logit_scale().detach().clone())

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        backbone = self._backbone[0]
        image = nn.functional.normalize(backbone.image_embeds(pooled), dim=-1)
        text = nn.functional.normalize(backbone.text_embeds(self.input_ids, self.attention_mask), dim=-1)
        return self.logit_scale.exp() * image @ text.T
