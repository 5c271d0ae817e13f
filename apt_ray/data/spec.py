"""DataSpec: the validated description of which data a trial reads and how it is batched."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_CACHE_ENV = "APT_RAY_CACHE"
DataKind = Literal["synthetic", "arrow", "vqav2_arrow", "hf"]
ARROW_KINDS = ("arrow", "vqav2_arrow")  # vqav2_arrow: the name VQA's arrow files had before every task read arrow


def default_cache_dir() -> Path:
    """The cache root: `$APT_RAY_CACHE` if set, else `~/.cache/apt_ray`."""
    env = os.environ.get(DEFAULT_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "apt_ray"


class DataSpec(BaseModel):
    """Where a task's data comes from, its sizes, and how it is tokenised, batched and sharded.

    `kind` picks the reader: `synthetic` (the shapes task, generated into a cache on first
    use), `arrow` (a folder of the task's ViLT/METER-style arrow files, `<prefix>_<split>.arrow`;
    `vqav2_arrow` is its older name for VQA) or `hf` (a Hugging Face `datasets` directory or hub id).
    """

    model_config = ConfigDict(extra="forbid")

    kind: DataKind = "synthetic"
    path: str | None = Field(
        default=None,
        description="synthetic: cache root (default $APT_RAY_CACHE or ~/.cache/apt_ray) or a "
        "finished synthetic dataset folder; arrow: folder of arrow files; hf: folder or hub id",
    )
    train_splits: tuple[str, ...] = ("train",)
    val_split: str = "val"
    arrow_prefix: str | None = Field(default=None, description="arrow files' name prefix; default: the task's "
                                     "(vqav2, nlvr2, f30k_caption_karpathy)")

    # synthetic generation (ignored for real data)
    num_train: int = Field(default=3000, gt=0, description="synthetic train images")
    num_val: int = Field(default=500, gt=0, description="synthetic val images")
    num_test: int = Field(default=500, ge=0, description="synthetic test images")
    questions_per_image: int = Field(default=3, gt=0, le=50)
    scene_size: int | None = Field(default=None, ge=24, le=1024, description="synthetic render size; default image_size")
    synthetic_seed: int = Field(default=0, ge=0, description="seed of the synthetic generator (not of shuffling)")

    # optional subsets of any kind (seeded random subset of questions)
    max_train_questions: int | None = Field(default=None, gt=0)
    max_val_questions: int | None = Field(default=None, gt=0)

    # model-side shapes
    image_size: int = Field(default=64, ge=8, le=2048)
    max_text_len: int = Field(default=40, ge=3, le=4096)
    processor_family: Literal["vilt", "meter"] = Field(
        default="vilt",
        description="which backbone's default image processor to build when image_processor is unset: "
        "vilt (ViltImageProcessor: shorter side image_size, longer side <= 1333/800 of it, multiples of "
        "patch_size, mean/std 0.5, padded batches with pixel_mask) or meter (CLIPImageProcessor: resize + "
        "centre crop at image_size, CLIP mean/std)",
    )
    patch_size: int = Field(default=32, ge=1, le=1024,
                            description="ViLT's default processor rounds image sides down to a multiple of this")
    image_processor: str | None = Field(
        default=None,
        description="image processor folder (written by save_pretrained, holding preprocessor_config.json) "
        "or hub id; default: the processor_family's processor at image_size",
    )
    tokenizer: str | None = Field(
        default=None,
        description="tokenizer folder or hub id; default: the synthetic set's own, else a "
        "WordLevel tokenizer built over the train questions and answers",
    )
    answer_top_k: int = Field(default=3129, gt=0)
    # image-text retrieval (other tasks ignore these)
    num_negatives: int = Field(default=15, ge=1, description="retrieval: negative captions per training image "
                               "(ViLT/METER's draw_false_text: 15)")
    negatives: Literal["random", "hard"] = Field(default="random", description="retrieval: random captions of other "
                                                 "images (ViLT/METER) or the highest-scoring ones of the batch")
    rerank_top_k: int | None = Field(default=None, gt=0, description="retrieval evaluation: score with the matching "
                                     "head only each query's top k candidates by unimodal [CLS] cosine (backbones "
                                     "with unimodal_cls: METER); default: every pair")
    # image classification (other tasks ignore these)
    classifier: Literal["linear", "zero_shot"] = Field(default="linear", description="classification: a linear head "
                                                       "on the pooled image features, or CLIP's zero-shot classifier "
                                                       "over the class prompts' text embeddings")
    text_sites: bool = Field(default=False, description="classification with a CLIP zero_shot classifier: methods "
                             "also attach to the text encoder's attention")

    # loading
    batch_size: int = Field(default=32, gt=0)
    eval_batch_size: int | None = Field(default=None, gt=0)
    num_workers: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0, description="seed of shuffling and subsetting")
    max_bad_image_fraction: float = Field(default=0.05, ge=0.0, le=1.0)

    # sharding (one process per rank; no Ray needed here)
    world_size: int = Field(default=1, gt=0)
    rank: int = Field(default=0, ge=0)

    @field_validator("train_splits")
    @classmethod
    def _some_train_split(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not s for s in value):
            raise ValueError("train_splits needs at least one non-empty split name")
        return value

    @model_validator(mode="after")
    def _check_rank(self) -> DataSpec:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} must be smaller than world_size {self.world_size}")
        if self.processor_family == "vilt" and self.image_processor is None and self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}: ViLT's "
                             "processor rounds image sides down to a multiple of patch_size, which would give "
                             "empty images")
        return self

    def cache_root(self) -> Path:
        """The folder under which synthetic data is generated."""
        return Path(self.path).expanduser() if self.path else default_cache_dir()

    @property
    def render_size(self) -> int:
        """Size the synthetic scenes are drawn at."""
        return self.scene_size or self.image_size
