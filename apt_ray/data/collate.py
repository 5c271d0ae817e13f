"""Batching: tokenised text, resized and normalised images, soft answer targets, with counters.

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

import numpy as np
import torch
from PIL import Image

from apt_ray.data.answers import soft_score
from apt_ray.data.stats import BatchCounts


class CollateOutput(NamedTuple):
    """A batch of tensors and what was dropped or cut while building it."""

    batch: dict[str, torch.Tensor]
    counts: BatchCounts


def decode_image(data: bytes, size: int) -> np.ndarray | None:
    """RGB uint8 array (size, size, 3) from encoded bytes, or None if they do not decode."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


class ImageTransform:
    """Decode, resize to a square `size` and normalise with per-channel mean/std."""

    def __init__(self, size: int, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.size = size
        std_arr = np.asarray(std, dtype=np.float32)
        # (x / 255 - mean) / std as one scale and shift per channel
        self.scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
        self.shift = (np.asarray(mean, dtype=np.float32) / std_arr).astype(np.float32)

    def __call__(self, images: Sequence[bytes]) -> tuple[torch.Tensor, list[bool]]:
        """Float tensor (k, 3, size, size) of the images that decoded, and which ones did.
        The arithmetic runs in numpy, so it never competes for torch's intra-op threads."""
        arrays = [decode_image(b, self.size) for b in images]
        ok = [a is not None for a in arrays]
        good = [a for a in arrays if a is not None]
        if not good:
            return torch.empty(0, 3, self.size, self.size), ok
        pixels = np.stack(good).astype(np.float32) * self.scale - self.shift  # (k, H, W, 3)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))), ok


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
    """Examples (`QAExample` dicts) -> input_ids, attention_mask, pixel_values, labels, question_id."""

    def __init__(
        self,
        tokenizer: Any,
        answers: Sequence[str],
        *,
        image_size: int,
        max_text_len: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        self.tokenizer = tokenizer
        self.answer_index = {a: i for i, a in enumerate(answers)}
        self.max_text_len = max_text_len
        self.images = ImageTransform(image_size, mean, std)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> CollateOutput:
        pixels, ok = self.images([ex["image"] for ex in examples])
        kept = [ex for ex, good in zip(examples, ok) if good]
        input_ids, attention_mask, truncated = encode_texts(
            self.tokenizer, [ex["question"] for ex in kept], self.max_text_len)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixels,
            "labels": soft_target_matrix([ex["answers"] for ex in kept], self.answer_index),
            "question_id": torch.tensor([int(ex["question_id"]) for ex in kept], dtype=torch.long),
        }
        return CollateOutput(batch, BatchCounts(len(examples), ok.count(False), truncated))


class CaptionCollator:
    """Caption examples ({'image': bytes, 'caption': str}) -> input_ids, attention_mask, pixel_values."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_size: int,
        max_text_len: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.images = ImageTransform(image_size, mean, std)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> CollateOutput:
        pixels, ok = self.images([ex["image"] for ex in examples])
        texts = [ex["caption"] for ex, good in zip(examples, ok) if good]
        input_ids, attention_mask, truncated = encode_texts(self.tokenizer, texts, self.max_text_len)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels}
        return CollateOutput(batch, BatchCounts(len(examples), ok.count(False), truncated))
