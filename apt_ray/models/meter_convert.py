"""Load an official METER checkpoint (PyTorch Lightning ``.ckpt``) into :class:`MeterBackbone`.

Official key layout (METER repository, CLIP-ViT + RoBERTa variants):

* ``vit_model.visual.*`` -- OpenAI-CLIP vision tower (``conv1``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.{attn.in_proj_weight,
  attn.in_proj_bias, attn.out_proj, ln_1, mlp.c_fc, mlp.c_proj, ln_2}``, ``ln_post``).
  METER keeps all but the last CLIP block (11 of 12 for ViT-B/16). The unused text-tower
  leftovers of METER's CLIP wrapper (``vit_model.positional_embedding``, ``vit_model.ln_final``,
  ``vit_model.token_embedding``) are ignored.
* ``text_transformer.*`` -- a transformers ``RobertaModel`` (its pooler is unused, so ignored).
* ``cross_modal_{text,image}_transform``, ``token_type_embeddings``,
  ``cross_modal_{text,image}_layers.N.*``, ``cross_modal_{text,image}_pooler.dense`` -- the
  fusion part, whose names :class:`MeterBackbone` keeps.
* Task heads (``vqa_classifier``, ``mlm_score``, ``itm_score``, ``nlvr2_classifier``,
  ``snli_classifier``, ``rank_output``) -- returned in the report, not loaded.

The file is read with ``torch.load(..., weights_only=True)``: no code from the file runs.
Lightning files also pickle training metadata (hyper-parameters, callback states) whose
classes are not tensors; those globals are replaced by inert placeholders, and only
``state_dict`` is used.
"""

from __future__ import annotations

import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from apt_ray.errors import UserError
from apt_ray.models.meter import MeterBackbone

HEAD_PREFIXES = ("vqa_classifier.", "mlm_score.", "itm_score.", "nlvr2_classifier.", "snli_classifier.", "rank_output.")

# Checkpoint keys that are deliberately not used.
IGNORED_KEYS = frozenset({
    "vit_model.positional_embedding",  # METER's CLIP wrapper keeps these text-tower tensors; unused
    "vit_model.token_embedding.weight",
    "vit_model.ln_final.weight",
    "vit_model.ln_final.bias",
    "vit_model.text_projection",
    "vit_model.logit_scale",
    "vit_model.visual.proj",
    "text_transformer.pooler.dense.weight",  # RoBERTa's pooler: METER pools with its own poolers
    "text_transformer.pooler.dense.bias",
    "text_transformer.embeddings.position_ids",  # buffers persisted by older transformers
    "text_transformer.embeddings.token_type_ids",
})
_METRIC_STATE = re.compile(r"^(train|val|dev|test)_[A-Za-z0-9_]+\.")  # Lightning metric states, if persisted

_VISION = "vit_model.visual."
_CLIP_BLOCK = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_CLIP_TOP = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_FUSION_PREFIXES = (
    "cross_modal_text_transform.", "cross_modal_image_transform.", "cross_modal_text_layers.",
    "cross_modal_image_layers.", "cross_modal_text_pooler.", "cross_modal_image_pooler.",
)
POSITION_KEY = "vision_encoder.embeddings.position_embedding.weight"


@dataclass
class MeterLoadReport:
    """What :func:`load_meter_checkpoint` did.

    ``loaded``: model keys written; ``ignored``: checkpoint keys deliberately unused;
    ``heads``: task-head tensors under their official names (e.g. ``vqa_classifier.0.weight``);
    ``position_grid``: (grid before, grid after) when the CLIP position embedding was resized;
    ``notes``: other adaptations.
    """

    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    position_grid: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def head_keys(self) -> list[str]:
        return sorted(self.heads)

    def head_state(self, name: str) -> dict[str, torch.Tensor]:
        """One head's tensors with its prefix removed, e.g. ``head_state("vqa_classifier")``
        gives ``{"0.weight": ..., ...}`` ready for ``nn.Sequential.load_state_dict``."""
        prefix = name.rstrip(".") + "."
        return {k[len(prefix):]: v for k, v in self.heads.items() if k.startswith(prefix)}


# ------------------------------------------------------------------ reading


def _placeholder(path: str) -> type:
    """An inert stand-in for a pickled non-tensor global: building it yields a plain OrderedDict."""

    def __new__(cls: type, *args: Any, **kwargs: Any) -> OrderedDict:
        out: OrderedDict = OrderedDict()
        if len(args) == 1 and isinstance(args[0], dict):
            out.update(args[0])
        return out

    return type(f"Placeholder[{path}]", (), {"__new__": __new__, "__module__": __name__})


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with non-tensor globals of the file replaced by placeholders."""
    is_zip = zipfile.is_zipfile(path)
    placeholders: list[tuple[type, str]] = []
    finder: Callable[[str], list[str]] | None = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if is_zip and finder is not None:
        try:
            placeholders = [(_placeholder(name), name) for name in finder(str(path))]
        except Exception:  # noqa: BLE001 - a damaged file is reported by torch.load below
            placeholders = []
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": True}
    if is_zip:
        kwargs["mmap"] = True
    if placeholders:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(str(path), **kwargs)
    return torch.load(str(path), **kwargs)


def _short_reason(err: Exception) -> str:
    """The informative line of a loading error (torch's weights-only errors are long)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    useful = [ln for ln in lines if not ln.startswith(boilerplate)]
    for ln in useful:
        if "GLOBAL" in ln or "blocked" in ln:
            return ln[:200]
    return (useful[0] if useful else lines[0] if lines else "no details")[:200]


def read_meter_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a METER ``.ckpt`` (or of a plain saved state dict), safely loaded."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"METER checkpoint '{p}' does not exist. Download an official METER checkpoint "
            "(e.g. meter_clip16_288_roberta_pretrain.ckpt) and pass its local path."
        )
    try:
        obj = _torch_load(p)
    except Exception as err:  # noqa: BLE001 - every failure here means an unreadable file
        raise UserError(
            f"'{p}' could not be read as a PyTorch checkpoint ({type(err).__name__}: {_short_reason(err)}). "
            "The file is corrupt, truncated or not a torch.save file, or it holds objects that cannot be loaded "
            "safely; download it again, or re-save only its weights with torch.save({'state_dict': sd}, path)."
        ) from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise UserError(
            f"'{p}' holds a {type(obj).__name__}, not a checkpoint dict with a 'state_dict'. "
            "Pass an official METER .ckpt file (a PyTorch Lightning checkpoint)."
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(
            f"'{p}' has a state_dict whose entries are not all tensors (e.g. {bad[:3]}); "
            "it is not a model checkpoint. Pass an official METER .ckpt file."
        )
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------- mapping


def _resize_positions(pos: torch.Tensor, target: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Bicubic resize of a CLIP position table (1 + g*g, d) to ``target`` = 1 + G*G rows."""
    g0, g1 = round((pos.shape[0] - 1) ** 0.5), round((target - 1) ** 0.5)
    if g0 * g0 + 1 != pos.shape[0] or g1 * g1 + 1 != target:
        raise UserError(
            f"the checkpoint's CLIP position embedding has {pos.shape[0]} rows and the model needs {target}; "
            "one of them is not a square patch grid plus CLS, so it cannot be resized. Check image_size and patch_size."
        )
    d = pos.shape[1]
    grid = pos[1:].float().reshape(1, g0, g0, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g1, g1), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(g1 * g1, d).to(pos.dtype)
    return torch.cat([pos[:1], grid], dim=0), (g0, g1)


def _map_key(key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """Model keys (and tensors) for one official key; None when the key is not part of the backbone."""
    if key.startswith(_VISION):
        rest = key[len(_VISION):]
        if rest in _CLIP_TOP:
            return [("vision_encoder." + _CLIP_TOP[rest], value)]
        m = _RESBLOCK.match(rest)
        if m is None:
            return None
        base, leaf = f"vision_encoder.encoder.layers.{m.group(1)}.", m.group(2)
        if leaf in ("attn.in_proj_weight", "attn.in_proj_bias"):
            if value.shape[0] % 3:
                return None
            kind = "weight" if leaf.endswith("weight") else "bias"
            q, k, v = value.chunk(3, dim=0)  # nn.MultiheadAttention packs q, k, v in this order
            return [(f"{base}self_attn.{n}_proj.{kind}", t) for n, t in (("q", q), ("k", k), ("v", v))]
        return [(base + _CLIP_BLOCK[leaf], value)] if leaf in _CLIP_BLOCK else None
    if key.startswith("text_transformer.embeddings.") or key.startswith("text_transformer.encoder.layer."):
        return [("text_encoder." + key[len("text_transformer."):], value)]
    if key == "token_type_embeddings.weight" or key.startswith(_FUSION_PREFIXES):
        return [(key, value)]
    return None


def convert_meter_state_dict(
    official: dict[str, torch.Tensor], model: MeterBackbone, source: str = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], MeterLoadReport]:
    """Map an official METER state dict onto ``model``'s keys; raise :class:`UserError` on any mismatch."""
    if not any(k.startswith("cross_modal_") for k in official):
        sample = sorted(official)[:4]
        raise UserError(
            f"{source} is not a METER checkpoint: it has no cross_modal_* (co-attention) weights; its keys look like "
            f"{sample}. Pass an official METER checkpoint (CLIP-ViT + RoBERTa variant), or use the model family the file belongs to."
        )
    if any(k.startswith(("vit_model.layers.", "vit_model.patch_embed.")) for k in official):
        raise UserError(
            f"{source} is a METER checkpoint with a Swin Transformer image encoder; only the CLIP-ViT variants "
            "(e.g. meter_clip16_*_roberta_*.ckpt) are supported. Download a CLIP-ViT METER checkpoint."
        )
    report = MeterLoadReport()
    expected = {k: v for k, v in model.state_dict().items() if ".site_methods." not in k}
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in official.items():
        if key.startswith(HEAD_PREFIXES):
            report.heads[key] = value
            continue
        if key in IGNORED_KEYS or _METRIC_STATE.match(key):
            report.ignored.append(key)
            continue
        targets = _map_key(key, value)
        if targets is None:
            unexpected.append(key)
            continue
        for name, tensor in targets:
            mapped[name] = tensor

    shape_errors: list[str] = []
    for name, tensor in list(mapped.items()):
        if name not in expected:
            continue
        want = expected[name].shape
        if tensor.shape == want:
            continue
        if name == POSITION_KEY and tensor.dim() == 2 and tensor.shape[1] == want[1]:
            mapped[name], report.position_grid = _resize_positions(tensor, want[0])
            report.notes.append(f"CLIP position embedding resized from a {report.position_grid[0]}x{report.position_grid[0]} "
                                f"to a {report.position_grid[1]}x{report.position_grid[1]} patch grid (bicubic)")
        elif name == "token_type_embeddings.weight" and tensor.dim() == 2 and tensor.shape[0] > want[0] and tensor.shape[1] == want[1]:
            mapped[name] = tensor[: want[0]]  # NLVR2 checkpoints add a third modality row for the second image
            report.notes.append(f"token_type_embeddings: kept the first {want[0]} of {tensor.shape[0]} rows")
        else:
            shape_errors.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(want)}")

    unknown_targets = sorted(n for n in mapped if n not in expected)
    missing = sorted(k for k in expected if k not in mapped)
    if unexpected or unknown_targets or missing or shape_errors:
        parts = []
        if shape_errors:
            parts.append(f"{len(shape_errors)} shape mismatches (e.g. {shape_errors[:3]})")
        if missing:
            parts.append(f"{len(missing)} model weights missing from the checkpoint (e.g. {missing[:4]})")
        if unexpected or unknown_targets:
            extra = unexpected + unknown_targets
            parts.append(f"{len(extra)} checkpoint weights with no place in the model (e.g. {extra[:4]})")
        raise UserError(
            f"{source} does not fit this METER backbone: " + "; ".join(parts) + ". The checkpoint was trained with "
            "different shapes (layers, widths, vocabulary) than the model config; build the backbone with the matching "
            "preset (meter-clip16-roberta for the official CLIP-ViT-B/16 + RoBERTa-base checkpoints)."
        )
    state = {k: v.to(expected[k].dtype) for k, v in mapped.items()}
    report.loaded = sorted(state)
    return state, report


def load_meter_checkpoint(model: MeterBackbone, path: str | Path) -> MeterLoadReport:
    """Load an official METER ``.ckpt`` into ``model`` in place and report what happened.

    Raises :class:`UserError` for a missing or unreadable file, a checkpoint of another
    architecture, or weights whose names or shapes do not match the model's config.
    """
    official = read_meter_state_dict(path)
    state, report = convert_meter_state_dict(official, model, source=f"'{path}'")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return report
