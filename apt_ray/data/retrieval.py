"""Image-text retrieval data: the synthetic scenes with their captions, the ViLT/METER Flickr30K arrow files,
the training collator (each image with its caption and k negative captions) and :func:`build_retrieval_data`.

Synthetic set: every image is a fresh scene (:func:`apt_ray.data.scenes.sample_scene`) with
:data:`SYNTHETIC_CAPTIONS_PER_IMAGE` captions: its objects in reading order and in reverse order
(:func:`apt_ray.data.scenes.caption`); a one-object scene has the same text twice. A scene whose set of objects
(phrase and place) was already drawn, in this split or an earlier one, is drawn again, so no two images share a
caption and validation scenes never appear in training.

Arrow files: ``<prefix>_<split>.arrow`` with columns ``image`` (encoded bytes), ``caption`` (list of strings per
image), ``image_id`` (and ``split``), as the ViLT/METER ``write_f30k_karpathy`` scripts write them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from apt_ray.data.collate import CollateOutput, ImageBatcher, encode_texts
from apt_ray.data.loaders import CountingLoader, make_loader
from apt_ray.data.preprocess import describe_image_processor
from apt_ray.data.scenes import Scene, caption, encode_png, render_scene, sample_scene
from apt_ray.data.spec import ARROW_KINDS, DataSpec
from apt_ray.data.stats import BatchCounts, DataStats
from apt_ray.data.vqav2 import _read_arrow, arrow_split_path
from apt_ray.errors import UserError

log = logging.getLogger("apt_ray.data")
ARROW_PREFIX = "f30k_caption_karpathy"
ARROW_COLUMNS = ("image", "caption", "image_id")  # the ``split`` column is written too but not needed
SYNTHETIC_CAPTIONS_PER_IMAGE = 2
_SPLIT_STREAM = {"train": 1, "val": 0, "test": 2}  # val first: its scenes are withheld from train
NegativeKind = Literal["random", "hard"]


@dataclass
class RetrievalSplit:
    """The images of one split and their captions: caption ``j`` describes image ``caption_image[j]``."""

    name: str
    images: Sequence[bytes]
    image_ids: list[Any]  # as the source names them (the Flickr30K arrow files: the image's file name)
    captions: list[str]
    caption_image: list[int]

    @property
    def captions_per_image(self) -> list[int]:
        return np.bincount(np.asarray(self.caption_image, dtype=np.int64), minlength=len(self.image_ids)).tolist()

    def select_images(self, keep: Sequence[int]) -> RetrievalSplit:
        """The split restricted to images ``keep`` (in that order) and their captions."""
        new_index = {old: new for new, old in enumerate(keep)}
        rows = [j for j, i in enumerate(self.caption_image) if i in new_index]
        return RetrievalSplit(self.name, _Picked(self.images, list(keep)), [self.image_ids[i] for i in keep],
                              [self.captions[j] for j in rows], [new_index[self.caption_image[j]] for j in rows])


class _Picked(Sequence):
    """Items ``indices`` of a sequence, read lazily."""

    def __init__(self, base: Sequence[bytes], indices: list[int]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        return self.base[self.indices[i]]


class _ArrowImages(Sequence):
    """The ``image`` column of an arrow table as bytes, read lazily."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        value = self.column[i].as_py()
        return bytes(value) if value else b""


# ---------------------------------------------------------------- synthetic

def _scene_key(scene: Scene) -> tuple[str, ...]:
    return tuple(sorted(f"{o.phrase()}@{o.row}{o.col}" for o in scene.objects))


def scene_captions(scene: Scene) -> list[str]:
    """The scene's captions: objects in reading order, then in reverse order."""
    return [caption(scene), caption(replace(scene, objects=scene.objects[::-1]))]


def synthetic_splits(sizes: Mapping[str, int], *, image_size: int, seed: int) -> dict[str, RetrievalSplit]:
    """Synthetic retrieval splits of ``sizes`` images each; same arguments, same bytes."""
    seen: set[tuple[str, ...]] = set()
    out: dict[str, RetrievalSplit] = {}
    for name in sorted(sizes, key=lambda s: _SPLIT_STREAM.get(s, 99)):
        rng = np.random.default_rng([seed, 1001, _SPLIT_STREAM.get(name, 99)])
        images, ids, captions, owner = [], [], [], []
        while len(images) < sizes[name]:
            scene = sample_scene(rng, image_size)
            key = _scene_key(scene)
            if key in seen:
                continue
            seen.add(key)
            for text in scene_captions(scene):
                captions.append(text)
                owner.append(len(images))
            ids.append(len(images))
            images.append(encode_png(render_scene(scene)))
        out[name] = RetrievalSplit(name, images, ids, captions, owner)
    return out


# ---------------------------------------------------------------- arrow

def read_arrow_split(root: str | Path, split: str, prefix: str = ARROW_PREFIX) -> RetrievalSplit:
    """``<root>/<prefix>_<split>.arrow`` in the ViLT/METER layout; UserError when columns or images are missing."""
    if not Path(root).expanduser().is_dir():
        raise UserError(f"retrieval arrow folder {root} does not exist. Set data_path to the folder holding "
                        f"{prefix}_train.arrow and {prefix}_val.arrow (as the ViLT/METER scripts write them).")
    path = arrow_split_path(root, split, prefix)
    table = _read_arrow(path)
    missing = [c for c in ARROW_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)} that image-text retrieval reads (it has "
                        f"{', '.join(table.column_names) or 'none'}). Write it in the ViLT/METER Flickr30K layout: "
                        "image (encoded bytes), caption (a list of strings per image), image_id, split.")
    captions_col = table.column("caption").to_pylist()
    image_col = table.column("image")
    image_bytes = pc.fill_null(pc.binary_length(image_col), 0).to_pylist()
    ids = table.column("image_id").to_pylist()
    lacking = [i for i in range(table.num_rows) if captions_col[i] and not image_bytes[i]]
    if lacking:
        shown = ", ".join(str(ids[i]) for i in lacking[:5])
        raise UserError(f"{path} has captions but no image bytes in {len(lacking)} of its {table.num_rows} rows "
                        f"(image_id {shown}{', ...' if len(lacking) > 5 else ''}): every caption needs its image to be "
                        "ranked. Rewrite those rows with their images, or drop them.")
    if table.num_rows == 0:
        raise UserError(f"{path} has no rows: point data_path at a folder whose {split!r} split holds images.")
    captions, owner = [], []
    for i, texts in enumerate(captions_col):
        for text in [texts] if isinstance(texts, str) else (texts or []):
            captions.append(str(text))
            owner.append(i)
    if not captions:
        raise UserError(f"{path} holds images but no captions: fill its caption column (a list of strings per image).")
    return RetrievalSplit(split, _ArrowImages(image_col), ids, captions, owner)


# ---------------------------------------------------------------- batching

class PairDataset(Dataset):
    """Every (image, caption) pair of a split: one training example per caption, as ViLT/METER iterate."""

    def __init__(self, split: RetrievalSplit, rows: Sequence[int] | None = None) -> None:
        self.split = split
        self.rows = list(range(len(split.captions))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        j = self.rows[index]
        i = self.split.caption_image[j]
        return {"image": self.split.images[i], "caption": self.split.captions[j], "image_index": i}


class ImageDataset(Dataset):
    """The images of a split, in order (the evaluation's candidates)."""

    def __init__(self, split: RetrievalSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.split.images[index], "image_index": index}


class NegativesCollator:
    """Pairs -> one image each with its caption and negative captions, flattened image-major.

    ``random`` (the ViLT/METER default, their ``draw_false_text``): each image gets its caption and ``k`` captions
    drawn uniformly from other images of the split (a caption with the positive's exact text is drawn again).
    ``hard``: each image is paired with every caption of the batch; the loss keeps its ``k`` highest-scoring
    negatives. Batch: ``input_ids``/``attention_mask`` (B * G rows: image i's G candidates at rows i*G ...),
    ``pixel_values`` [``pixel_mask``] (B rows), ``target`` (B,: the positive's column), ``negative`` (B, G: which
    columns are negatives) and ``num_negatives`` (B,: k).
    """

    def __init__(self, tokenizer: Any, split: RetrievalSplit, *, image_processor: Any, max_text_len: int,
                 num_negatives: int, negatives: NegativeKind = "random", seed: int = 0) -> None:
        self.tokenizer, self.split, self.max_text_len = tokenizer, split, max_text_len
        self.num_negatives, self.negatives = num_negatives, negatives
        self.images = ImageBatcher(image_processor)
        self.rng = np.random.default_rng([seed, 1002])

    def _draw(self, image_index: int, text: str) -> list[str]:
        caps, owner = self.split.captions, self.split.caption_image
        out: list[str] = []
        for _ in range(1000 * self.num_negatives):
            if len(out) == self.num_negatives:
                break
            j = int(self.rng.integers(len(caps)))
            if owner[j] != image_index and caps[j] != text:
                out.append(caps[j])
        if len(out) < self.num_negatives:
            raise UserError(f"the {self.split.name!r} split has too few captions of other images to draw "
                            f"{self.num_negatives} negatives per image: lower num_negatives or use more images.")
        return out

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> CollateOutput:
        pixels, ok = self.images([ex["image"] for ex in examples])
        kept = [ex for ex, good in zip(examples, ok) if good]
        b = len(kept)
        if self.negatives == "random":
            texts = [t for ex in kept for t in [ex["caption"], *self._draw(ex["image_index"], ex["caption"])]]
            g = 1 + self.num_negatives
            target = torch.zeros(b, dtype=torch.long)
            negative = torch.ones(b, g, dtype=torch.bool)
            negative[:, 0] = False
        else:
            texts = [ex["caption"] for _ in kept for ex in kept]
            g = b
            target = torch.arange(b)
            owner = torch.tensor([ex["image_index"] for ex in kept])
            same_text = torch.tensor([[a["caption"] == c["caption"] for c in kept] for a in kept], dtype=torch.bool)
            negative = (owner.unsqueeze(1) != owner.unsqueeze(0)) & ~same_text
        input_ids, attention_mask, truncated = encode_texts(self.tokenizer, texts, self.max_text_len)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **pixels, "target": target,
                 "negative": negative.reshape(b, g), "num_negatives": torch.full((b,), self.num_negatives)}
        return CollateOutput(batch, BatchCounts(len(examples), ok.count(False), truncated))


class ImageCollator:
    """Images -> ``pixel_values`` [``pixel_mask``] and ``image_index``; an image that does not decode is an error
    (every image of the evaluation is a candidate)."""

    def __init__(self, image_processor: Any, split: RetrievalSplit) -> None:
        self.images, self.split = ImageBatcher(image_processor), split

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> CollateOutput:
        pixels, ok = self.images([ex["image"] for ex in examples])
        if not all(ok):
            bad = [self.split.image_ids[ex["image_index"]] for ex, good in zip(examples, ok) if not good]
            raise UserError(f"{len(bad)} image(s) of the {self.split.name!r} split do not decode (image_id "
                            f"{', '.join(map(str, bad[:5]))}): retrieval ranks every image, so fix or drop them.")
        batch = {**pixels, "image_index": torch.tensor([ex["image_index"] for ex in examples], dtype=torch.long)}
        return CollateOutput(batch, BatchCounts(len(examples), 0, 0))


# ---------------------------------------------------------------- the bundle

@dataclass
class RetrievalData:
    """What the retrieval task trains and evaluates on (see :class:`apt_ray.tasks.base.TaskData`)."""

    train_loader: CountingLoader
    val_loader: CountingLoader  # the validation images in order, not sharded (captions are split over ranks)
    tokenizer: Any
    spec: DataSpec
    train: RetrievalSplit
    val: RetrievalSplit
    image_processor: Any = None
    location: str = ""

    def image_processor_info(self) -> dict[str, Any]:
        return describe_image_processor(self.image_processor, self.spec.image_processor)

    @property
    def eval_batch_size(self) -> int:
        return self.spec.eval_batch_size or self.spec.batch_size


def _limit_pairs(split: RetrievalSplit, limit: int | None, seed: int) -> list[int] | None:
    """A seeded random subset of ``limit`` caption rows (None: all)."""
    if limit is None or limit >= len(split.captions):
        return None
    return sorted(int(j) for j in np.random.default_rng(seed).choice(len(split.captions), size=limit, replace=False))


def _limit_images(split: RetrievalSplit, limit: int | None, seed: int) -> RetrievalSplit:
    if limit is None or limit >= len(split.image_ids):
        return split
    keep = sorted(int(i) for i in np.random.default_rng(seed).choice(len(split.image_ids), size=limit, replace=False))
    return split.select_images(keep)


def open_splits(spec: DataSpec) -> tuple[RetrievalSplit, RetrievalSplit, str]:
    """Train (the train splits joined) and val splits of ``spec`` and where they come from. For the synthetic set
    ``max_train_questions`` caps the training pairs (fewer scenes are drawn) and ``max_val_questions`` the
    validation images; for arrow files they pick seeded random subsets of pairs / images."""
    if spec.kind == "synthetic":
        per = SYNTHETIC_CAPTIONS_PER_IMAGE
        n_train = spec.num_train if spec.max_train_questions is None else min(spec.num_train, math.ceil(spec.max_train_questions / per))
        n_val = spec.num_val if spec.max_val_questions is None else min(spec.num_val, spec.max_val_questions)
        splits = synthetic_splits({"train": n_train, "val": n_val}, image_size=spec.render_size, seed=spec.synthetic_seed)
        return splits["train"], splits["val"], "synthetic scenes"
    if spec.kind not in ARROW_KINDS:
        raise UserError(f"image-text retrieval reads the synthetic scenes or the Flickr30K arrow files, not data "
                        f"kind {spec.kind!r}: set data to synthetic or arrow.")
    if not spec.path:
        raise UserError("data is arrow but data_path is not set: set data_path to the folder holding "
                        f"{ARROW_PREFIX}_<split>.arrow files.")
    prefix = spec.arrow_prefix or ARROW_PREFIX
    parts = [read_arrow_split(spec.path, s, prefix) for s in spec.train_splits]
    train = parts[0] if len(parts) == 1 else _concat(parts)
    val = _limit_images(read_arrow_split(spec.path, spec.val_split, prefix), spec.max_val_questions, spec.seed + 1)
    return train, val, str(Path(spec.path).expanduser())


class _Chained(Sequence):
    """Several sequences end to end, read lazily."""

    def __init__(self, parts: list[Sequence[bytes]]) -> None:
        self.parts = parts
        self.where = [(k, i) for k, part in enumerate(parts) for i in range(len(part))]

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        k, i = self.where[index]
        return self.parts[k][i]


def _concat(parts: list[RetrievalSplit]) -> RetrievalSplit:
    images = _Chained([p.images for p in parts])
    offsets = np.cumsum([0] + [len(p.image_ids) for p in parts])
    return RetrievalSplit("+".join(p.name for p in parts), images, [i for p in parts for i in p.image_ids],
                          [c for p in parts for c in p.captions],
                          [int(o) + i for p, o in zip(parts, offsets) for i in p.caption_image])


def load_retrieval_tokenizer(spec: DataSpec, train: RetrievalSplit) -> Any:
    """``spec.tokenizer`` (the backbone's own), else a WordLevel tokenizer over the train captions."""
    from apt_ray.data.build import _load_named_tokenizer
    from apt_ray.data.tokenizer import build_wordlevel_tokenizer

    return _load_named_tokenizer(spec.tokenizer) if spec.tokenizer else build_wordlevel_tokenizer(sorted(set(train.captions)))


def build_retrieval_data(spec: DataSpec) -> RetrievalData:
    """Loaders for ``spec``: training pairs with negatives (sharded, seeded) and the validation images."""
    from apt_ray.data.build import load_processor_for

    train, val, where = open_splits(spec)
    if len(val.captions) == 0 or len(val.image_ids) < 2:
        raise UserError(f"the validation split at {where} has {len(val.image_ids)} image(s) and {len(val.captions)} "
                        "caption(s): retrieval needs at least 2 images with captions to rank. Use a larger val split.")
    rows = _limit_pairs(train, spec.max_train_questions, spec.seed) if spec.kind != "synthetic" else None
    tokenizer = load_retrieval_tokenizer(spec, train)
    processor = load_processor_for(spec)
    collate = NegativesCollator(tokenizer, train, image_processor=processor, max_text_len=spec.max_text_len,
                                num_negatives=spec.num_negatives, negatives=spec.negatives, seed=spec.seed)
    pairs = PairDataset(train, rows)
    common = dict(seed=spec.seed, num_workers=spec.num_workers, max_bad_image_fraction=spec.max_bad_image_fraction)
    train_loader = make_loader(pairs, collate, DataStats(split="train pairs", questions=len(pairs), max_text_len=spec.max_text_len),
                               batch_size=spec.batch_size, shuffle=True, world_size=spec.world_size, rank=spec.rank, **common)
    eval_bs = spec.eval_batch_size or spec.batch_size
    val_loader = make_loader(ImageDataset(val), ImageCollator(processor, val), DataStats(split="val images", questions=len(val.image_ids)),
                             batch_size=eval_bs, shuffle=False, **common)
    log.info("retrieval data: %d train pairs over %d images, val %d images x %d captions (%s)", len(pairs),
             len(train.image_ids), len(val.image_ids), len(val.captions), where)
    return RetrievalData(train_loader, val_loader, tokenizer, spec, train, val, processor, where)
