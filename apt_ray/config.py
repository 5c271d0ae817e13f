"""Validated configuration of one trial (``TrainConfig``), read from flat YAML + ``key=value`` overrides.

Everything a user types goes through pydantic here, so a typo or a bad value is
refused with one message before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apt_ray.data.spec import DataKind, DataSpec
from apt_ray.errors import UserError, validation_message
from apt_ray.methods import registry as method_registry
from apt_ray.methods.spec import MethodName, MethodSpec
from apt_ray.models.preprocessing import resolve_image_processor, resolve_tokenizer
from apt_ray.models.presets import get_preset
from apt_ray.tasks.registry import TaskName
from apt_ray.train.recipes import RECIPES, get_recipe

# A sanity limit, far above any real run: a mistyped epoch count is refused instead of scheduling a run that never ends.
MAX_EPOCHS = 10_000


class TrainConfig(BaseModel):
    """One trial: backbone, method, data and optimisation, as one flat mapping.

    Optimisation keys left unset come from the ``recipe`` (see :mod:`apt_ray.train.recipes`); after validation
    they hold the values the trial uses.
    """

    model_config = ConfigDict(extra="forbid")

    # backbone and its preprocessing
    model: str = "tiny-meter"
    checkpoint: str | None = Field(None, description="backbone weights: transformers dir / hub id / METER .ckpt")
    pretrained: bool = Field(True, description="tiny presets without checkpoint: use the self-pretrained backbone")
    tokenizer: str | None = Field(None, description="text tokenizer dir or hub id (default: the checkpoint's own; required with a METER .ckpt: roberta-base)")
    image_processor: str | None = Field(None, description="image processor dir or hub id (default: the checkpoint's own, else the backbone's standard one)")
    # task: what the backbone is trained for (data, head, loss, metrics, score; see apt_ray.tasks)
    task: TaskName = Field("vqa", description="the registered task: builds the data, the head, the loss and the score")
    # method: the registered method's name; its knobs (num_prompts, rank, depth, ...) are generated from the
    # registered methods' configs right after this field (see apt_ray.methods.registry and the sync below)
    method: MethodName = "apt"
    # data
    data: DataKind = "synthetic"
    data_path: str | None = None
    num_train_images: int = Field(2000, gt=0, description="synthetic: training images")
    num_val_images: int = Field(300, gt=0, description="synthetic: validation images")
    questions_per_image: int = Field(4, gt=0)
    max_train_questions: int | None = Field(None, gt=0)
    max_val_questions: int | None = Field(None, gt=0)
    max_text_len: int | None = Field(None, ge=3, description="default: the preset's text length")
    image_size: int | None = Field(None, ge=8, description="what the image processor resizes to (ViLT: the shorter side; METER: the crop); default: the preset's")
    answer_top_k: int = Field(3129, gt=0)
    num_negatives: int = Field(15, ge=1, description="retrieval: negative captions per training image (ViLT/METER: 15)")
    negatives: Literal["random", "hard"] = Field("random", description="retrieval: random negatives (ViLT/METER) or the hardest in the batch")
    rerank_top_k: int | None = Field(None, gt=0, description="retrieval evaluation: matching-head scores for each query's top k by unimodal [CLS] cosine only (METER); default: all pairs")
    classifier: Literal["linear", "zero_shot"] = Field("linear", description="classification: a linear head on the pooled image features (CLIP's linear probe) or CLIP's zero-shot classifier (cosine to the class prompts' text embeddings)")
    text_sites: bool = Field(False, description="classification on CLIP with classifier=zero_shot: methods also attach to the text encoder's attention")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    # optimisation (unset: the recipe's)
    recipe: str = Field("embedded", description="named optimisation settings: " + ", ".join(RECIPES))
    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS, description=f"passes over the training set (at most {MAX_EPOCHS})")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    batch_size: int | None = Field(None, ge=1, description="global batch size (split over Ray Train workers)")
    lr: float | None = Field(None, gt=0, description="base learning rate: the method's parameters train at lr x the recipe's method multiplier")
    head_lr: float | None = Field(None, gt=0, description="learning rate of the task head")
    weight_decay: float | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    schedule: Literal["linear", "cosine"] | None = None
    adam_betas: tuple[float, float] | None = None
    grad_clip: float | None = Field(None, ge=0, description="max gradient norm; 0 turns clipping off")
    precision: Literal["bf16", "fp16", "fp32"] | None = Field(None, description="autocast dtype on GPU")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # checkpoints and output
    output_dir: str | None = Field(None, description="where checkpoints go (standalone runs)")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also checkpoint every N steps (default: every epoch)")
    resume_from: str | None = Field(None, description="a checkpoint dir (or an output_dir) to resume from")

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, name: str) -> str:
        get_recipe(name)
        return name

    @model_validator(mode="after")
    def _check_pruning(self) -> "TrainConfig":
        from apt_ray.methods.configs.pruning import check_pruning

        check_pruning(self.method, self)
        return self

    @model_validator(mode="after")
    def _fill_from_recipe(self) -> "TrainConfig":
        r = get_recipe(self.recipe)
        if self.lr is None:
            self.lr = r.base_lr(self.method)
        if self.head_lr is None:
            self.head_lr = r.head_rate(self.method, self.lr)
        for key, value in (("epochs", r.epochs), ("batch_size", r.batch_size), ("weight_decay", r.weight_decay),
                           ("warmup_ratio", r.warmup_ratio), ("schedule", r.schedule), ("adam_betas", r.betas),
                           ("grad_clip", r.grad_clip), ("precision", r.precision)):
            if getattr(self, key) is None:
                setattr(self, key, value)
        return self

    def group_lrs(self) -> dict[str, float]:
        """Learning rate of each trainable group: the head at ``head_lr``, the others at ``lr`` x the recipe's multiplier."""
        mult = get_recipe(self.recipe).multipliers(self.method)
        return {**{g: self.lr * m for g, m in mult.items()}, "head": self.head_lr}

    def check_text_len(self) -> None:
        """Refuse a ``max_text_len`` above what the trial's backbone takes (the preset's, or a local checkpoint's)."""
        if self.max_text_len is None:
            return
        from apt_ray.models.presets import checkpoint_config

        config = checkpoint_config(self.model, self.checkpoint)
        if config is None and self.checkpoint is not None and not Path(self.checkpoint).expanduser().is_file():
            return  # a hub id (or a missing path, refused when loaded): its config is read when the trial loads it
        limit = get_preset(self.model).text_limit(config)
        if limit is not None and self.max_text_len > limit:
            raise UserError(f"max_text_len={self.max_text_len} is above the {limit} text tokens {self.model} takes: "
                            f"use max_text_len between 3 and {limit}.")

    @property
    def text_len(self) -> int:
        """Tokens per text: ``max_text_len``, else the preset's."""
        return self.max_text_len or get_preset(self.model).text_len

    def profile_shape(self) -> tuple[tuple[int, int], str]:
        """The image shape a trial's cost profile counts, and what it stands for. Square images (the synthetic set,
        METER's centre crop) are counted as they train; ViLT's real images vary per batch, so the preset's reference."""
        preset = get_preset(self.model)
        size = self.image_size or preset.image_size
        if preset.processor == "vilt" and self.data != "synthetic":
            h, w = preset.image_hw
            return (h, w), f"ViLT images vary in shape per batch (shorter side {size}); the profile counts the reference {h}x{w}"
        return (size, size), f"{size}x{size}, as trained"

    def method_spec(self) -> MethodSpec:
        """The trial's method and every knob (the flat keys of this config)."""
        keys = [k for k in MethodSpec.model_fields if k != "name"]
        try:
            return MethodSpec(name=self.method, **{k: getattr(self, k) for k in keys})
        except ValidationError as e:
            raise UserError(validation_message(e, list(MethodSpec.model_fields))) from None

    def data_spec(self, world_size: int = 1, rank: int = 0, pretrained_dir: Path | None = None) -> DataSpec:
        """The trial's data, tokenised and preprocessed as its backbone needs (see :mod:`apt_ray.models.preprocessing`);
        ``pretrained_dir``: the self-pretrained tiny backbone it loads, if any."""
        preset = get_preset(self.model)
        if self.batch_size % world_size:
            raise UserError(
                f"batch_size {self.batch_size} cannot be split evenly over {world_size} workers: "
                f"use a global batch size that is a multiple of {world_size}."
            )
        return DataSpec(
            kind=self.data, path=self.data_path, num_train=self.num_train_images, num_val=self.num_val_images,
            num_test=self.num_val_images, questions_per_image=self.questions_per_image,
            max_train_questions=self.max_train_questions, max_val_questions=self.max_val_questions,
            image_size=self.image_size or preset.image_size, max_text_len=self.text_len,
            answer_top_k=self.answer_top_k, num_negatives=self.num_negatives, negatives=self.negatives,
            rerank_top_k=self.rerank_top_k, classifier=self.classifier, text_sites=self.text_sites,
            batch_size=self.batch_size // world_size, num_workers=self.num_workers,
            seed=self.seed, world_size=world_size, rank=rank,
            tokenizer=resolve_tokenizer(preset.family, self.checkpoint, self.tokenizer, pretrained_dir),
            image_processor=resolve_image_processor(self.checkpoint, self.image_processor, pretrained_dir),
            processor_family=preset.processor, patch_size=preset.patch_size,
        )


# One field per registered knob, after ``method``; kept in step with registrations made later (plug-ins, tests).
method_registry.on_registry_change(lambda: method_registry.sync_knob_fields(TrainConfig, after="method"))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a mapping; values are read as YAML scalars (``lr=1e-3``, ``layers=[0,1]``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{pair}' is not of the form key=value (e.g. lr=1e-3 or num_prompts=32).")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def load_mapping(path: str | Path | None) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' does not exist: pass the path of a YAML file.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config file '{p}' is not valid YAML ({str(e).splitlines()[0]}): fix its syntax.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{p}' holds a {type(data).__name__}, not a mapping: write it as 'key: value' lines.")
    return data


def build_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Merge file, then overrides (later wins), and validate."""
    raw = {**load_mapping(path), **{k: v for k, v in (overrides or {}).items()}}
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(validation_message(e, list(TrainConfig.model_fields))) from None
    get_preset(cfg.model)
    cfg.method_spec()
    return cfg
