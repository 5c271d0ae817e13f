"""VQA answers: normalisation, soft scores, the answer vocabulary and how well it covers a split."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from apt_ray.errors import UserError

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_LONE_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCT = re.compile(r"[^\w\s.:]")


def normalize_answer(answer: str) -> str:
    """Canonical form of an answer: lower case, no articles or stray punctuation, digits for
    number words. A compact version of the usual VQA answer processing (no contraction table);
    it is idempotent, so already-normalised answers pass through unchanged."""
    text = answer.lower().strip().replace("'", "")
    text = _LONE_PERIOD.sub(" ", text)
    text = _PUNCT.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words) if words else answer.lower().strip()


def soft_score(count: int) -> float:
    """VQA credit for an answer that `count` of the annotators gave: min(1, count / 3)."""
    if count < 0:
        raise ValueError(f"annotator count must be >= 0, got {count}")
    return min(1.0, count / 3.0)


def soft_targets(answers: Iterable[str]) -> dict[str, float]:
    """Soft credit of every distinct answer among one question's annotator answers."""
    return {answer: soft_score(n) for answer, n in Counter(answers).items()}


def answer_credit(train_answers: Iterable[Sequence[str]]) -> Counter[str]:
    """Total credit of each answer over all questions, in thirds: sum of min(3, votes).

    Ranking by credit rather than raw votes means answers that earn the same training score
    rank the same, whether a dataset stores all ten votes or (like the ViLT arrow files) only
    distinct answers with soft scores.
    """
    credit: Counter[str] = Counter()
    for answers in train_answers:
        for answer, votes in Counter(answers).items():
            credit[answer] += min(3, votes)
    return credit


def build_answer_vocab(train_answers: Iterable[Sequence[str]], top_k: int | None = 3129) -> list[str]:
    """The `top_k` answers with the most training credit (see `answer_credit`), best first;
    ties broken alphabetically so the order never depends on input order."""
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    credit = answer_credit(train_answers)
    if not credit:
        raise UserError(
            "The training split has no answers, so no answer vocabulary can be built. "
            "Point the data path at a split whose questions carry annotator answers "
            "(test splits of VQAv2 have none)."
        )
    ranked = sorted(credit.items(), key=lambda item: (-item[1], item[0]))
    return [answer for answer, _ in ranked[:top_k]]


@dataclass(frozen=True)
class AnswerCoverage:
    """How many questions and annotator answers of a split the vocabulary can express."""

    questions: int
    questions_without_vocab_answer: int
    annotator_answers: int
    oov_annotator_answers: int

    @property
    def oov_question_fraction(self) -> float:
        """Share of questions whose every annotator answer is outside the vocabulary."""
        return self.questions_without_vocab_answer / self.questions if self.questions else 0.0

    def as_dict(self) -> dict[str, float]:
        """Plain dict for logging."""
        return {**asdict(self), "oov_question_fraction": self.oov_question_fraction}


def answer_coverage(answers: Iterable[Sequence[str]], vocab: Iterable[str] | Mapping[str, int]) -> AnswerCoverage:
    """Count questions with no in-vocabulary answer and annotator answers outside the vocabulary.
    Such questions stay in the data with an all-zero target, so they score 0 as in VQA."""
    known = vocab if isinstance(vocab, Mapping) else set(vocab)
    questions = without = total = oov = 0
    for question_answers in answers:
        questions += 1
        misses = sum(1 for a in question_answers if a not in known)
        total += len(question_answers)
        oov += misses
        if misses == len(question_answers):
            without += 1
    return AnswerCoverage(questions, without, total, oov)
