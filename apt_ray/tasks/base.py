"""The ``Task`` protocol: what the training loop asks of a task (light: no torch import at run time)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class EvalContext:
    """What a task's own :meth:`TaskDefaults.evaluate` gets from the loop: the device, the autocast context to run
    the model under, this rank and the world size, and ``all_sum`` (a list of floats summed over the ranks)."""

    device: Any
    autocast: Any
    rank: int
    world_size: int
    all_sum: Callable[[list[float]], list[float]]


def pooled_features(backbone: nn.Module, *inputs: torch.Tensor | None) -> torch.Tensor:
    """One backbone pass over the batch's inputs: its pooled features (what most heads read)."""
    return backbone(*inputs)


def text_image_inputs(vocab_size: int, text_len: int, image_hw: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """One random example of text and image at the given shapes, keyed by :data:`MODEL_INPUTS`' names."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, vocab_size, (1, text_len), generator=g),
        "attention_mask": torch.ones(1, text_len, dtype=torch.long),
        "pixel_values": torch.randn(1, 3, *image_hw, generator=g),
    }


class TaskDefaults:
    """The optional members of a task and their defaults: :func:`~apt_ray.tasks.registry.register_task` gives a
    registered class each one it does not define (a task may also inherit from this class).

    ``features(backbone, *inputs)``: the head's input from the batch's ``batch_keys`` tensors (a staticmethod; one
    pass by default; NLVR2 runs two). ``backbone_passes``: how many backbone passes one example costs (closed-form
    costs scale by it). ``profile_inputs(backbone, text_len, image_hw, seed)``: one example at the profile's shapes,
    keyed in ``batch_keys`` order. ``profile_head(backbone, width)``: the head a cost profile counts.
    ``score_label``: how figures name the score. ``default_head_width``: its width when the data is unknown (``apt-ray profile``);
    ``head_width_for(cfg)``: the width a trial config implies (a sweep's profile; default ``default_head_width``). ``evaluate(model, data,
    ctx)``: the task's own validation pass returning its metrics (None: the loop sums :meth:`Task.eval_batch`).
    """

    features = staticmethod(pooled_features)
    score_label: str | None = None  # how figures name the score (None: from the score metric's name)
    backbone_passes: int = 1
    default_head_width: int = 3129  # the VQAv2 answer vocabulary
    evaluate: Callable[..., dict[str, float]] | None = None

    def profile_inputs(self, backbone: nn.Module, text_len: int, image_hw: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
        return text_image_inputs(backbone.vocab_size, text_len, image_hw, seed)

    def head_width_for(self, cfg: Any) -> int:
        """The head's width a trial config implies before its data is read (a sweep's profile of it)."""
        return self.default_head_width

    def profile_head(self, backbone: nn.Module, width: int) -> nn.Module:
        """The ViLT/METER classifier form (an MLP to ``width`` outputs) on the pooled features of every pass side by
        side (override it when ``features`` combines the passes otherwise)."""
        from apt_ray.models.heads import VQAHead

        return VQAHead(self.backbone_passes * backbone.pooled_size, 2 * backbone.hidden_size, width)


OPTIONAL_MEMBERS = ("features", "score_label", "backbone_passes", "default_head_width", "evaluate", "profile_inputs",
                    "profile_head", "head_width_for")
