"""The VQA task: soft-target answer classification, scored with the VQA accuracy (``val_vqa_score``).

Wraps the VQA code of :mod:`apt_ray.data` (loaders, answer vocabulary, :func:`~apt_ray.data.metrics.vqa_score_sum`)
and :mod:`apt_ray.models.heads` (:class:`~apt_ray.models.heads.VQAHead`, :func:`~apt_ray.models.heads.vqa_loss`).
Importing this module imports no torch: the task's methods import what they use.

Runs and study files written before tasks had a registry name the score ``val_vqa_score`` only:
:data:`METRIC_ALIASES` maps that name to ``val_score``, so they still read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from apt_ray.tasks.base import MODEL_INPUTS, SCORE_KEY
from apt_ray.tasks.registry import register_task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from apt_ray.data.build import DataBundle
    from apt_ray.data.spec import DataSpec

VQA_SCORE = "val_vqa_score"  # VQA accuracy in percent (0-100), the task's own metric and its score
METRIC_ALIASES: dict[str, str] = {VQA_SCORE: SCORE_KEY}  # the name those runs logged and those studies optimised


@register_task("vqa")
class VQATask:
    """Answer classification over the train split's top answers: the ViLT/METER MLP head on the pooled features,
    binary cross-entropy on soft targets, and the VQA accuracy (each question earns the soft target of its argmax
    answer) as the score."""

    score = VQA_SCORE
    score_label = "validation VQA score"
    eval_keys = ("score_sum", "count")
    batch_keys = MODEL_INPUTS
    metric_aliases = METRIC_ALIASES

    def build_data(self, spec: DataSpec) -> DataBundle:
        from apt_ray.data.build import build_data

        return build_data(spec)

    def make_head(self, backbone: nn.Module, data: DataBundle) -> nn.Module:
        from apt_ray.models.heads import VQAHead

        return VQAHead(backbone.pooled_size, 2 * backbone.hidden_size, data.num_answers)

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from apt_ray.models.heads import vqa_loss

        return vqa_loss(logits, batch["labels"])

    def eval_batch(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        from apt_ray.data.metrics import vqa_score_sum

        total, count = vqa_score_sum(logits.float(), batch["labels"])
        return {"score_sum": total, "count": count}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {VQA_SCORE: 100.0 * sums["score_sum"] / max(sums["count"], 1)}

    def head_width(self, data: DataBundle) -> int:
        return data.num_answers

    def head_width_for(self, cfg: Any) -> int:
        return cfg.answer_top_k  # the answer vocabulary's size (at most; a small train split may have fewer)

    def result_facts(self, data: DataBundle) -> dict[str, Any]:
        return {"majority_baseline": data.majority_baseline}
