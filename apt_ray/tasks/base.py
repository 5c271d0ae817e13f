"""The ``Task`` protocol: what the training loop asks of a task (light: no torch import at run time)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from apt_ray.data.spec import DataSpec

SCORE_KEY = "val_score"  # what the loop reports as every task's score, and what sweeps and analysis read
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "pixel_mask")  # a backbone's forward arguments, in order


@runtime_checkable
class TaskData(Protocol):
    """What a task's :meth:`Task.build_data` returns (VQA: :class:`apt_ray.data.build.DataBundle`).

    ``train_loader`` / ``val_loader``: this rank's shards; the train loader has ``set_epoch(epoch)`` and ``len()``
    (:class:`apt_ray.data.loaders.CountingLoader` does), and yields dicts of tensors holding at least the task's
    ``batch_keys``. ``tokenizer``: sizes a randomly initialised backbone's text side and gives the [CLS] id.
    ``spec``: the :class:`DataSpec` it was built from. ``image_processor_info()``: what the trial logs about images.
    A bundle may carry more (VQA: ``answers``, ``num_answers``, ``majority_baseline``) for the task's own use.
    """

    train_loader: Any
    val_loader: Any
    tokenizer: Any
    spec: DataSpec

    def image_processor_info(self) -> dict[str, Any]: ...


@runtime_checkable
class Task(Protocol):
    """A task, registered with :func:`apt_ray.tasks.registry.register_task`.

    Evaluation is a sum over the validation batches: :meth:`eval_batch` returns each batch's sums under
    ``eval_keys`` (the same keys on every rank, e.g. a score total and a count); the loop adds them up over the
    val loader, all-reduces them across ranks, and :meth:`metrics` turns the totals into the task's metrics, named
    ``val_*`` (they are logged per epoch); ``score`` names the metric that is the task's score, reported again as
    ``val_score`` (:data:`SCORE_KEY`). ``metric_aliases``: metric names of older versions -> the names that replace
    them (read when old runs or study files are loaded).
    """

    name: str
    score: str
    eval_keys: tuple[str, ...]
    batch_keys: tuple[str, ...]
    metric_aliases: Mapping[str, str]

    def build_data(self, spec: DataSpec) -> TaskData:
        """This rank's loaders (and whatever the head needs) for ``spec``."""

    def make_head(self, backbone: nn.Module, data: TaskData) -> nn.Module:
        """The head on the backbone's pooled features (``backbone.pooled_size`` wide) -> logits."""

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch (a scalar)."""

    def eval_batch(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> Mapping[str, float]:
        """This batch's evaluation sums, one per ``eval_keys``."""

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """The task's metrics (``val_*``) from the sums over the whole validation set (all ranks)."""

    def head_width(self, data: TaskData) -> int:
        """The head's output width (cost profiles count an MLP head of that width in ``base_gmacs``)."""

    def result_facts(self, data: TaskData) -> dict[str, Any]:
        """Facts about the data a trial's final result carries (VQA: ``majority_baseline``)."""
