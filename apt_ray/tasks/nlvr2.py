"""The NLVR2 task: is a statement about two images true? Scored with the accuracy (``val_nlvr2_accuracy``).

As in ViLT and METER: the backbone runs once per image with the same statement, image 0's tokens carrying token type
1 and image 1's type 2 (the token-type table grown from 2 to 3 rows, the new row copied from row 1); the two pooled
features are concatenated and the ``nlvr2_classifier`` (Linear 2·pooled -> 2·hidden, LayerNorm, GELU, Linear -> 2)
gives two logits, trained with cross-entropy. Importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from apt_ray.tasks.base import text_image_inputs
from apt_ray.tasks.registry import register_task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from apt_ray.data.nlvr2 import NLVR2Bundle
    from apt_ray.data.spec import DataSpec

NLVR2_ACCURACY = "val_nlvr2_accuracy"  # percent of statements judged right
BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_mask", "pixel_values_1", "pixel_mask_1")


def pair_features(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                  pixel_mask: torch.Tensor | None, pixel_values_1: torch.Tensor, pixel_mask_1: torch.Tensor | None) -> torch.Tensor:
    """The statement with image 0 (token type 1) and with image 1 (token type 2): pooled features, concatenated."""
    import torch

    first = backbone(input_ids, attention_mask, pixel_values, pixel_mask, image_token_type=1)
    second = backbone(input_ids, attention_mask, pixel_values_1, pixel_mask_1, image_token_type=2)
    return torch.cat([first, second], dim=-1)


def pair_head(backbone: nn.Module) -> nn.Module:
    """The authors' ``nlvr2_classifier`` on two pooled features; grows the backbone's image token types to two."""
    from apt_ray.models.heads import VQAHead

    backbone.grow_image_token_types(2)
    return VQAHead(2 * backbone.pooled_size, 2 * backbone.hidden_size, 2)


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(statements whose argmax matches the label, statements)."""
    return float((logits.argmax(dim=-1) == labels).sum().item()), float(labels.numel())


@register_task("nlvr2")
class NLVR2Task:
    """Two images and a statement, answered true or false (see the module docstring)."""

    score = NLVR2_ACCURACY
    score_label = "validation NLVR2 accuracy"
    eval_keys = ("correct", "count")
    batch_keys = BATCH_KEYS
    metric_aliases: dict[str, str] = {}
    features = staticmethod(pair_features)
    backbone_passes = 2
    default_head_width = 2

    def build_data(self, spec: DataSpec) -> NLVR2Bundle:
        from apt_ray.data.nlvr2 import build_data

        return build_data(spec)

    def make_head(self, backbone: nn.Module, data: NLVR2Bundle) -> nn.Module:
        return pair_head(backbone)

    def profile_head(self, backbone: nn.Module, width: int) -> nn.Module:
        return pair_head(backbone)

    def profile_inputs(self, backbone: nn.Module, text_len: int, image_hw: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
        import torch

        one = text_image_inputs(backbone.vocab_size, text_len, image_hw, seed)
        other = text_image_inputs(backbone.vocab_size, text_len, image_hw, seed + 1)
        mask = torch.ones(1, *image_hw, dtype=torch.long)  # no padding: what an absent pixel mask means
        return {"input_ids": one["input_ids"], "attention_mask": one["attention_mask"], "pixel_values": one["pixel_values"],
                "pixel_mask": mask, "pixel_values_1": other["pixel_values"], "pixel_mask_1": mask.clone()}

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from torch.nn import functional as F

        return F.cross_entropy(logits.float(), batch["labels"])

    def eval_batch(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        correct, count = correct_count(logits, batch["labels"])
        return {"correct": correct, "count": count}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {NLVR2_ACCURACY: 100.0 * sums["correct"] / max(sums["count"], 1)}

    def head_width(self, data: NLVR2Bundle) -> int:
        return 2

    def result_facts(self, data: NLVR2Bundle) -> dict[str, Any]:
        return {"majority_baseline": data.majority_baseline}
