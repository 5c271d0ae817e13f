"""A backbone with a task's head: the model every method is applied to, whatever the task."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from apt_ray.tasks.base import pooled_features


class TaskModel(nn.Module):
    """``backbone`` (ViLT, METER or a plug-in) + ``head`` (a task's, on the pooled features; see
    :meth:`apt_ray.tasks.base.Task.make_head`); ``method_modules`` holds a method's non-site parts and ``extras``
    the learnable backbone additions trained besides the method (the [CLS] replacement).

    ``cls_token_id``: the tokenizer's [CLS] / ``<s>`` id, the start value of that replacement. ``features``: the
    task's ``features(backbone, *inputs)`` (:class:`apt_ray.tasks.base.TaskDefaults`): what the head reads; one
    backbone pass by default.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, cls_token_id: int = 0,
                 features: Callable[..., torch.Tensor] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.features = features or pooled_features
        self.method_modules = nn.ModuleDict()
        self.extras = nn.ParameterDict()
        self.cls_token_id = cls_token_id

    def forward(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        """The head's logits for the task's ``batch_keys`` tensors, in that order."""
        return self.head(self.features(self.backbone, *inputs))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def trainable_groups(self, extras: tuple[str, ...] = ()) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group: ``head``, each of ``extras`` that holds any (``pooler``, ``token_type``:
        the backbone's :meth:`extra_modules`; ``cls_token``: ``self.extras``) and ``method``: everything else,
        what the method updates."""
        named: dict[str, list[nn.Parameter]] = {"head": list(self.head.parameters())}
        parts = {**self.backbone.extra_modules(), "cls_token": [self.extras]}
        for name in extras:
            named[name] = [p for m in parts[name] for p in m.parameters() if p.requires_grad]
        taken = {id(p) for ps in named.values() for p in ps}
        named["method"] = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        return {k: v for k, v in named.items() if v}

    def method_parameters(self) -> list[nn.Parameter]:
        """What the method updates: trainable parameters outside the head and the trained extras."""
        return self.trainable_groups(getattr(self, "trained_extras", ())).get("method", [])
