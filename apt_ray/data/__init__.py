"""Data layer: synthetic shapes VQA, VQAv2 readers, tokenizer, batching, VQA metrics.

Names are imported on first use, so `from apt_ray.data.spec import DataSpec` (and importing
this package) stays cheap; torch, datasets and transformers load only when needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataSpec": "apt_ray.data.spec",
    "default_cache_dir": "apt_ray.data.spec",
    "DataBundle": "apt_ray.data.build",
    "build_data": "apt_ray.data.build",
    "build_caption_loader": "apt_ray.data.build",
    "load_tokenizer": "apt_ray.data.build",
    "ensure_synthetic": "apt_ray.data.build",
    "load_image_processor": "apt_ray.data.preprocess",
    "default_image_processor": "apt_ray.data.preprocess",
    "describe_image_processor": "apt_ray.data.preprocess",
    "build_synthetic_vqa": "apt_ray.data.synthetic",
    "dataset_fingerprint": "apt_ray.data.synthetic",
    "load_synthetic": "apt_ray.data.synthetic",
    "build_wordlevel_tokenizer": "apt_ray.data.tokenizer",
    "soft_score": "apt_ray.data.answers",
    "soft_targets": "apt_ray.data.answers",
    "normalize_answer": "apt_ray.data.answers",
    "build_answer_vocab": "apt_ray.data.answers",
    "answer_coverage": "apt_ray.data.answers",
    "vqa_score": "apt_ray.data.metrics",
    "vqa_score_sum": "apt_ray.data.metrics",
    "majority_baseline": "apt_ray.data.metrics",
    "DataStats": "apt_ray.data.stats",
    "VQACollator": "apt_ray.data.collate",
    "CaptionCollator": "apt_ray.data.collate",
    "ArrowVQASource": "apt_ray.data.vqav2",
    "HFVQASource": "apt_ray.data.vqav2",
    "load_arrow_split": "apt_ray.data.vqav2",
    "load_hf_split": "apt_ray.data.vqav2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'apt_ray.data' has no attribute {name!r}")
