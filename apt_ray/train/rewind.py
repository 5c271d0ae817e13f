"""The pruning phase of a trial whose method prunes (``prune_keep < 1``), between the loop's two runs of epochs.

1. The first phase trains all ``num_prompts`` prompts per site for ``epochs`` epochs (or ``max_steps`` steps).
2. Scoring: one pass over the training set in eval mode with soft masks of ones on the prompt rows; each token's (or
   segment's) importance is the mean of ``|dL/dm|`` over the batches (:mod:`apt_ray.methods.pruning`). No optimiser
   step is taken.
3. The cut: each site keeps its ``k`` best prompts, with the values they were trained to; the parameters become
   k-row tensors, so the checkpoint, the updated-parameter count and the measured cost shrink with them.
4. Rewind: a fresh optimiser and schedule (the recipe's warm-up and decay over the new phase) retrain the kept
   prompts, the head and the extras for ``rewind_epochs`` epochs (default: ``epochs``); epochs keep counting on.

The trainer's ``pruned`` record (the epoch and step of the cut and the kept rows per site) goes into every
checkpoint's meta, so a run resumed in the middle of the rewind cuts its fresh model the same way before loading
the weights, and continues where it stopped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from apt_ray.methods.configs.pruning import prunes
from apt_ray.methods.pruning import importance_scores, prune, row_counts, select
from apt_ray.train.recipes import get_recipe
from apt_ray.train.schedule import build_optimizer, warmup_then_decay

if TYPE_CHECKING:
    from apt_ray.config import TrainConfig
    from apt_ray.train.loop import Trainer

log = logging.getLogger("apt_ray.train")


def rewind_epochs(cfg: "TrainConfig") -> int:
    """Epochs of the rewind phase: ``rewind_epochs``, else as many as the first phase."""
    return int(cfg.rewind_epochs or cfg.epochs)


def due(trainer: "Trainer") -> bool:
    """Whether the first phase of a pruning trial has just ended (and the cut is not made yet)."""
    return (prunes(trainer.cfg) and trainer.pruned is None
            and (trainer.epoch >= trainer.cfg.epochs or trainer.global_step >= trainer.total_steps))


def last_epoch(trainer: "Trainer") -> int:
    """The epoch count the trial trains to: ``epochs``, and after the cut the rewind's epochs beyond it."""
    if trainer.pruned is None:
        return trainer.cfg.epochs
    return trainer.pruned["epoch"] + rewind_epochs(trainer.cfg)


def scores(trainer: "Trainer") -> dict[str, torch.Tensor]:
    """Mean ``|dL/dm|`` per token (or segment) of every prunable site, over this rank's training batches and then
    over the ranks."""
    cfg, model, keys = trainer.cfg, trainer.model, trainer.task.batch_keys
    segments = cfg.prune_segments if cfg.prune_mode == "segment" else 1

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(trainer.device) for k, v in batch.items()}
        with trainer.autocast:
            logits = model(*[batch.get(k) for k in keys])
        return trainer.task.loss(logits, batch)

    model.eval()
    loader = trainer.data.train_loader
    loader.set_epoch(trainer.epoch)
    totals, count = importance_scores(model, loader, loss_of, cfg.prune_mode, segments)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flat = torch.cat([*totals.values(), torch.tensor([float(count)], dtype=torch.float64)]).to(trainer.device)
        torch.distributed.all_reduce(flat)
        parts = flat.cpu().split([t.numel() for t in totals.values()] + [1])
        totals, count = dict(zip(totals, parts[:-1])), int(parts[-1].item())
    return {name: total / max(1, count) for name, total in totals.items()}


def prune_and_rewind(trainer: "Trainer") -> None:
    """Score, cut each site to its best prompts, and start the rewind phase."""
    cfg = trainer.cfg
    sites = scores(trainer)
    kept = select(sites, cfg.prune_keep, row_counts(trainer.model) if cfg.prune_mode == "segment" else None)
    record = {"epoch": trainer.epoch, "global_step": trainer.global_step, "kept": kept,
              "scores": {name: [round(float(v), 8) for v in s] for name, s in sites.items()}}
    start_rewind(trainer, record)
    sizes = sorted({len(v) for v in kept.values()})
    log.info("pruned %d sites to %s prompts each (prune_keep=%g, %s-wise); rewinding for %d epochs",
             len(kept), "/".join(map(str, sizes)), cfg.prune_keep, cfg.prune_mode, rewind_epochs(cfg))


def start_rewind(trainer: "Trainer", record: dict[str, Any]) -> None:
    """Cut the trainer's model to ``record["kept"]`` and give it the rewind phase's optimiser, schedule and step
    budget (also what a resume inside the rewind does before it loads the checkpoint)."""
    cfg = trainer.cfg
    prune(trainer.model, record["kept"])
    trainer.pruned = record
    applied = trainer.applied
    applied.groups = trainer.model.trainable_groups(applied.extras)
    trainer.optimizer = build_optimizer(trainer.model, applied.groups, cfg.group_lrs(), cfg.weight_decay, cfg.adam_betas,
                                        get_recipe(cfg.recipe).decay_norm_and_bias)
    steps = rewind_epochs(cfg) * trainer.steps_per_epoch
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    trainer.total_steps = record["global_step"] + steps
    trainer.scheduler = warmup_then_decay(trainer.optimizer, int(cfg.warmup_ratio * steps), steps, cfg.schedule)
    if trainer.session.world_size > 1:
        device = trainer.device
        trainer.net = nn.parallel.DistributedDataParallel(trainer.model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        trainer.net = trainer.model
