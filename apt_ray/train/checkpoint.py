"""Trial checkpoints: trainable parameters only, optimiser, scheduler, RNG and position.

Weights are safetensors, split into the method's (``method.safetensors``,
reusable on another task) and the task head's (``head.safetensors``); everything
else loads with ``torch.load(weights_only=True)``.
A checkpoint directory is written aside and renamed into place, so a crash never
leaves a half-written one that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from apt_ray.errors import UserError

METHOD_WEIGHTS = "method.safetensors"
HEAD_WEIGHTS = "head.safetensors"
STATE = "training_state.pt"
META = "meta.json"


def trainable_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Only what training changes (parameters with ``requires_grad``): the method's, then the head's."""
    method, head = {}, {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            (head if n.startswith("head.") else method)[n] = p.detach().cpu().contiguous()
    return method, head


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, meta: dict[str, Any]) -> Path:
    """Write a checkpoint to ``directory`` atomically (aside, then rename)."""
    final = Path(directory)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    method, head = trainable_state(model)
    save_file(method, str(tmp / METHOD_WEIGHTS))
    save_file(head, str(tmp / HEAD_WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / STATE)
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def is_checkpoint(directory: str | Path) -> bool:
    d = Path(directory)
    return all((d / f).is_file() for f in (METHOD_WEIGHTS, HEAD_WEIGHTS, STATE, META))


def read_meta(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's meta alone (what must be known before its weights load, e.g. a pruned method's kept rows);
    empty when it cannot be read (``load_checkpoint`` then says why)."""
    try:
        return json.loads((Path(directory) / META).read_text())
    except (OSError, ValueError):
        return {}


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore a checkpoint into ``model`` (and optimiser/scheduler/RNG); returns its meta."""
    d = Path(directory)
    if not is_checkpoint(d):
        raise UserError(f"'{d}' is not an apt_ray checkpoint (needs {METHOD_WEIGHTS}, {HEAD_WEIGHTS}, {STATE} and {META}): pass a checkpoint directory.")
    try:
        weights = {**load_file(str(d / METHOD_WEIGHTS)), **load_file(str(d / HEAD_WEIGHTS))}
        state = torch.load(d / STATE, map_location="cpu", weights_only=True)
        meta = json.loads((d / META).read_text())
    except Exception as e:  # a corrupt file is the user's to fix, not a crash
        raise UserError(f"checkpoint '{d}' is corrupt ({type(e).__name__}: {e}): resume from another checkpoint.") from None
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise UserError(
            f"checkpoint '{d}' was written for another model or method (missing {missing}, unexpected {extra}): "
            "resume with the same model, method and knobs that wrote it."
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return meta


def method_size_bytes(directory: str | Path) -> int:
    """Size of the method's own weights in a checkpoint."""
    return (Path(directory) / METHOD_WEIGHTS).stat().st_size
