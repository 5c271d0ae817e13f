"""build_data(DataSpec) -> DataBundle: the loaders, tokenizer and answer vocabulary of one trial."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apt_ray.data.answers import answer_coverage, build_answer_vocab
from apt_ray.data.collate import CaptionCollator, VQACollator
from apt_ray.data.loaders import CaptionDataset, CountingLoader, QADataset, make_loader
from apt_ray.data.metrics import majority_baseline
from apt_ray.data.preprocess import describe_image_processor, first_line, load_image_processor, looks_like_path
from apt_ray.data.spec import ARROW_KINDS, DataSpec
from apt_ray.data.stats import DataStats
from apt_ray.data.synthetic import GENERATOR_VERSION, TOKENIZER_DIR, build_synthetic_vqa, is_complete, load_synthetic
from apt_ray.data.tokenizer import build_wordlevel_tokenizer
from apt_ray.data.vqav2 import ConcatSource, HFVQASource, QASource, load_arrow_split, open_hf_dataset, pick_split
from apt_ray.errors import UserError

log = logging.getLogger("apt_ray.data")
VQA_ARROW_PREFIX = "vqav2"  # vqav2_<split>.arrow (the ViLT/METER layout)


@dataclass
class DataBundle:
    """Everything a training loop needs from the data side."""

    train_loader: CountingLoader
    val_loader: CountingLoader
    tokenizer: Any
    answers: list[str]
    majority_baseline: float
    stats: dict[str, DataStats]
    spec: DataSpec
    location: Path | str = field(default="")
    image_processor: Any = None

    def image_processor_info(self) -> dict[str, Any]:
        """What a trial logs about the image processor (see `describe_image_processor`)."""
        return describe_image_processor(self.image_processor, self.spec.image_processor)

    @property
    def num_answers(self) -> int:
        """Width of the `labels` targets and of the answer head."""
        return len(self.answers)


def _as_spec(spec: DataSpec | Mapping[str, Any]) -> DataSpec:
    return spec if isinstance(spec, DataSpec) else DataSpec.model_validate(dict(spec))


def synthetic_dir(spec: DataSpec) -> Path:
    """The synthetic dataset folder for `spec`: `path` itself if it is a finished set, else a
    folder under the cache root named by the generator version and parameters."""
    root = spec.cache_root()
    if is_complete(root):
        return root
    name = (f"shapes-v{GENERATOR_VERSION}-seed{spec.synthetic_seed}-n{spec.num_train}-{spec.num_val}-"
            f"{spec.num_test}-q{spec.questions_per_image}-px{spec.render_size}")
    return root / "synthetic" / name


def ensure_synthetic(spec: DataSpec) -> Path:
    """Generate the synthetic set of `spec` unless it already exists; return its folder."""
    folder = synthetic_dir(spec)
    if is_complete(folder):
        return folder
    return build_synthetic_vqa(
        folder, num_train=spec.num_train, num_val=spec.num_val, num_test=spec.num_test,
        image_size=spec.render_size, seed=spec.synthetic_seed,
        questions_per_image=spec.questions_per_image, progress=spec.rank == 0)


def _require_path(spec: DataSpec) -> str:
    if not spec.path:
        raise UserError(f"data.kind is {spec.kind!r} but data.path is not set. Set data.path to the data folder"
                        + (" or hub id." if spec.kind == "hf" else " holding the vqav2_*.arrow files."))
    return spec.path


def _hf_splits(spec: DataSpec) -> tuple[Mapping[str, Any], str]:
    if spec.kind == "synthetic":
        folder = ensure_synthetic(spec)
        return load_synthetic(folder), str(folder)
    path = _require_path(spec)
    return open_hf_dataset(path), path


def _split_source(spec: DataSpec, splits: Mapping[str, Any] | None, where: str, split: str) -> QASource:
    if spec.kind in ARROW_KINDS:
        return load_arrow_split(where, split, spec.arrow_prefix or VQA_ARROW_PREFIX)
    assert splits is not None
    return HFVQASource(pick_split(splits, split, where), name=split)


def _limit(source: QASource, limit: int | None, seed: int) -> QASource:
    """A seeded random subset of `limit` questions (kept in their original order)."""
    if limit is None or limit >= len(source):
        return source
    picked = np.random.default_rng(seed).choice(len(source), size=limit, replace=False)
    return source.select(sorted(int(i) for i in picked))


def _require_questions(source: QASource, split: str, where: str) -> None:
    if len(source) == 0:
        raise UserError(
            f"The {split!r} split at {where} has no questions. Point data.path at a dataset whose "
            f"{split!r} split is not empty, or choose other splits (data.train_splits, data.val_split)."
        )


def open_sources(spec: DataSpec) -> tuple[QASource, QASource, str]:
    """Train and val questions for `spec` (generating the synthetic set if needed) and where they are."""
    if spec.kind in ARROW_KINDS:
        splits, where = None, str(Path(_require_path(spec)).expanduser())
    else:
        splits, where = _hf_splits(spec)
    parts = [_split_source(spec, splits, where, s) for s in spec.train_splits]
    train = parts[0] if len(parts) == 1 else ConcatSource(parts)
    val = _split_source(spec, splits, where, spec.val_split)
    train = _limit(train, spec.max_train_questions, spec.seed)
    val = _limit(val, spec.max_val_questions, spec.seed + 1)
    _require_questions(train, "+".join(spec.train_splits), where)
    _require_questions(val, spec.val_split, where)
    return train, val, where


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")
_TOKENIZER_FIX = ("Set tokenizer= to a folder written by a tokenizer's save_pretrained (tokenizer.json or its "
                  "vocab files, e.g. vocab.txt or vocab.json + merges.txt), to a hub id reachable from this "
                  "machine, or leave it unset for the synthetic set's own / a WordLevel tokenizer built over "
                  "the train text.")


def _load_named_tokenizer(value: str) -> Any:
    """AutoTokenizer over a save_pretrained folder or hub id; UserError naming `tokenizer=` otherwise."""
    from transformers import AutoTokenizer

    folder = Path(value).expanduser()
    local = folder.exists() or looks_like_path(value)
    if local:
        if not folder.exists():
            raise UserError(f"tokenizer={value!r} does not exist. {_TOKENIZER_FIX}")
        if not folder.is_dir():
            raise UserError(f"tokenizer={value!r} is not a folder. {_TOKENIZER_FIX}")
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"tokenizer={value!r} holds none of {', '.join(TOKENIZER_FILES)}. {_TOKENIZER_FIX}")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    # a backbone directory's config.json names apt_ray's own model type, which AutoTokenizer reads and warns about
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder) if local else value)
    except Exception as exc:  # unreadable files, unknown class, unreachable hub id...
        what = "could not be read" if local else "is not a hub id this machine can load"
        raise UserError(f"tokenizer={value!r} {what} ({first_line(exc)}). {_TOKENIZER_FIX}") from None
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(spec: DataSpec, train: QASource | None = None) -> Any:
    """The tokenizer named by `spec.tokenizer`; else the synthetic set's own; else a WordLevel
    tokenizer built in memory over the train questions and the distinct train answers (it serves
    randomly initialised backbones)."""
    from transformers import AutoTokenizer

    if spec.tokenizer:
        tokenizer = _load_named_tokenizer(spec.tokenizer)
    elif spec.kind == "synthetic":
        tokenizer = AutoTokenizer.from_pretrained(str(ensure_synthetic(spec) / TOKENIZER_DIR))
    else:
        if train is None:
            train = open_sources(spec)[0]
        distinct_answers = sorted({a for answers in train.answers for a in answers})
        tokenizer = build_wordlevel_tokenizer([*train.questions, *distinct_answers])
    if tokenizer.pad_token_id is None:
        raise UserError(f"tokenizer={spec.tokenizer!r} has no padding token. Use a tokenizer with a pad token "
                        "(BERT- or RoBERTa-style), as batches are padded to data.max_text_len.")
    return tokenizer


def load_processor_for(spec: DataSpec) -> Any:
    """`load_image_processor(spec)`, warning when the processor targets another edge than
    `spec.image_size` (the size cost profiles assume)."""
    processor = load_image_processor(spec)
    edge = describe_image_processor(processor)["image_size"]
    if spec.image_processor and edge is not None and edge != spec.image_size:
        log.warning("image_processor=%s targets %d-pixel images but data.image_size is %d; batches follow the "
                    "processor", spec.image_processor, edge, spec.image_size)
    return processor


def _split_stats(split: str, source: QASource, answers: list[str], max_text_len: int) -> DataStats:
    cov = answer_coverage(source.answers, {a: i for i, a in enumerate(answers)})
    return DataStats(split=split, questions=cov.questions,
                     questions_without_vocab_answer=cov.questions_without_vocab_answer,
                     annotator_answers=cov.annotator_answers, oov_annotator_answers=cov.oov_annotator_answers,
                     max_text_len=max_text_len)


def build_data(spec: DataSpec | Mapping[str, Any]) -> DataBundle:
    """Open the data of `spec`, build tokenizer and answer vocabulary, and return sharded loaders.

    Batches are dicts: input_ids (B, max_text_len) long, attention_mask (B, max_text_len) long,
    pixel_values (B, 3, H, W) float32 from the backbone's image processor (H = W = image_size for
    square images at image_size and for METER's crop; ViLT pads a batch to its largest image),
    pixel_mask (B, H, W) long when the processor pads (ViLT: 1 on image pixels, 0 on padding),
    labels (B, num_answers) float32 soft targets, question_id (B,) long.
    """
    spec = _as_spec(spec)
    processor = load_processor_for(spec)  # cheap, so a bad processor fails before the data is read
    train, val, where = open_sources(spec)
    tokenizer = load_tokenizer(spec, train)
    answers = build_answer_vocab(train.answers, spec.answer_top_k)
    stats = {
        "train": _split_stats("train", train, answers, spec.max_text_len),
        "val": _split_stats("val", val, answers, spec.max_text_len),
    }
    for s in stats.values():
        if s.questions_without_vocab_answer:
            log.info("data %s (answer vocabulary: top %d)", s.summary(), len(answers))
    baseline = majority_baseline(train.answers, val.answers)
    if spec.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers warns after fork otherwise
    collate = VQACollator(tokenizer, answers, image_processor=processor, max_text_len=spec.max_text_len)
    common = dict(seed=spec.seed, world_size=spec.world_size, rank=spec.rank, num_workers=spec.num_workers,
                  max_bad_image_fraction=spec.max_bad_image_fraction)
    train_loader = make_loader(QADataset(train), collate, stats["train"], batch_size=spec.batch_size,
                               shuffle=True, **common)
    val_loader = make_loader(QADataset(val), collate, stats["val"],
                             batch_size=spec.eval_batch_size or spec.batch_size, shuffle=False, **common)
    return DataBundle(train_loader=train_loader, val_loader=val_loader, tokenizer=tokenizer, answers=answers,
                      majority_baseline=baseline, stats=stats, spec=spec, location=where, image_processor=processor)


def build_caption_loader(
    spec: DataSpec | Mapping[str, Any],
    *,
    split: str = "train",
    batch_size: int | None = None,
    shuffle: bool = True,
    max_text_len: int | None = None,
) -> CountingLoader:
    """Image-caption batches (input_ids, attention_mask, pixel_values, and pixel_mask when the image
    processor pads) for pretraining, one pair per image of `split`; sharded and seeded like
    `build_data`. Tokenizer: `load_tokenizer(spec)`; images: `load_image_processor(spec)`."""
    spec = _as_spec(spec)
    processor = load_processor_for(spec)
    if spec.kind in ARROW_KINDS:
        raise UserError("Captions exist only in the synthetic set (or a Hugging Face dataset with a 'caption' "
                        "column); set data.kind to 'synthetic' for pretraining.")
    splits, where = _hf_splits(spec)
    dataset = pick_split(splits, split, where)
    if "caption" not in dataset.column_names:
        raise UserError(f"The {split!r} split at {where} has no 'caption' column, so it cannot feed caption "
                        "pretraining. Use the synthetic set (data.kind: synthetic).")
    captions = CaptionDataset(dataset)
    if len(captions) == 0:
        raise UserError(f"The {split!r} split at {where} is empty. Point data.path at a dataset with images "
                        "and captions in that split.")
    length = max_text_len or spec.max_text_len
    collate = CaptionCollator(load_tokenizer(spec), image_processor=processor, max_text_len=length)
    return make_loader(captions, collate, DataStats(split=f"{split} captions", questions=len(captions),
                                                    max_text_len=length),
                       batch_size=batch_size or spec.batch_size, shuffle=shuffle, seed=spec.seed,
                       world_size=spec.world_size, rank=spec.rank, num_workers=spec.num_workers,
                       max_bad_image_fraction=spec.max_bad_image_fraction)
