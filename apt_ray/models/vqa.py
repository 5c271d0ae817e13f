"""A backbone with the VQA head: the :class:`~apt_ray.models.task_model.TaskModel` of the VQA task, built from an
answer count (what the profiler, the step-cost benchmark and many tests construct)."""

from __future__ import annotations

import torch
from torch import nn

from apt_ray.models.heads import VQAHead
from apt_ray.models.task_model import TaskModel


class VQAModel(TaskModel):
    """``backbone`` + the ViLT/METER VQA head (:class:`VQAHead`) over ``num_answers`` answers; the same model the
    ``vqa`` task's head gives (:class:`apt_ray.tasks.vqa.VQATask`)."""

    def __init__(self, backbone: nn.Module, num_answers: int, cls_token_id: int = 0) -> None:
        super().__init__(backbone, VQAHead(backbone.pooled_size, 2 * backbone.hidden_size, num_answers), cls_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_ids, attention_mask, pixel_values, pixel_mask)
