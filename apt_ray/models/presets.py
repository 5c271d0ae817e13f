"""Named backbones: building a registered preset, loading its checkpoints, reading their configs.

The presets themselves (paper-size and CPU-sized tiny ones, with their default input shapes) are registered next
to their backbone classes (:mod:`apt_ray.models.vilt`, :mod:`apt_ray.models.meter`) through
:mod:`apt_ray.models.registry`; a plug-in backbone registers the same way. Importing this module imports neither
torch nor a backbone: the first lookup does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from apt_ray.errors import UserError
from apt_ray.models.registry import TINY_VOCAB, BackboneEntry, Preset, get_backbone, get_preset, preset_names

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

__all__ = ["TINY_VOCAB", "Preset", "build_backbone", "check_model_type", "checkpoint_config", "get_preset", "preset_names"]


def __getattr__(attr: str) -> Any:
    if attr == "PRESETS":  # live: every registered preset by name
        return {name: get_preset(name) for name in preset_names()}
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def build_backbone(
    name: str,
    checkpoint: str | Path | None = None,
    vocab_size: int | None = None,
    config: PretrainedConfig | None = None,
    pad_token_id: int | None = None,
) -> nn.Module:
    """A backbone from a preset, optionally loading weights; ``config`` replaces the preset's shapes (random weights).

    ``vocab_size`` / ``pad_token_id``: the tokenizer's, for presets whose text side is sized by it (the tiny ones).

    ``checkpoint``: a transformers-format directory written by ``save_pretrained``, a hub id (needs internet),
    or a single file of a format the backbone registers (METER: the official ``.ckpt``).
    """
    preset = get_preset(name)
    entry = preset.backbone
    cls = entry.cls
    if config is not None:
        return cls(config)
    if checkpoint is None:
        return cls(preset.make_config(vocab_size, pad_token_id))
    ckpt = Path(checkpoint)
    loader = entry.file_checkpoints.get(ckpt.suffix)
    if loader is not None:
        model = cls(preset.make_config(vocab_size, pad_token_id))
        loader(model, ckpt)
        return model
    looks_local = ckpt.exists() or str(checkpoint).startswith((".", "/", "~")) or str(checkpoint).count("/") != 1
    if looks_local and not ckpt.is_dir():
        files = "".join(f", or a {entry.name} {suffix} file" for suffix in entry.file_checkpoints)
        raise UserError(
            f"checkpoint '{checkpoint}' does not exist or is not a directory: pass a directory written by "
            f"save_pretrained (config.json + weights){files}."
        )
    if ckpt.is_dir():
        check_model_type(ckpt, entry.name)
    try:
        return cls.from_pretrained(str(checkpoint))
    except UserError:
        raise
    except Exception as e:  # any loader failure here is a bad checkpoint, reported without a traceback
        raise UserError(
            f"could not load checkpoint '{checkpoint}' as a {entry.name} backbone ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Check that it is a {entry.name} checkpoint directory (config.json + model.safetensors), "
            "or a hub id reachable from this machine."
        ) from None


def checkpoint_config(name: str, checkpoint: str | Path | None) -> PretrainedConfig | None:
    """The backbone config a local checkpoint directory holds (None without one, or for a single-file checkpoint
    such as METER's ``.ckpt``, whose weights must match the preset's shapes to load): what a trial trains when it
    differs from the preset."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser()
    if not (path / "config.json").is_file():
        return None
    entry = get_preset(name).backbone
    check_model_type(path, entry.name)
    return entry.load_config(path)


def check_model_type(directory: Path, family: str) -> None:
    """Refuse a checkpoint directory of another architecture before transformers half-loads it."""
    import json

    entry: BackboneEntry = get_backbone(family)
    cfg = Path(directory) / "config.json"
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint directory '{directory}' has no readable config.json ({e}): pass a directory written by save_pretrained.") from None
    if model_type != entry.model_type:
        raise UserError(
            f"checkpoint '{directory}' holds a '{model_type}' model, not a {family} backbone: "
            f"pick a {family} checkpoint or the model preset that matches this checkpoint."
        )
