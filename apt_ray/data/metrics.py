"""VQA accuracy from soft targets, and the majority-answer baseline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from apt_ray.data.answers import build_answer_vocab, soft_score


def _as_tensor(x: torch.Tensor | np.ndarray | Sequence[Sequence[float]]) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def vqa_score_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Sum of the soft target of each argmax prediction, and the number of questions
    (to be summed across batches or ranks before dividing)."""
    logits, targets = _as_tensor(logits), _as_tensor(targets)
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be (N, A)")
    if logits.shape[0] == 0:
        return 0.0, 0
    picked = targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
    return float(picked.double().sum()), int(logits.shape[0])


def vqa_score(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean VQA accuracy in percent (0-100): each question earns the soft target of its argmax answer."""
    total, count = vqa_score_sum(logits, targets)
    return 100.0 * total / count if count else 0.0


def majority_baseline(train_answers: Sequence[Sequence[str]], eval_answers: Sequence[Sequence[str]]) -> float:
    """Score in percent of always giving the training set's most frequent answer (the one with the
    most training credit, ties alphabetical; see `build_answer_vocab`), scored against each
    evaluation question's annotator answers with min(1, votes/3)."""
    if not eval_answers:
        return 0.0
    top = build_answer_vocab(train_answers, top_k=1)[0]
    return 100.0 * sum(soft_score(Counter(a)[top]) for a in eval_answers) / len(eval_answers)
