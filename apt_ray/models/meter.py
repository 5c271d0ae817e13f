"""METER backbone: CLIP vision encoder + RoBERTa text encoder + co-attention fusion.

The fusion part follows METER (Dou et al. 2022): each stream is projected to the
fusion width, tagged with a modality (token-type) embedding and passed through
``num_fusion_layers`` co-attention layers. Each layer of each stream is a post-norm
BERT block with self-attention, cross-attention to the other stream's states of the
previous layer, and a feed-forward block. Every fusion attention is a
:class:`~apt_ray.methods.sites.SiteAttention`, so methods can attach to it.

State-dict keys of the fusion part mirror METER's (``cross_modal_text_layers.N.
attention.self.query.weight``, ...), which keeps checkpoint conversion simple
(see :mod:`apt_ray.models.meter_convert`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, PretrainedConfig, RobertaConfig

from apt_ray.errors import UserError
from apt_ray.methods.sites import AttentionSite, FFNSite, SiteAttention
from apt_ray.models.attention import site_attention
from apt_ray.models.output import BackboneOutput, with_image_token_types
from apt_ray.models.registry import TINY_VOCAB, Preset, register_backbone, register_preset

# transformers' modeling code (CLIP, RoBERTa, BERT blocks) is imported when a model is built, not when the
# presets are looked up.

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_DROP_SUBCONFIG_KEYS = ("id2label", "label2id", "transformers_version", "_name_or_path", "architectures")


def _sub_dict(cfg: PretrainedConfig | dict[str, Any]) -> dict[str, Any]:
    """A sub-config as a JSON-friendly dict (fields that do not round-trip dropped)."""
    d = dict(cfg.to_dict() if isinstance(cfg, PretrainedConfig) else cfg)
    for key in _DROP_SUBCONFIG_KEYS:
        d.pop(key, None)
    return d


class MeterConfig(PretrainedConfig):
    """METER shapes: vision/text encoder configs (as dicts) plus the fusion settings.

    ``image_size`` overrides the vision config's image size; ``max_text_len`` is the
    text length the data pipeline pads to (it must fit the text encoder's positions).
    """

    model_type = "apt_ray_meter"

    def __init__(
        self,
        vision_config: dict[str, Any] | CLIPVisionConfig | None = None,
        text_config: dict[str, Any] | RobertaConfig | None = None,
        hidden_size: int = 768,
        num_fusion_layers: int = 6,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        image_size: int = 384,
        max_text_len: int = 50,
        **kwargs: Any,
    ) -> None:
        vision = _sub_dict(vision_config if vision_config is not None else CLIPVisionConfig())
        vision["image_size"] = image_size
        self.vision_config = vision
        self.text_config = _sub_dict(text_config if text_config is not None else RobertaConfig())
        self.hidden_size = hidden_size
        self.num_fusion_layers = num_fusion_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.image_size = image_size
        self.max_text_len = max_text_len
        super().__init__(**kwargs)

    @property
    def vision(self) -> CLIPVisionConfig:
        """The vision encoder's config object."""
        return CLIPVisionConfig.from_dict(self.vision_config)

    @property
    def text(self) -> RobertaConfig:
        """The text encoder's config object."""
        return RobertaConfig.from_dict(self.text_config)

    @property
    def num_image_tokens(self) -> int:
        """Patches + CLS produced by the vision encoder (without image prompts)."""
        return (self.image_size // int(self.vision_config["patch_size"])) ** 2 + 1

    def validate(self) -> None:
        """Raise :class:`UserError` when the shapes cannot work together."""
        v, t = self.vision_config, self.text_config
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"fusion hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.image_size % int(v["patch_size"]):
            problems.append(f"image_size {self.image_size} is not a multiple of the vision patch_size {v['patch_size']}")
        if self.num_fusion_layers < 1:
            problems.append(f"num_fusion_layers must be at least 1, got {self.num_fusion_layers}")
        pad = t.get("pad_token_id") or 0
        if self.max_text_len + pad + 1 > int(t["max_position_embeddings"]):
            problems.append(
                f"max_text_len {self.max_text_len} does not fit the text encoder's {t['max_position_embeddings']} "
                f"positions (RoBERTa positions start after pad_token_id {pad})"
            )
        if problems:
            raise UserError(
                "The METER config is inconsistent: " + "; ".join(problems)
                + ". Fix these fields of the model config (or use a preset: meter_clip16_roberta_config / tiny_meter_config)."
            )


def meter_clip16_roberta_config(image_size: int = 384, max_text_len: int = 50, vocab_size: int = 50265) -> MeterConfig:
    """Paper shapes: CLIP ViT-B/16 (as METER uses it: 11 of CLIP's 12 blocks), RoBERTa-base,
    6 co-attention layers of width 768 with 12 heads; 384x384 images give 576 patches + CLS."""
    vision = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=11, num_attention_heads=12,
        image_size=image_size, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        attention_dropout=0.0, projection_dim=512,
    )
    text = RobertaConfig(
        vocab_size=vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    return MeterConfig(
        vision_config=vision, text_config=text, hidden_size=768, num_fusion_layers=6, num_attention_heads=12,
        intermediate_size=3072, image_size=image_size, max_text_len=max_text_len,
    )


def tiny_meter_config(
    vocab_size: int = 1000,
    pad_token_id: int = 0,
    image_size: int = 64,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_fusion_layers: int = 4,
    max_text_len: int = 24,
) -> MeterConfig:
    """CPU-sized METER: 2-layer CLIP-style ViT and 2-layer RoBERTa (width ``hidden_size``),
    ``num_fusion_layers`` co-attention layers; 64x64 images at patch 8 give 64 patches + CLS.

    No dropout (as the tiny ViLT): on CPU, drawing dropout masks took over a third of a training step,
    and a backbone this small, pretrained this briefly, gains nothing from it."""
    heads = max(1, hidden_size // 16)
    vision = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=2, num_attention_heads=heads,
        image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=hidden_size,
    )
    text = RobertaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=4 * hidden_size, max_position_embeddings=max_text_len + pad_token_id + 2,
        type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=pad_token_id,
        bos_token_id=None, eos_token_id=None, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return MeterConfig(
        vision_config=vision, text_config=text, hidden_size=hidden_size, num_fusion_layers=num_fusion_layers,
        num_attention_heads=heads, intermediate_size=4 * hidden_size, image_size=image_size, max_text_len=max_text_len,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


class MeterQKV(nn.Module):
    """The query/key/value projections of one attention (keys ``self.query`` etc. as in METER)."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)


class MeterAttention(SiteAttention):
    """Post-norm BERT attention block and attention site: ``LayerNorm(x + Dropout(MHA(x, y) W_o))``.

    The site's query-side input ``X`` is the block input ``x`` (for cross-attention
    the query stream); keys and values come from ``y``.
    """

    def __init__(self, config: MeterConfig) -> None:
        from transformers.models.bert.modeling_bert import BertSelfOutput

        super().__init__()
        self.self = MeterQKV(config)
        self.output = BertSelfOutput(config)  # dense (W_o) / dropout / LayerNorm
        self.num_heads = config.num_attention_heads
        self.attention_dropout = config.attention_probs_dropout_prob

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """``(W_q, W_k, W_v, W_o)``, looked up per call so that wrapped layers (LoRA) are used."""
        s = self.self
        return s.query, s.key, s.value, self.output.dense

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        o = site_attention(
            self, *self.projections(), x, y, self.num_heads,
            mask=mask, dropout_p=self.attention_dropout if self.training else 0.0,
        )
        return self.output.LayerNorm(self.output.dropout(o) + x)


class MeterCrossLayer(nn.Module):
    """One co-attention layer of one stream: self-attention, cross-attention, FFN (METER's BertCrossLayer)."""

    def __init__(self, config: MeterConfig) -> None:
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        super().__init__()
        self.attention = MeterAttention(config)
        self.crossattention = MeterAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self, hidden: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None, other_mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.attention(hidden, hidden, mask)
        h = self.crossattention(h, other, other_mask)
        return self.output(self.intermediate(h), h)


class MeterPooler(nn.Module):
    """First token -> dense -> tanh."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(states[:, 0]))


def _key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) 0/1 padding mask -> bool (B, 1, 1, N) key mask (True = attend)."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


def _load_official_checkpoint(model: "MeterBackbone", path: Path) -> None:
    """An official METER ``.ckpt`` (PyTorch Lightning) into ``model`` (see :mod:`apt_ray.models.meter_convert`)."""
    from apt_ray.models.meter_convert import load_meter_checkpoint

    load_meter_checkpoint(model, path)


@register_backbone("meter", model_type="apt_ray_meter", processor="meter", tokenizer="roberta-base",
                   file_checkpoints={".ckpt": _load_official_checkpoint})
class MeterBackbone(nn.Module):
    """Two-stream METER: CLIP-ViT image tokens and RoBERTa text tokens fused by co-attention.

    Attention sites: per fusion layer, text self, text cross, image self, image cross.
    Building under ``with torch.device("meta"):`` is instant (no weights are allocated) and
    the forward runs on meta tensors too, e.g. for FLOP counting at the paper's shapes.
    """

    family = "meter"
    config_class = MeterConfig
    # The APT authors' released METER code: deep prompts join the keys and values of cross-attention only,
    # through W_k and W_v (no query projection); APT's output scale stays frozen.
    method_layouts = {"deep_prompt": {"sites": "cross", "project_queries": False}, "apt": {"train_scale": False}}
    base_model_prefix = ""  # read by peft (LoRA) on models whose config has a model_type

    def __init__(self, config: MeterConfig) -> None:
        from transformers import CLIPVisionModel, RobertaModel

        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        vision, text = config.vision, config.text
        self.vision_encoder = CLIPVisionModel(vision)
        self.text_encoder = RobertaModel(text, add_pooling_layer=False)
        self.cross_modal_text_transform = nn.Linear(text.hidden_size, d)
        self.cross_modal_image_transform = nn.Linear(vision.hidden_size, d)
        self.token_type_embeddings = nn.Embedding(2, d)
        self.cross_modal_text_layers = nn.ModuleList(MeterCrossLayer(config) for _ in range(config.num_fusion_layers))
        self.cross_modal_image_layers = nn.ModuleList(MeterCrossLayer(config) for _ in range(config.num_fusion_layers))
        self.cross_modal_text_pooler = MeterPooler(d)
        self.cross_modal_image_pooler = MeterPooler(d)
        for name, module in self.named_children():
            if name not in ("vision_encoder", "text_encoder"):
                module.apply(self._init_fusion)
        self._image_prompts: tuple[nn.Parameter, ...] = ()  # a tuple, so the method (not the backbone) owns it
        self._cls_token: tuple[nn.Parameter, ...] = ()  # likewise owned by the model's extras

    def _init_fusion(self, module: nn.Module) -> None:
        """BERT-style init of the fusion part (as METER initialises it)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------- saving

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (backbone weights only, no site methods)."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(out))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if ".site_methods." not in k}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "family": self.family})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MeterBackbone":
        """Load a directory written by :meth:`save_pretrained` (local only; no hub access)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        root = Path(path)
        cfg_file, weights = root / CONFIG_NAME, root / WEIGHTS_NAME
        if not root.is_dir() or not cfg_file.is_file() or not weights.is_file():
            raise UserError(
                f"'{root}' is not a saved METER backbone: it needs {CONFIG_NAME} and {WEIGHTS_NAME}. "
                "Pass a directory written by MeterBackbone.save_pretrained, or an official METER .ckpt file "
                "(loaded with apt_ray.models.meter_convert.load_meter_checkpoint)."
            )
        try:
            raw = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{cfg_file} is not valid JSON ({err}); re-save the backbone with save_pretrained.") from err
        if raw.get("model_type") != MeterConfig.model_type:
            raise UserError(
                f"{cfg_file} describes a '{raw.get('model_type')}' model, not a METER backbone "
                f"(model_type '{MeterConfig.model_type}'). Point the checkpoint at a METER directory, or pick the model family that matches it."
            )
        config = MeterConfig.from_pretrained(str(root))
        model = cls(config)
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{weights} could not be read ({err}); the file is corrupt or truncated: re-save the backbone.") from err
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if ".site_methods." not in k]
        if missing or result.unexpected_keys:
            raise UserError(
                f"{weights} does not match its config: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}. "
                "The directory was written by another model version; re-save it with MeterBackbone.save_pretrained."
            )
        return model

    # ------------------------------------------------------------- interface

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        """Number of fusion layers (the prompt-able layers)."""
        return self.config.num_fusion_layers

    @property
    def pooled_size(self) -> int:
        """Text and image poolers concatenated."""
        return 2 * self.config.hidden_size

    def image_encoder_layers(self) -> nn.ModuleList:
        """The CLIP vision encoder's layers: where deep visual prompts go."""
        return self.vision_encoder.encoder.layers

    @property
    def image_patch_size(self) -> int:
        return int(self.config.vision_config["patch_size"])

    @property
    def input_prompt_dim(self) -> int:
        """Width of the tokens :meth:`set_image_prompts` appends (the vision encoder's width)."""
        return int(self.config.vision_config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        """The text encoder's vocabulary size."""
        return int(self.config.text_config["vocab_size"])

    @property
    def pad_token_id(self) -> int | None:
        """The text encoder's padding id (RoBERTa: 1; it places position ids after it)."""
        return self.config.text_config.get("pad_token_id")

    def analytic_macs(self, text_len: int, image_tokens: int, image_prompts: int = 0) -> int:
        """Closed-form multiply-adds of one forward pass (matmuls, attention and the patch convolution)."""
        c, v, t = self.config, self.config.vision_config, self.config.text_config
        d, ff = c.hidden_size, c.intermediate_size
        nt, ni = text_len, image_tokens + image_prompts

        def encoder_layer(n: int, width: int, inter: int) -> int:
            return 4 * n * width * width + 2 * n * n * width + 2 * n * width * inter

        def fusion_stream(nq: int, nk: int) -> int:
            self_attn = 4 * nq * d * d + 2 * nq * nq * d
            cross = 2 * nq * d * d + 2 * nk * d * d + 2 * nq * nk * d
            return self_attn + cross + 2 * nq * d * ff

        wv, wt = int(v["hidden_size"]), int(t["hidden_size"])
        vision = (image_tokens - 1) * 3 * int(v["patch_size"]) ** 2 * wv
        vision += int(v["num_hidden_layers"]) * encoder_layer(ni, wv, int(v["intermediate_size"]))
        text = int(t["num_hidden_layers"]) * encoder_layer(nt, wt, int(t["intermediate_size"]))
        transforms = nt * wt * d + ni * wv * d
        fusion = c.num_fusion_layers * (fusion_stream(nt, ni) + fusion_stream(ni, nt))
        return vision + text + transforms + fusion + 2 * d * d

    def attention_sites(self) -> list[AttentionSite]:
        """Per fusion layer, in order: text self, text cross, image self, image cross."""
        c = self.config
        sites = []
        for i, (t, v) in enumerate(zip(self.cross_modal_text_layers, self.cross_modal_image_layers)):
            for stream, other, layer in (("text", "image", t), ("image", "text", v)):
                sites.append(AttentionSite(f"layer{i}.{stream}.self", i, stream, "self", layer.attention, c.hidden_size, c.num_attention_heads, stream))
                sites.append(AttentionSite(f"layer{i}.{stream}.cross", i, stream, "cross", layer.crossattention, c.hidden_size, c.num_attention_heads, other))
        return sites

    def ffn_sites(self) -> list[FFNSite]:
        """The FFN output projection of each stream in each fusion layer."""
        sites = []
        for i, (t, v) in enumerate(zip(self.cross_modal_text_layers, self.cross_modal_image_layers)):
            sites.append(FFNSite(f"layer{i}.text.ffn", i, "text", t.output.dense))
            sites.append(FFNSite(f"layer{i}.image.ffn", i, "image", v.output.dense))
        return sites

    def stream_lengths(self, text_len: int, image_tokens: int) -> dict[str, int]:
        """Tokens per stream for the given text length and image tokens (patches + CLS)."""
        return {"text": text_len, "image": image_tokens + self.num_image_prompts}

    @property
    def num_image_prompts(self) -> int:
        return self._image_prompts[0].shape[0] if self._image_prompts else 0

    def extra_modules(self) -> dict[str, list[nn.Module]]:
        """Backbone parts the APT authors train with every method: the two cross-modal poolers and the
        modality (token-type) embeddings of the fusion."""
        return {"pooler": [self.cross_modal_text_pooler, self.cross_modal_image_pooler], "token_type": [self.token_type_embeddings]}

    @torch.no_grad()
    def cls_token_init(self, token_id: int) -> torch.Tensor:
        """The text encoder's input embedding of ``token_id`` (RoBERTa: ``<s>`` = 0), the start value of the
        learnable replacement of the fused text stream's first token (the authors' ``token4classifier``). Mapped
        through the text transform only when the text width differs from the fusion width."""
        emb = self.text_encoder.embeddings
        ids = torch.tensor([[token_id]], device=emb.word_embeddings.weight.device)
        was = emb.training
        emb.eval()
        out = emb(input_ids=ids)
        emb.train(was)
        if out.shape[-1] != self.config.hidden_size:
            out = self.cross_modal_text_transform(out)
        return out[0, 0]

    def set_cls_token(self, token: nn.Parameter | None) -> None:
        """A learnable (hidden,) vector that replaces the first token of the text stream at the fusion input."""
        self._cls_token = () if token is None else (token,)

    def set_image_prompts(self, prompts: nn.Parameter | None) -> None:
        """Learnable (p, vision width) tokens appended to the image tokens after the patch embedding."""
        if prompts is not None and (prompts.dim() != 2 or prompts.shape[-1] != self.input_prompt_dim):
            raise UserError(
                f"image prompts must have shape (p, {self.input_prompt_dim}) for this METER backbone "
                f"(the vision encoder's width), got {tuple(prompts.shape)}."
            )
        self._image_prompts = () if prompts is None else (prompts,)

    # --------------------------------------------------------------- forward

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP vision encoder on all tokens (CLS, patches, image prompts), ``ln_post`` on every token as in METER."""
        v = self.vision_encoder
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise UserError(
                f"this METER backbone takes (B, 3, {size}, {size}) images, got pixel_values of shape "
                f"{tuple(pixel_values.shape)}; resize images to the model's image_size (or build the model with another image_size)."
            )
        h = v.embeddings(pixel_values, interpolate_pos_encoding=False)
        if self._image_prompts:
            p = self._image_prompts[0].to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
            h = torch.cat([h, p], dim=1)
        h = v.pre_layrnorm(h)
        h = v.encoder(inputs_embeds=h).last_hidden_state
        return v.post_layernorm(h)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """RoBERTa embeddings and layers with an additive padding mask (as METER runs them; no pooler).

        The mask is built here rather than by ``RobertaModel.forward`` so that no
        data-dependent shortcut runs: the forward also works on the meta device.
        """
        t = self.text_encoder
        pad = t.config.pad_token_id or 0
        if input_ids.shape[1] + pad + 1 > t.config.max_position_embeddings:
            raise UserError(
                f"text of {input_ids.shape[1]} tokens is longer than this METER text encoder takes "
                f"({t.config.max_position_embeddings - pad - 1}); truncate texts to max_text_len={self.config.max_text_len} "
                "(or build the model with a larger max_text_len)."
            )
        h = t.embeddings(input_ids=input_ids)
        additive = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        return t.encoder(h, attention_mask=additive).last_hidden_state

    @property
    def image_token_types(self) -> int:
        """How many image token types the token-type table holds (1, or 2 once grown for image pairs)."""
        return self.token_type_embeddings.num_embeddings - 1

    def grow_image_token_types(self, count: int = 2) -> None:
        """Give the token-type table ``count`` image types (ids 1..count), the new rows copied from the image row 1,
        as METER's NLVR2 head does for its two images; a table that large already is left alone."""
        self.token_type_embeddings = with_image_token_types(self.token_type_embeddings, count)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        image_token_type: int = 1,
    ) -> BackboneOutput:
        """Per-token text and image states plus pooled features; ``pixel_mask`` is ignored (no image padding);
        ``image_token_type``: the image tokens' type id (1; an image pair's second image uses 2, see
        :meth:`grow_image_token_types`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.cross_modal_text_transform(self.encode_text(input_ids, attention_mask))
        y = self.cross_modal_image_transform(self.encode_image(pixel_values))
        if self._cls_token:
            x = torch.cat([self._cls_token[0].to(x.dtype).expand(x.shape[0], 1, -1), x[:, 1:]], dim=1)
        zeros = torch.zeros(1, 1, dtype=torch.long, device=x.device)
        x = x + self.token_type_embeddings(zeros)
        y = y + self.token_type_embeddings(zeros + image_token_type)
        text_mask = _key_mask(attention_mask)
        for text_layer, image_layer in zip(self.cross_modal_text_layers, self.cross_modal_image_layers):
            x, y = text_layer(x, y, text_mask, None), image_layer(y, x, None, text_mask)
        pooled = torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], dim=-1)
        return BackboneOutput(x, y, pooled)

    def unimodal_cls(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text and image [CLS] states (B, hidden) of the two encoders alone, in the fusion's input space
        (after the cross-modal transforms): what image-text contrastive pretraining aligns."""
        x = self.cross_modal_text_transform(self.encode_text(input_ids, attention_mask))
        y = self.cross_modal_image_transform(self.encode_image(pixel_values))
        return x[:, 0], y[:, 0]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        image_token_type: int = 1,
    ) -> torch.Tensor:
        """Pooled multimodal features (B, 2 * hidden)."""
        return self.encode(input_ids, attention_mask, pixel_values, pixel_mask, image_token_type).pooled


def _meter_paper_config(vocab_size: int | None = None, pad_token_id: int | None = None) -> MeterConfig:
    return meter_clip16_roberta_config()


def _tiny_meter_config(vocab_size: int | None = None, pad_token_id: int | None = None) -> MeterConfig:
    return tiny_meter_config(vocab_size=vocab_size or TINY_VOCAB, pad_token_id=pad_token_id or 0)


# METER's forward has no data-dependent control flow: its profiles run on the meta device.
register_preset(Preset("meter-clip16-roberta", "meter", 50, (384, 384), 16, _meter_paper_config,
                       "METER (CLIP-ViT-B/16 + RoBERTa, 6 fusion layers), 50 text + 577 image tokens", meta_profile=True))
register_preset(Preset("tiny-meter", "meter", 24, (64, 64), 8, _tiny_meter_config, "CPU-sized METER for the embedded default",
                       self_pretrained=True, meta_profile=True))
