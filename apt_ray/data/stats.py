"""DataStats: counters of what the loaders dropped, truncated or could not express."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

from apt_ray.errors import UserError


class BatchCounts(NamedTuple):
    """What one collate call saw: examples in, images that failed to decode, texts truncated."""

    examples: int
    undecodable_images: int
    truncated_texts: int


@dataclass
class DataStats:
    """Counters of one split.

    `questions`, `questions_without_vocab_answer`, `annotator_answers`, `oov_annotator_answers`
    describe the split as loaded. The `pass_*` counters describe the latest pass over the
    loader and restart at zero when a new pass begins.
    """

    split: str
    questions: int = 0
    questions_without_vocab_answer: int = 0
    annotator_answers: int = 0
    oov_annotator_answers: int = 0
    pass_examples: int = 0
    pass_undecodable_images: int = 0
    pass_truncated_texts: int = 0
    pass_batches: int = 0
    passes: int = 0
    max_text_len: int = 0

    def start_pass(self) -> None:
        """Reset the per-pass counters."""
        self.pass_examples = self.pass_undecodable_images = self.pass_truncated_texts = 0
        self.pass_batches = 0
        self.passes += 1

    def add(self, counts: BatchCounts) -> None:
        """Fold one batch's counts in."""
        self.pass_examples += counts.examples
        self.pass_undecodable_images += counts.undecodable_images
        self.pass_truncated_texts += counts.truncated_texts
        self.pass_batches += 1

    @property
    def undecodable_fraction(self) -> float:
        """Share of images seen in this pass that failed to decode."""
        return self.pass_undecodable_images / self.pass_examples if self.pass_examples else 0.0

    def check_bad_images(self, max_fraction: float, *, min_examples: int) -> None:
        """Raise UserError once enough images were seen and too many failed to decode."""
        if self.pass_examples < max(1, min_examples) or self.undecodable_fraction <= max_fraction:
            return
        raise UserError(
            f"{self.pass_undecodable_images} of {self.pass_examples} images in the {self.split} split "
            f"could not be decoded ({self.undecodable_fraction:.1%}, above the allowed "
            f"{max_fraction:.1%}). The image column is probably not encoded JPEG/PNG bytes or the "
            "files are corrupt: regenerate or re-download the data, or raise "
            "data.max_bad_image_fraction if skipping that many images is acceptable."
        )

    def summary(self) -> str:
        """One line describing what was dropped or cut."""
        parts = [f"{self.split}: {self.questions} questions"]
        if self.questions_without_vocab_answer:
            parts.append(f"{self.questions_without_vocab_answer} with no answer in the vocabulary (target all zero)")
        if self.pass_undecodable_images:
            parts.append(f"{self.pass_undecodable_images}/{self.pass_examples} undecodable images skipped")
        if self.pass_truncated_texts:
            parts.append(
                f"{self.pass_truncated_texts}/{self.pass_examples - self.pass_undecodable_images} texts "
                f"truncated to {self.max_text_len} tokens"
            )
        return "; ".join(parts)

    def as_dict(self) -> dict[str, object]:
        """Plain dict for logging."""
        return asdict(self)
