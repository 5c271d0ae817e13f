"""Pretraining's image-text contrast: the loss itself, the encoders it aligns, and what pretraining records."""

from __future__ import annotations

import json
import math

import pytest
import torch

from apt_ray.config import build_train_config
from apt_ray.data.build import build_caption_loader, load_tokenizer
from apt_ray.models.presets import build_backbone
from apt_ray.train.pretrain import contrastive_loss, pretrain

TINY = dict(pretrained=False, num_train_images=48, num_val_images=12, questions_per_image=2, batch_size=8)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APT_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_contrastive_loss_rewards_matching_pairs():
    """Each text identical to its own image: below chance (log B); each paired with another's image: above it."""
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    chance = math.log(8)
    assert contrastive_loss(emb, emb).item() < 0.1 < chance
    assert contrastive_loss(emb, emb.roll(1, 0)).item() > chance
    # symmetric: swapping the roles of text and image gives the same loss
    other = torch.randn(8, 16)
    assert torch.allclose(contrastive_loss(emb, other), contrastive_loss(other, emb))


def test_meter_unimodal_cls_keeps_the_streams_apart():
    """The contrast compares the encoders before fusion: the text [CLS] ignores the image, and the reverse."""
    model = build_backbone("tiny-meter", None, 64).eval()
    ids = torch.randint(5, 64, (2, 10))
    mask = torch.ones_like(ids)
    pixels = torch.randn(2, 3, 64, 64)
    text, image = model.unimodal_cls(ids, mask, pixels)
    assert text.shape == image.shape == (2, model.hidden_size)
    text2, image2 = model.unimodal_cls(ids, mask, torch.randn(2, 3, 64, 64))
    assert torch.equal(text, text2) and not torch.allclose(image, image2)
    text3, image3 = model.unimodal_cls(torch.randint(5, 64, (2, 10)), mask, pixels)
    assert torch.equal(image, image3) and not torch.allclose(text, text3)


def test_contrast_trains_both_encoders_and_pretraining_records_it(tmp_path):
    """The contrastive loss sends gradient into the text and the vision encoder (what it is there to align), and
    pretraining METER records its final value; the single-stream ViLT has no separate encoders and records none."""
    spec = build_train_config(overrides={**TINY, "model": "tiny-meter", "data_path": str(tmp_path / "data")}).data_spec()
    model = build_backbone("tiny-meter", None, len(load_tokenizer(spec)))
    batch = next(iter(build_caption_loader(spec, batch_size=8, shuffle=False, max_text_len=24)))
    contrastive_loss(*model.unimodal_cls(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])).backward()
    for encoder in (model.text_encoder, model.vision_encoder):
        assert sum(p.grad.abs().sum().item() for p in encoder.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in model.cross_modal_text_layers.parameters())  # fusion is not involved

    meter = pretrain("tiny-meter", spec, tmp_path / "meter", steps=2, batch_size=8, progress=False)
    assert json.loads((meter / "pretrain.json").read_text())["final_itc_loss"] > 0
    vilt = pretrain("tiny-vilt", spec, tmp_path / "vilt", steps=1, batch_size=8, progress=False)
    assert json.loads((vilt / "pretrain.json").read_text())["final_itc_loss"] is None


def test_pretrained_backbone_travels_with_its_tokenizer_and_image_processor(tmp_path):
    """The cache entry holds the tokenizer and the family's image processor it was trained with, and a trial on it
    reads both from there (tiny-meter: CLIP's statistics)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from apt_ray.data.preprocess import CLIP_MEAN, CLIP_STD

    spec = build_train_config(overrides={**TINY, "model": "tiny-meter", "data_path": str(tmp_path / "data")}).data_spec()
    out = pretrain("tiny-meter", spec, tmp_path / "meter", steps=1, batch_size=8, progress=False)
    tokenizer, trained_with = AutoTokenizer.from_pretrained(str(out)), load_tokenizer(spec)
    assert tokenizer.get_vocab() == trained_with.get_vocab()
    processor = AutoImageProcessor.from_pretrained(str(out), backend="pil")
    assert list(processor.image_mean) == pytest.approx(CLIP_MEAN) and list(processor.image_std) == pytest.approx(CLIP_STD)
    trial = build_train_config(overrides={**TINY, "model": "tiny-meter", "data_path": str(tmp_path / "data")}).data_spec(pretrained_dir=out)
    assert trial.tokenizer == str(out) and trial.image_processor == str(out)
