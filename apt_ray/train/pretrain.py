"""Pretraining of the tiny backbones on synthetic captions: masked language modelling + image-text matching,
and for two-stream backbones (METER) image-text contrast between their encoders (ALBEF's "align before fuse").

The embedded default needs a backbone that already links words to pixels, or
prompt tuning on top of it would show nothing. METER starts from CLIP, whose
encoders are aligned already; the tiny METER starts from random encoders, and
with MLM and ITM alone its matching head stays near chance after 600 steps
(validation matching accuracy 0.48), while the contrastive term brings it to 0.95
in the same number of steps. Dual encoders (CLIP, ``backbone.pretraining == "itc"``) train with CLIP's own
objective alone, the image-text contrast of ``CLIPModel``. ``ensure_pretrained`` builds one
on first use (reproducibly from its seed) and caches it; concurrent callers
wait on a file lock, and the cache entry is written aside then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn
from tqdm.auto import tqdm

from apt_ray.data.build import build_caption_loader, ensure_synthetic, load_tokenizer
from apt_ray.data.preprocess import load_image_processor
from apt_ray.data.spec import DataSpec
from apt_ray.errors import UserError
from apt_ray.models.presets import build_backbone, get_preset, preset_names
from apt_ray.train.schedule import warmup_then_decay

# Part of the cache key: a cached backbone of another version is rebuilt. Version 4 is tiny-meter without dropout,
# image-text contrast for two-stream backbones, and each family's own image processor (tiny-meter: CLIP's
# mean/std), saved with the weights together with the tokenizer.
PRETRAIN_VERSION = 4
DEFAULT_STEPS = 600
MLM_PROB = 0.15
ITC_TEMPERATURE = 0.07


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, temperature: float = ITC_TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE between (B, d) text and image embeddings; row i of each is the matching pair."""
    text, image = nn.functional.normalize(text, dim=-1), nn.functional.normalize(image, dim=-1)
    logits = text @ image.T / temperature
    target = torch.arange(text.shape[0], device=text.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


class PretrainHeads(nn.Module):
    """MLM over text states and a 2-way matching head over pooled features."""

    def __init__(self, hidden: int, pooled: int, vocab: int) -> None:
        super().__init__()
        self.mlm = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, vocab))
        self.itm = nn.Linear(pooled, 2)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of ``MLM_PROB`` of the real tokens (never [CLS]/[SEP]/[PAD]); labels -100 elsewhere."""
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for tid in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        if tid is not None:
            special |= input_ids == tid
    candidates = attention_mask.bool() & ~special
    chosen = (torch.rand(input_ids.shape, generator=generator) < MLM_PROB) & candidates
    # at least one masked token per caption, so every example teaches something
    none = ~chosen.any(dim=1) & candidates.any(dim=1)
    if none.any():
        first = candidates.float().argmax(dim=1)
        chosen[none, first[none]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    masked = input_ids.clone()
    masked[chosen] = tokenizer.mask_token_id
    return masked, labels


def pretrain(model: str, spec: DataSpec, out_dir: str | Path, steps: int = DEFAULT_STEPS, batch_size: int = 64,
             lr: float = 1e-3, seed: int = 0, progress: bool = True,
             device: str | torch.device = "cpu") -> Path:
    """Pretrain ``model`` (a tiny preset) for ``steps`` and ``save_pretrained`` it into ``out_dir`` atomically.

    Runs in fp32 on ``device``; masks and mismatched pairs are drawn on the CPU from ``seed`` (dropout uses
    the device's generator, so a GPU run is reproducible on its own device, not bitwise equal to a CPU run).
    """
    preset = get_preset(model)
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(seed)
    device = torch.device(device)
    backbone = build_backbone(model, None, len(tokenizer))
    if getattr(backbone, "pretraining", None) == "itc":
        return pretrain_itc(backbone, model, spec, tokenizer, out_dir, steps=steps, batch_size=batch_size, lr=lr,
                            seed=seed, progress=progress, device=device)
    heads = PretrainHeads(backbone.hidden_size, backbone.pooled_size, len(tokenizer))
    backbone.to(device)
    heads.to(device)
    loader = build_caption_loader(spec, batch_size=batch_size, max_text_len=preset.text_len)
    params = list(backbone.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = warmup_then_decay(optimizer, steps // 10, steps, "cosine")
    generator = torch.Generator().manual_seed(seed)
    contrast = getattr(backbone, "unimodal_cls", None)  # two-stream backbones only
    backbone.train()
    bar = tqdm(total=steps, desc=f"pretraining {model} (MLM+ITM{'' if contrast is None else '+ITC'})", disable=not progress, unit="step")
    for batch in _batches(loader, steps):
        ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        b = ids.shape[0]
        itc = None
        if contrast is not None:  # on the true pairs, before masking and mismatching
            itc = contrastive_loss(*contrast(ids.to(device), mask.to(device), pixels.to(device)))
        # image-text matching: half the pairs get another example's image
        mismatched = torch.rand(b, generator=generator) < 0.5
        shift = torch.randint(1, max(b, 2), (1,), generator=generator).item()
        pixels = torch.where(mismatched[:, None, None, None], pixels.roll(shift, 0), pixels)
        masked, labels = mask_tokens(ids, mask, tokenizer, generator)
        labels[mismatched] = -100  # MLM only where the image matches the caption
        masked, mask, pixels, labels = masked.to(device), mask.to(device), pixels.to(device), labels.to(device)
        out = backbone.encode(masked, mask, pixels)
        mlm = nn.functional.cross_entropy(heads.mlm(out.text_states).flatten(0, 1), labels.flatten(), ignore_index=-100)
        itm = nn.functional.cross_entropy(heads.itm(out.pooled), mismatched.long().to(device))
        _update(mlm + itm if itc is None else mlm + itm + itc, optimizer, scheduler, params)
        bar.update(1)
        bar.set_postfix(mlm=f"{mlm.item():.3f}", itm=f"{itm.item():.3f}", **({} if itc is None else {"itc": f"{itc.item():.3f}"}))
    bar.close()
    return _save(backbone, tokenizer, spec, out_dir, {"model": model, "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
                                                       "device": device.type,
                                                       "final_mlm_loss": mlm.item(), "final_itm_loss": itm.item(),
                                                       "final_itc_loss": None if itc is None else itc.item(), "version": PRETRAIN_VERSION})


def _batches(loader: Any, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches from ``loader``, epoch after epoch (each epoch in its seeded order)."""
    step, epoch = 0, 0
    while step < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch
            step += 1
            if step >= steps:
                return
        epoch += 1


def _update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any, params: list[nn.Parameter]) -> None:
    """One optimiser step on ``loss`` (gradients clipped to norm 1)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()


def _save(backbone: nn.Module, tokenizer, spec: DataSpec, out_dir: str | Path, record: dict) -> Path:
    """``save_pretrained`` the backbone, its tokenizer and image processor and ``pretrain.json`` (``record``) into
    ``out_dir``: written aside, then renamed into place."""
    final = Path(out_dir)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.cpu().save_pretrained(tmp)
    tokenizer.save_pretrained(str(tmp))  # the backbone's own preprocessing travels with it
    load_image_processor(spec).save_pretrained(str(tmp))
    (tmp / "pretrain.json").write_text(json.dumps(record))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def pretrain_itc(backbone: nn.Module, model: str, spec: DataSpec, tokenizer, out_dir: str | Path, *, steps: int,
                 batch_size: int, lr: float, seed: int, progress: bool, device: str | torch.device) -> Path:
    """Dual-encoder pretraining (CLIP): the symmetric image-text contrastive loss of ``CLIPModel`` (learnable
    temperature) on the synthetic captions, in-batch negatives, nothing else; saved like :func:`pretrain`."""
    device = torch.device(device)
    backbone.to(device)
    loader = build_caption_loader(spec, batch_size=batch_size, max_text_len=get_preset(model).text_len)
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = warmup_then_decay(optimizer, steps // 10, steps, "cosine")
    backbone.train()
    bar = tqdm(total=steps, desc=f"pretraining {model} (ITC)", disable=not progress, unit="step")
    for batch in _batches(loader, steps):
        out = backbone.clip(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            pixel_values=batch["pixel_values"].to(device), return_loss=True)
        _update(out.loss, optimizer, scheduler, params)
        bar.update(1)
        bar.set_postfix(itc=f"{out.loss.item():.3f}")
    bar.close()
    return _save(backbone, tokenizer, spec, out_dir, {"model": model, "steps": steps, "seed": seed, "batch_size": batch_size,
                                                      "lr": lr, "device": device.type, "objective": "itc",
                                                      "final_itc_loss": out.loss.item(), "version": PRETRAIN_VERSION})


def pretrained_dir(model: str, spec: DataSpec, steps: int = DEFAULT_STEPS, seed: int = 0,
                   device: str | torch.device = "cpu") -> Path:
    """The cache entry of one pretraining. A backbone built on a GPU gets its own entry (``-cuda``): the same seed
    gives the same weights on the same kind of device only, so a cache never mixes the two."""
    data = ensure_synthetic(spec)
    kind = torch.device(device).type
    suffix = "" if kind == "cpu" else f"-{kind}"
    return spec.cache_root() / "pretrained" / f"{model}-v{PRETRAIN_VERSION}-{data.name}-steps{steps}-seed{seed}{suffix}"


def default_steps(model: str) -> int:
    """Pretraining steps of ``model`` when none are given: its backbone class's ``pretrain_steps``, else
    :data:`DEFAULT_STEPS`."""
    return int(getattr(get_preset(model).backbone.cls, "pretrain_steps", DEFAULT_STEPS))


def ensure_pretrained(model: str, spec: DataSpec, steps: int | None = None, seed: int = 0, progress: bool = True,
                      device: str | torch.device = "cpu") -> Path:
    """The cached pretrained backbone for ``model`` on the synthetic set of ``spec``; built on first use (on ``device``).
    ``steps``: default the backbone class's ``pretrain_steps`` if it sets one, else :data:`DEFAULT_STEPS`."""
    if not get_preset(model).self_pretrained:
        ours = ", ".join(n for n in preset_names() if get_preset(n).self_pretrained)
        raise UserError(f"only the tiny presets ({ours}) are pretrained by apt_ray; for {model} pass checkpoint=... "
                        "(a transformers directory, hub id or METER .ckpt).")
    if steps is None:
        steps = default_steps(model)
    spec = spec.model_copy(update={"world_size": 1, "rank": 0})
    target = pretrained_dir(model, spec, steps, seed, device)
    if (target / "pretrain.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "pretrain.json").is_file():
            pretrain(model, spec, target, steps=steps, seed=seed, progress=progress, device=device)
    return target
