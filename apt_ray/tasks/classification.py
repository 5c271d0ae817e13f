"""Image classification (the APT paper's CLIP experiment): cross-entropy over classes, scored by top-1 accuracy.

The head reads the backbone's image-only path (``image_features``: CLIP's pooled image [CLS]): a linear layer
(``classifier=linear``, CLIP's linear probe) or CLIP's zero-shot classifier (``classifier=zero_shot``: cosine
between the image embedding and the text embeddings of one prompt per class, "a red circle"). With
``text_sites=true`` (zero-shot only) the methods also attach to the text encoder. Backbones without an
image-only path (ViLT, METER) are refused. Importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from apt_ray.errors import UserError
from apt_ray.tasks.registry import register_task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from apt_ray.data.classification import ClassificationData
    from apt_ray.data.spec import DataSpec

ACCURACY = "val_accuracy"  # top-1 accuracy in percent (0-100), the task's score


def require_image_path(backbone: Any) -> None:
    """UserError unless ``backbone`` can encode an image alone."""
    if not callable(getattr(backbone, "image_features", None)):
        family = getattr(backbone, "family", type(backbone).__name__)
        raise UserError(
            f"the classification task needs a backbone that encodes an image on its own, and {family} fuses text "
            "and image in every layer (it has no image-only path): use model=tiny-clip or clip-vit-b16 (or a CLIP "
            "checkpoint=...) for classification."
        )


def image_features(backbone: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The head's input: the backbone's pooled image features."""
    require_image_path(backbone)
    return backbone.image_features(pixel_values)


@register_task("classification")
class ClassificationTask:
    """Single-label image classification with a linear or zero-shot head; accuracy is the score."""

    score = ACCURACY
    score_label = "validation accuracy"
    eval_keys = ("correct", "count")
    batch_keys = ("pixel_values",)
    metric_aliases: dict[str, str] = {}
    default_head_width = 1000  # ImageNet-1k, CLIP's linear-probe benchmark
    features = staticmethod(image_features)

    def build_data(self, spec: DataSpec) -> ClassificationData:
        from apt_ray.data.classification import build_classification_data

        if spec.text_sites and spec.classifier != "zero_shot":
            raise UserError("text_sites=true puts method sites in CLIP's text encoder, which only the zero-shot "
                            "classifier runs: add classifier=zero_shot, or drop text_sites.")
        return build_classification_data(spec)

    def make_head(self, backbone: nn.Module, data: ClassificationData) -> nn.Module:
        from torch import nn

        require_image_path(backbone)
        if data.spec.classifier == "linear":
            return nn.Linear(backbone.pooled_size, data.num_classes)
        if not callable(getattr(backbone, "text_embeds", None)):
            raise UserError(f"classifier=zero_shot needs a backbone with a text encoder in CLIP's joint embedding "
                            f"space, which {backbone.family} lacks: use classifier=linear.")
        from apt_ray.data.collate import encode_texts
        from apt_ray.models.clip import ZeroShotHead

        backbone.set_text_sites(data.spec.text_sites)
        ids, mask, truncated = encode_texts(data.tokenizer, data.prompts, data.spec.max_text_len)
        if truncated:
            raise UserError(f"{truncated} class prompts are longer than max_text_len={data.spec.max_text_len} tokens: "
                            "raise max_text_len or shorten the class names.")
        return ZeroShotHead(backbone, ids, mask)

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from torch import nn

        return nn.functional.cross_entropy(logits.float(), batch["labels"])

    def eval_batch(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        from apt_ray.data.classification import accuracy_counts

        correct, count = accuracy_counts(logits, batch["labels"])
        return {"correct": correct, "count": count}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {ACCURACY: 100.0 * sums["correct"] / max(sums["count"], 1)}

    def head_width(self, data: ClassificationData) -> int:
        return data.num_classes

    def head_width_for(self, cfg: Any) -> int:
        """The synthetic set's class count; for real data the count is known once it is read (the default until then)."""
        if cfg.data == "synthetic":
            from apt_ray.data.classification import CLASS_NAMES

            return len(CLASS_NAMES)
        return self.default_head_width

    def result_facts(self, data: ClassificationData) -> dict[str, Any]:
        return {"num_classes": data.num_classes, "chance_accuracy": 100.0 / data.num_classes,
                "majority_baseline": data.majority_baseline}

    def profile_inputs(self, backbone: nn.Module, text_len: int, image_hw: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
        """One image (no text: the linear head's path)."""
        import torch

        return {"pixel_values": torch.randn(1, 3, *image_hw, generator=torch.Generator().manual_seed(seed))}

    def profile_head(self, backbone: nn.Module, width: int) -> nn.Module:
        """The linear head (a zero-shot classifier's text side runs once per batch, not per example)."""
        from torch import nn

        require_image_path(backbone)
        return nn.Linear(backbone.pooled_size, width)
