"""What a backbone provides: the members :class:`~apt_ray.models.vqa.VQAModel`, the methods, the profiler,
the training loop and pretraining use. A backbone is also a ``torch.nn.Module`` (parameters, hooks, ``train()``).

ViLT (:class:`~apt_ray.models.vilt.ViltBackbone`) and METER (:class:`~apt_ray.models.meter.MeterBackbone`)
implement it; a new backbone implements it and registers with
:func:`~apt_ray.models.registry.register_backbone` (see that module).

Optional, read with ``getattr``: ``unimodal_cls(input_ids, attention_mask, pixel_values) -> (text_cls, image_cls)``,
the two encoders' [CLS] states, for image-text contrastive pretraining of two-stream backbones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from apt_ray.methods.sites import AttentionSite, FFNSite
    from apt_ray.models.output import BackboneOutput


@runtime_checkable
class Backbone(Protocol):
    """A vision-language encoder that methods attach to through its attention and FFN sites."""

    # --------------------------------------------------------------- identity and shapes

    config: Any
    """Its config (a transformers ``PretrainedConfig``): saved with the weights, and what a trial rebuilds a
    checkpoint's shapes from (:func:`apt_ray.models.presets.checkpoint_config`)."""

    method_layouts: ClassVar[dict[str, dict[str, Any]]]
    """Per method name, layout knobs the backbone's released code uses where a spec leaves them unset
    (``sites``, ``project_queries``, ``train_scale``); ``{}`` for the generic defaults."""

    @property
    def hidden_size(self) -> int:
        """Width of the prompt-able layers (the sites' hidden size); sizes the VQA head and rank bounds."""

    @property
    def num_layers(self) -> int:
        """Number of prompt-able layers: what ``depth`` / ``placement`` / ``layers`` index."""

    @property
    def pooled_size(self) -> int:
        """Width of :meth:`forward`'s pooled features (the VQA head's input)."""

    @property
    def vocab_size(self) -> int:
        """Rows of the text embedding table (a tokenizer with more ids is refused)."""

    @property
    def pad_token_id(self) -> int | None:
        """The padding id the text embeddings were trained with (None: any)."""

    # --------------------------------------------------------------- sites (where methods attach)

    def attention_sites(self) -> list[AttentionSite]:
        """Every attention module (a :class:`~apt_ray.methods.sites.SiteAttention`), in layer order, with its
        layer, stream, kind (self / cross) and key stream."""

    def ffn_sites(self) -> list[FFNSite]:
        """The output projection of every feed-forward block (where adapters attach)."""

    def extra_modules(self) -> dict[str, list[nn.Module]]:
        """Backbone parts trained besides the method by name: ``pooler`` and ``token_type`` (the APT authors' set)."""

    # --------------------------------------------------------------- cost

    def stream_lengths(self, text_len: int, image_tokens: int) -> dict[str, int]:
        """Tokens per stream (the sites' ``stream`` / ``key_stream`` names) for ``text_len`` text tokens and
        ``image_tokens`` image tokens (patches + CLS), image prompts included."""

    def analytic_macs(self, text_len: int, image_tokens: int, image_prompts: int = 0) -> int:
        """Closed-form multiply-adds of one forward pass (without methods), with ``image_prompts`` extra image
        tokens: what input-level prompts cost (kv_prompt's visual prompts)."""

    # --------------------------------------------------------------- input prompts and the [CLS] replacement

    @property
    def input_prompt_dim(self) -> int:
        """Width of the tokens :meth:`set_image_prompts` appends."""

    def set_image_prompts(self, prompts: nn.Parameter | None) -> None:
        """Learnable (p, input_prompt_dim) tokens appended to the image tokens at the input (None: none). The
        backbone only holds a reference: the method owns the parameter."""

    def image_encoder_layers(self) -> nn.ModuleList:
        """The layers the image tokens pass through, where deep visual prompts replace the last p tokens at each
        layer's input (a forward pre-hook on each)."""

    @property
    def image_patch_size(self) -> int:
        """Patch size of the image embedding (scales the visual prompts' init)."""

    def cls_token_init(self, token_id: int) -> torch.Tensor:
        """(hidden_size,) start value of the learnable [CLS] replacement: the embedding of ``token_id``."""

    def set_cls_token(self, token: nn.Parameter | None) -> None:
        """A learnable (hidden_size,) vector replacing the first text token at the fusion input (None: none)."""

    # --------------------------------------------------------------- forward

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
               pixel_mask: torch.Tensor | None = None) -> BackboneOutput:
        """Final text states, image states and pooled features (pretraining's heads read all three)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled multimodal features (B, pooled_size): what the VQA head reads."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.__call__``: runs :meth:`forward` with the methods' hooks."""

    # --------------------------------------------------------------- weights

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` (with the registered ``model_type``) and the weights to a directory."""

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Backbone:
        """Load a directory written by :meth:`save_pretrained` (or, where supported, a hub id)."""
