"""Batching: tokenised text, images through the backbone's image processor, soft answer targets.

A collator returns `CollateOutput(batch, counts)`: the tensors, and how many images failed to
decode (those examples are dropped from the batch) and how many texts were truncated.
`loaders.CountingLoader` folds the counts into `DataStats` in the main process, so the counts
survive DataLoader worker processes.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image

from apt_ray.data.answers import soft_score
from apt_ray.data.preprocess import target_edge, resize_output_size
from apt_ray.data.stats import BatchCounts


class CollateOutput(NamedTuple):
    """A batch of tensors and what was dropped or cut while building it."""

    batch: dict[str, torch.Tensor]
    counts: BatchCounts


def decode_image(data: bytes) -> Image.Image | None:
    """The RGB PIL image in encoded bytes, or None if they do not decode."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # convert() loads the pixels, so the file can close
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None


class ImageBatcher:
    """Decode image bytes to RGB and run the backbone's image processor over the batch.

    Returns pixel_values (float32) and, when the processor pads, pixel_mask (long). When every
    image of a batch already has the size the processor's resize step would give it (the
    synthetic scenes at `image_size`), the processor runs with `do_resize=False`: PIL returns an
    exact copy for a same-size resize, so the pixels are identical and the round trip is saved.
    """

    def __init__(self, image_processor: Any) -> None:
        self.processor = image_processor
        self.edge = target_edge(image_processor) or 0
        self.pads = bool(getattr(image_processor, "do_pad", False)) and "pixel_mask" in getattr(
            image_processor, "model_input_names", ())
        self._resize_is_identity: dict[tuple[int, int], bool] = {}

    def _skip_resize(self, images: Sequence[Image.Image]) -> bool:
        if not getattr(self.processor, "do_resize", False):
            return False
        for image in images:
            hw = (image.height, image.width)
            if hw not in self._resize_is_identity:
                self._resize_is_identity[hw] = resize_output_size(self.processor, *hw) == hw
            if not self._resize_is_identity[hw]:
                return False
        return True

    def __call__(self, images: Sequence[bytes]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """Tensors of the images that decoded, and which ones did."""
        decoded = [decode_image(b) for b in images]
        ok = [d is not None for d in decoded]
        good = [d for d in decoded if d is not None]
        if not good:
            out = {"pixel_values": torch.empty(0, 3, self.edge, self.edge)}
            if self.pads:
                out["pixel_mask"] = torch.empty(0, self.edge, self.edge, dtype=torch.long)
            return out, ok
        extra = {"do_resize": False} if self._skip_resize(good) else {}
        features = self.processor(images=good, return_tensors="pt", **extra)
        out = {"pixel_values": features["pixel_values"].float()}
        if "pixel_mask" in features:
            out["pixel_mask"] = features["pixel_mask"].long()
        return out, ok


def encode_texts(tokenizer: Any, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids and attention_mask (len(texts), max_len), padded to max_len, and how many texts
    were longer than max_len tokens (special tokens included) and got truncated."""
    if not texts:
        empty = torch.zeros(0, max_len, dtype=torch.long)
        return empty, empty.clone(), 0
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    truncated = sum(1 for n in lengths if n > max_len)
    return enc["input_ids"].long(), enc["attention_mask"].long(), truncated


def soft_target_matrix(answer_lists: Sequence[Sequence[str]], answer_index: Mapping[str, int]) -> torch.Tensor:
    """(B, num_answers) float targets: min(1, votes/3) for each in-vocabulary answer."""
    labels = torch.zeros(len(answer_lists), len(answer_index), dtype=torch.float32)
    for row, answers in enumerate(answer_lists):
        for answer, votes in Counter(answers).items():
            column = answer_index.get(answer)
            if column is not None:
                labels[row, column] = soft_score(votes)
    return labels


class VQACollator:
    """Examples (`QAExample` dicts) -> input_ids, attention_mask, pixel_values, [pixel_mask], labels,
    question_id."""

    def __init__(self, tokenizer: Any, answers: Sequence[str], *, image_processor: Any, max_text_len: int) -> None:
        self.tokenizer = tokenizer
        self.answer_index = {a: i for i, a in enumerate(answers)}
        self.max_text_len = max_text_len
        self.images = ImageBatcher(image_processor)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> CollateOutput:
        pixels, ok = self.images([ex["image"] for ex in examples])
        kept = [ex for ex, good in zip(examples, ok) if good]
        input_ids, attention_mask, truncated = encode_texts(
            self.tokenizer, [ex["question"] for ex in kept], self.max_text_len)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **pixels,
            "labels": soft_target_matrix([ex["answers"] for ex in kept], self.answer_index),
            "question_id": torch.tensor([int(ex["question_id"]) for ex in kept], dtype=torch.long),
        }
        return CollateOutput(batch, BatchCounts(len(examples), ok.count(False), truncated))


class CaptionCollator:
    """Caption examples ({'image': bytes, 'caption': str}) -> input_ids, attention_mask, pixel_values,
    [pixel_mask]."""

    def __init__(self, tokenizer: Any, *, image_processor: Any, max_text_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.images = ImageBatcher(image_processor)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> CollateOutput:
        pixels, ok = self.images([ex["image"] for ex in examples])
        texts = [ex["caption"] for ex, good in zip(examples, ok) if good]
        input_ids, attention_mask, truncated = encode_texts(self.tokenizer, texts, self.max_text_len)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **pixels}
        return CollateOutput(batch, BatchCounts(len(examples), ok.count(False), truncated))
