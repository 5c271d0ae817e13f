"""Recall@K of image-text retrieval from a full (captions x images) score matrix, and its chance level.

Tie rule (pessimistic): a candidate that scores exactly as high as the positive is ranked before it. So a positive
tied with negatives counts as ranked after all of them, and a constant scorer retrieves nothing at R@1.

* Image retrieval (IR): each caption is a query over the N images; its one positive is the image it describes.
  Rank = 1 + the number of other images scoring >= the positive.
* Text retrieval (TR): each image with at least one caption is a query over all M captions; its positives are its
  own captions and the best-scoring one counts. Rank = 1 + the number of other images' captions scoring >= that
  best positive (an image's other captions never count against it).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import torch

RECALL_KS: tuple[int, ...] = (1, 5, 10)


def ir_ranks(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """(M,) rank (1 = first) of each caption's image among all images, ties pessimistic."""
    rows = torch.arange(scores.shape[0])
    positive = scores[rows, caption_image].unsqueeze(1)
    return (scores >= positive).sum(dim=1)  # the positive itself counts once: rank = 1 + the others >= it


def tr_ranks(scores: torch.Tensor, caption_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks, images): for each image with captions, the rank of its best caption among all captions (ties
    pessimistic), and which images those are."""
    num_images = scores.shape[1]
    own = caption_image.unsqueeze(1) == torch.arange(num_images).unsqueeze(0)  # (M, N): caption m describes image n
    queried = own.any(dim=0)
    best = scores.masked_fill(~own, float("-inf")).amax(dim=0)  # (N,) best positive score per image
    negatives_ahead = ((scores >= best.unsqueeze(0)) & ~own).sum(dim=0)
    images = torch.nonzero(queried).flatten()
    return 1 + negatives_ahead[images], images


def recall_hits(scores: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[str, int]:
    """Hit counts: ``ir_hits_<k>`` (captions whose image ranks in the top k), ``tr_hits_<k>`` (images with a
    caption in the top k), and the query counts ``captions`` and ``images``."""
    scores = scores.detach().double().cpu()
    caption_image = caption_image.long().cpu()
    ir = ir_ranks(scores, caption_image)
    tr, images = tr_ranks(scores, caption_image)
    out = {f"ir_hits_{k}": int((ir <= k).sum()) for k in ks}
    out.update({f"tr_hits_{k}": int((tr <= k).sum()) for k in ks})
    out.update(captions=int(ir.numel()), images=int(images.numel()))
    return out


def recall_metrics(hits: dict[str, float], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Percentages ``val_ir_r<k>``, ``val_tr_r<k>`` and their mean ``val_recall_mean`` from :func:`recall_hits`."""
    out = {f"val_ir_r{k}": 100.0 * hits[f"ir_hits_{k}"] / max(hits["captions"], 1) for k in ks}
    out.update({f"val_tr_r{k}": 100.0 * hits[f"tr_hits_{k}"] / max(hits["images"], 1) for k in ks})
    out["val_recall_mean"] = sum(out.values()) / len(out)
    return out


def chance_recall(captions_per_image: Sequence[int], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Expected recall (%) of a scorer that ranks candidates uniformly at random (no ties), by the same names as
    :func:`recall_metrics`: IR R@k = k/N; TR R@k of an image with c of the M captions = 1 - C(M-c, k) / C(M, k)."""
    counts = list(captions_per_image)
    n, m = len(counts), sum(counts)
    queried = [c for c in counts if c > 0]
    out = {f"val_ir_r{k}": 100.0 * min(k, n) / n for k in ks}
    out.update({f"val_tr_r{k}": 100.0 * sum(1 - comb(m - c, min(k, m)) / comb(m, min(k, m)) for c in queried)
                / len(queried) for k in ks})
    out["val_recall_mean"] = sum(out.values()) / len(out)
    return out
