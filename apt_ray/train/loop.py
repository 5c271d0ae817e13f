"""``train_loop_per_worker(config)``: one trial, alone or as a Ray Train worker.

Builds data (with the backbone's own tokenizer and image processor), backbone,
method and optimiser from a flat config; trains with the recipe's AdamW groups,
schedule, clipping and precision (autocast on GPU); evaluates
the task's metrics every epoch (its score reported as ``val_score``); checkpoints trainable parameters, optimiser,
scheduler, RNG and data position; reports per-epoch metrics to its session.
Nothing here imports Ray: the Ray session is loaded only when Ray runs the loop.
"""

from __future__ import annotations

import logging
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from apt_ray import methods
from apt_ray.config import TrainConfig, build_train_config
from apt_ray.errors import UserError
from apt_ray.models.presets import build_backbone, get_preset
from apt_ray.models.task_model import TaskModel
from apt_ray.profile.cost import Profile, profile
from apt_ray.tasks import SCORE_KEY, get_task, read_metric
from apt_ray.tasks.base import EvalContext
from apt_ray.train import rewind
from apt_ray.train.checkpoint import load_checkpoint, read_meta, save_checkpoint
from apt_ray.train.recipes import get_recipe
from apt_ray.train.schedule import build_optimizer, warmup_then_decay
from apt_ray.train.session import LocalSession, Session

log = logging.getLogger("apt_ray.train")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Fault-injection tests set this: the last rank of a run exits abruptly, once, at this global step.
FAIL_AT_STEP_ENV = "APT_RAY_FAIL_AT_STEP"


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the trial stops with status ``diverged``."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"training diverged at step {step}: loss is {loss}. Lower the learning rate (lr) or the prompt count and run again.")
        self.step, self.loss = step, loss

    def __reduce__(self):  # travels from a Ray worker to the driver intact
        return (type(self), (self.step, self.loss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is visible: ask for device auto or cpu instead.")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and torch.distributed.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(choice)


def _inputs(batch: dict[str, torch.Tensor], keys: tuple[str, ...]) -> list[torch.Tensor | None]:
    return [batch.get(k) for k in keys]


def self_pretrained_backbone(cfg: TrainConfig) -> Path | None:
    """The cached self-pretrained tiny backbone this trial loads (built on first use), or None if it loads none."""
    if cfg.checkpoint or not cfg.pretrained or not get_preset(cfg.model).self_pretrained:
        return None
    if cfg.data != "synthetic":
        raise UserError(
            f"the self-pretrained {cfg.model} knows only the synthetic vocabulary, but data={cfg.data}: "
            "pass checkpoint=... (a backbone trained for your tokenizer) or pretrained=false."
        )
    from apt_ray.train.pretrain import ensure_pretrained

    return ensure_pretrained(cfg.model, cfg.data_spec(), device=pick_device(cfg.device))


def load_backbone(cfg: TrainConfig, tokenizer: Any, pretrained: Path | None) -> nn.Module:
    """The backbone of a trial: a checkpoint, the self-pretrained tiny backbone, or random weights (a tiny preset's
    text side sized to ``tokenizer``)."""
    sizing = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if cfg.checkpoint:
        return build_backbone(cfg.model, cfg.checkpoint, **sizing)
    if pretrained is not None:
        return build_backbone(cfg.model, pretrained, **sizing)
    if cfg.pretrained:
        log.warning("%s has no checkpoint: training on random backbone weights (pass checkpoint=... for real runs)", get_preset(cfg.model).name)
    return build_backbone(cfg.model, None, **sizing)


def check_tokenizer(tokenizer: Any, backbone: nn.Module, cfg: TrainConfig) -> None:
    """Refuse a tokenizer that does not fit the backbone's embedding table or pads with another id."""
    source = cfg.tokenizer or cfg.checkpoint or "the tokenizer"
    if len(tokenizer) > backbone.vocab_size:
        raise UserError(
            f"tokenizer '{source}' has {len(tokenizer)} ids but the backbone's embedding table has {backbone.vocab_size} rows: "
            "ids past the table would crash training. Pass tokenizer=<the tokenizer the checkpoint was trained with> "
            "(ViLT: bert-base-uncased, METER: roberta-base) or a checkpoint= that matches this tokenizer."
        )
    pad = backbone.pad_token_id
    if pad is not None and tokenizer.pad_token_id != pad:
        raise UserError(
            f"tokenizer '{source}' pads with id {tokenizer.pad_token_id} but the backbone expects padding id {pad} "
            "(RoBERTa places its position ids from it): pass tokenizer=<the tokenizer the checkpoint was trained with>."
        )


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


class Trainer:
    """One trial's state and its epochs."""

    pruned: dict[str, Any] | None = None  # the cut of a pruning trial, once made (see apt_ray.train.rewind)

    def __init__(self, cfg: TrainConfig, session: Session, progress: bool = False) -> None:
        self.started_unix = time.time()  # wall clock, comparable with the driver's: the platform's start-up cost
        self.setup_s: float | None = None  # from here to the first training step (model, method, data)
        self.cfg, self.session, self.progress = cfg, session, progress
        seed_everything(cfg.seed)
        self.device = pick_device(cfg.device)
        dtype = AUTOCAST_DTYPES.get(cfg.precision) if self.device.type == "cuda" else None
        self.autocast = torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        pretrained = self_pretrained_backbone(cfg)
        self.task = get_task(cfg.task)
        self.data = self.task.build_data(cfg.data_spec(session.world_size, session.rank, pretrained))
        spec = cfg.method_spec()
        tokenizer = self.data.tokenizer
        backbone = load_backbone(cfg, tokenizer, pretrained)
        check_tokenizer(tokenizer, backbone, cfg)
        cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.model = TaskModel(backbone, self.task.make_head(backbone, self.data), cls_token_id=cls_id or 0,
                               features=self.task.features)
        self.applied = methods.apply(self.model, spec)
        self.model.to(self.device)
        self.profile_shape = cfg.profile_shape()[1]
        self._profile: Profile | None = None
        recipe = get_recipe(cfg.recipe)
        self.optimizer = build_optimizer(self.model, self.applied.groups, cfg.group_lrs(), cfg.weight_decay, cfg.adam_betas,
                                         recipe.decay_norm_and_bias)
        self.steps_per_epoch = len(self.data.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * self.steps_per_epoch)
        self.scheduler = warmup_then_decay(self.optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps, cfg.schedule)
        self.net: nn.Module = self.model
        if session.world_size > 1:
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.epoch, self.step_in_epoch, self.global_step, self.restarts = 0, 0, 0, 0
        self.epoch_losses: list[float] = []  # this process's losses in the current epoch
        self.carried_loss = (0.0, 0.0)  # (sum, count) over all ranks before a mid-epoch resume; rank 0 holds it
        self.history: list[dict[str, Any]] = []
        self.first_losses: list[float] = []  # losses of the first steps of this process (resume checks)
        text = os.environ.get(FAIL_AT_STEP_ENV, "")
        self.fail_at_step = int(text) if text.isdigit() else None

    @property
    def profile(self) -> Profile:
        """The FLOPs profile at the trial's input shapes (measured on first use: a sweep's driver has it already)."""
        if self._profile is None:
            hw = self.cfg.profile_shape()[0]
            self._profile = profile(self.cfg.model, self.cfg.method_spec(), text_len=self.data.spec.max_text_len, image_hw=hw,
                                    num_answers=self.task.head_width(self.data), config=self.model.backbone.config,
                                    task=self.cfg.task)
        return self._profile

    # -- state ---------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "restarts": self.restarts, "history": self.history, "epoch_loss": self._loss_totals(self.epoch_losses),
                "pruned": self.pruned, "config": self.cfg.model_dump()}

    def restore(self, directory: Path, restarted: bool) -> None:
        cut = read_meta(directory).get("pruned")
        if cut is not None:  # written during the rewind: cut the fresh model the same way before loading
            rewind.start_rewind(self, cut)
        meta = load_checkpoint(directory, self.model, self.optimizer, self.scheduler)
        self.epoch, self.step_in_epoch, self.global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
        self.history, self.restarts = meta["history"], meta.get("restarts", 0) + int(restarted)
        carried = meta.get("epoch_loss", [0.0, 0.0])
        self.carried_loss = (carried[0], carried[1]) if self.session.rank == 0 else (0.0, 0.0)
        log.info("resumed from %s at epoch %d, step %d", directory, self.epoch, self.global_step)

    def _checkpoint(self, metrics: dict[str, Any]) -> None:
        directory = None
        meta = self.meta()  # on every rank: it all-reduces the epoch's loss totals
        if self.session.rank == 0:
            directory = save_checkpoint(self.session.checkpoint_scratch() / f"step_{self.global_step:08d}", self.model, self.optimizer, self.scheduler, meta)
        self.session.report({**metrics, **self.facts()}, directory)

    def facts(self) -> dict[str, Any]:
        """What every report carries beside the epoch's metrics: restarts, when this process took its first
        step (start-up time), and what the trial actually used."""
        first = self.started_unix + self.setup_s if self.setup_s is not None else None
        return {"restarts": self.restarts, "first_step_unix": first, "used": {**self.preprocessing(),
                "trainable_groups": self.applied.group_sizes(), "profile_shape": self.profile_shape}}

    # -- steps ---------------------------------------------------------------
    def _train_step(self, batch: dict[str, torch.Tensor]) -> float:
        batch = _to(batch, self.device)
        with self.autocast:
            logits = self.net(*_inputs(batch, self.task.batch_keys))
        loss = self.task.loss(logits, batch)
        value = loss.item()
        if not math.isfinite(value):
            raise Diverged(self.global_step + 1, value)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        return value

    def _loss_totals(self, losses: list[float]) -> list[float]:
        """(sum, count) of this epoch's losses over all ranks, including what was carried over a resume."""
        return _all_sum([math.fsum(losses) + self.carried_loss[0], float(len(losses)) + self.carried_loss[1]], self.device)

    def _mean_loss(self, losses: list[float]) -> float:
        """Mean training loss of the epoch over all ranks (each rank saw its own shard)."""
        total, count = self._loss_totals(losses)
        return total / count if count else float("nan")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics over the whole validation set (its sums added over this rank's batches, then over
        the ranks; or the task's own ``evaluate``), and its score again as ``val_score``."""
        self.net.eval()
        task = self.task
        if task.evaluate is not None:
            ctx = EvalContext(self.device, self.autocast, self.session.rank, self.session.world_size,
                              lambda values: _all_sum(values, self.device))
            metrics = dict(task.evaluate(self.net, self.data, ctx))
            return {SCORE_KEY: metrics[task.score], **metrics}
        sums = {k: 0.0 for k in task.eval_keys}
        for batch in self.data.val_loader:
            batch = _to(batch, self.device)
            with self.autocast:
                logits = self.net(*_inputs(batch, task.batch_keys))
            for k, v in task.eval_batch(logits.float(), batch).items():
                sums[k] = sums[k] + v
        totals = _all_sum([sums[k] for k in task.eval_keys], self.device)
        metrics = dict(task.metrics(dict(zip(task.eval_keys, totals))))
        return {SCORE_KEY: metrics[task.score], **metrics}

    def _maybe_inject_failure(self) -> None:
        step = self.fail_at_step
        if step is None or self.global_step != step or self.session.rank != self.session.world_size - 1:
            return
        marker = self.session.checkpoint_scratch().parent / f".failure_injected_at_{step}"
        if marker.exists():
            return
        marker.write_text("injected")
        log.warning("injecting a worker failure at step %s (%s)", step, FAIL_AT_STEP_ENV)
        os._exit(17)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resume = self.session.resume_checkpoint()
        if resume is not None:
            self.restore(resume, restarted=getattr(self.session, "is_restart", False))
        epochs_at_start = self.epoch
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=f"{cfg.method} on {cfg.model}", disable=not self.progress, unit="step")
        while self._next_epoch():
            self.net.train()
            loader = self.data.train_loader
            loader.set_epoch(self.epoch)
            losses, step_times, samples, t_epoch = self.epoch_losses, [], 0, time.perf_counter()
            for i, batch in enumerate(loader):
                if i < self.step_in_epoch:
                    continue  # resuming mid-epoch: same (seed, epoch) order, so skip what was done
                if self.setup_s is None:
                    self.setup_s = time.time() - self.started_unix
                t0 = time.perf_counter()
                loss = self._train_step(batch)
                step_times.append(time.perf_counter() - t0)
                losses.append(loss)
                samples += batch[self.task.batch_keys[0]].shape[0]
                self.global_step += 1
                self.step_in_epoch = i + 1
                if len(self.first_losses) < 8:
                    self.first_losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                self._maybe_inject_failure()
                if self.global_step >= self.total_steps:
                    break
                if cfg.checkpoint_every_steps and self.global_step % cfg.checkpoint_every_steps == 0 and self.step_in_epoch < self.steps_per_epoch:
                    self._checkpoint({"epoch": self.epoch, "global_step": self.global_step, "train_loss": self._mean_loss(losses), "partial_epoch": True})
            elapsed = time.perf_counter() - t_epoch
            samples = _all_sum([float(samples)], self.device)[0]
            train_loss = self._mean_loss(losses)
            evaluated = self.evaluate()
            epoch_time = time.perf_counter() - t_epoch
            score = evaluated[SCORE_KEY]
            metrics = {
                "epoch": self.epoch + 1, "global_step": self.global_step,
                "train_loss": train_loss, **evaluated,
                "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
                "train_time_s": elapsed,  # rank 0's wall time over the epoch's training steps (no evaluation)
                "epoch_time_s": epoch_time,  # training and evaluation (a resumed epoch: its part after the resume)
                "step_time_ms": 1000 * statistics.median(step_times) if step_times else 0.0,
                "lr": self.scheduler.get_last_lr()[0],
            }
            self.history.append(metrics)
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_losses, self.carried_loss = [], (0.0, 0.0)
            self._checkpoint(metrics)
            if self.progress:
                bar.write(f"epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f}, val score {score:.2f}, {metrics['samples_per_s']:.0f} samples/s")
        bar.close()
        if epochs_at_start == self.epoch and self.history:
            # resumed from the final checkpoint (its run was cut off after it): nothing left to train, but a run
            # must report, or whoever waits on it (a Tune trial) never gets its result
            self.session.report(self.history[-1])
        return self.result()

    def _next_epoch(self) -> bool:
        """Whether another epoch trains; when the first phase of a pruning trial has ended, prune and rewind first."""
        if rewind.due(self):
            rewind.prune_and_rewind(self)
        return self.epoch < rewind.last_epoch(self) and self.global_step < self.total_steps

    def preprocessing(self) -> dict[str, Any]:
        """What the trial fed the model: tokenizer, image processing, recipe (logged with every run)."""
        tok = self.data.tokenizer
        return {"tokenizer": getattr(tok, "name_or_path", "") or type(tok).__name__, **self.data.image_processor_info(),
                "recipe": self.cfg.recipe, "lr_groups": {k: v for k, v in self.cfg.group_lrs().items() if k in self.applied.groups}}

    def result(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "status": "finished",
            "model": self.cfg.model, "method": self.cfg.method,
            "task": self.cfg.task,
            SCORE_KEY: read_metric(last, SCORE_KEY, float("nan")),  # a checkpoint of an older version has the alias
            **{k: v for k, v in last.items() if k.startswith("val_") and k != SCORE_KEY},  # the task's own metrics
            **self.task.result_facts(self.data),
            "additional_gmacs": self.profile.additional_gmacs,
            "analytic_additional_gmacs": self.profile.analytic_additional_gmacs,
            "base_gmacs": self.profile.base_gmacs,
            "updated_params": self.profile.updated_params,
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "trainable_groups": self.applied.group_sizes(),
            "profile_shape": self.profile_shape,
            **self.preprocessing(),
            "epochs": len(self.history), "global_step": self.global_step,
            "samples_per_s": statistics.fmean(h["samples_per_s"] for h in self.history) if self.history else 0.0,
            "step_time_ms": statistics.fmean(h["step_time_ms"] for h in self.history) if self.history else 0.0,
            "train_loss": last.get("train_loss", float("nan")),
            "restarts": self.restarts, "world_size": self.session.world_size,
            "started_unix": self.started_unix, "setup_s": self.setup_s if self.setup_s is not None else 0.0,
            "torch_threads": torch.get_num_threads(),
            "history": self.history,
        }


def session_for(config: dict[str, Any], cfg: TrainConfig) -> Session:
    """Where the loop runs: a Ray Train worker (``_ray``), a one-worker Tune trial (``_tune``, its cost in ``_cost``),
    or on its own."""
    if config.get("_ray") or config.get("_tune"):
        from apt_ray.train.ray_session import RaySession, TuneSession  # only under Ray

        if config.get("_tune"):
            return TuneSession(resume_from=cfg.resume_from, constants=config.get("_cost"))
        return RaySession(resume_from=cfg.resume_from)
    return LocalSession(cfg.output_dir or "results/train", cfg.resume_from)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of one trial (Ray Train's ``train_loop_per_worker``); returns the final metrics."""
    cfg = build_train_config(overrides={k: v for k, v in config.items() if not k.startswith("_")})
    session = session_for(config, cfg)
    return Trainer(cfg, session, progress=bool(config.get("_progress"))).fit()
