"""Named backbones: paper-size presets and CPU-sized tiny ones, with their default input shapes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn
from transformers import PretrainedConfig, ViltConfig

from apt_ray.errors import UserError

TINY_VOCAB = 512  # the synthetic tokenizer's vocabulary fits; real presets use their own


@dataclass(frozen=True)
class Preset:
    """A backbone preset and the input shapes the paper (or the embedded default) uses."""

    name: str
    family: str  # "vilt" | "meter"
    text_len: int
    image_hw: tuple[int, int]
    patch_size: int
    make_config: Callable[[int | None, int | None], PretrainedConfig]  # (vocab_size, pad_token_id)
    description: str
    processor_size: int | None = None  # the image processor's size where it differs from image_hw[0]

    @property
    def image_size(self) -> int:
        """What the image processor resizes to: ViLT's shorter side, METER's crop."""
        return self.processor_size or self.image_hw[0]

    @property
    def image_tokens(self) -> int:
        """Image patches plus the image CLS token."""
        h, w = self.image_hw
        return (h // self.patch_size) * (w // self.patch_size) + 1


def _vilt_b32(vocab_size: int | None, pad_token_id: int | None = None) -> ViltConfig:
    # 40 text tokens; a 320x640 image at patch 32 gives exactly the paper's 200 patches.
    return ViltConfig(
        vocab_size=vocab_size or 30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, image_size=384, patch_size=32, max_position_embeddings=40, max_image_length=-1,
    )


def _tiny_vilt(vocab_size: int | None, pad_token_id: int | None = None) -> ViltConfig:
    return ViltConfig(
        vocab_size=vocab_size or TINY_VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=256, image_size=64, patch_size=8, max_position_embeddings=24, max_image_length=-1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def _meter_paper(vocab_size: int | None, pad_token_id: int | None = None) -> PretrainedConfig:
    from apt_ray.models.meter import meter_clip16_roberta_config

    return meter_clip16_roberta_config()


def _tiny_meter(vocab_size: int | None, pad_token_id: int | None = None) -> PretrainedConfig:
    from apt_ray.models.meter import tiny_meter_config

    return tiny_meter_config(vocab_size=vocab_size or TINY_VOCAB, pad_token_id=pad_token_id or 0)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("vilt-b32", "vilt", 40, (320, 640), 32, _vilt_b32,
               "ViLT-B/32 at the paper's VQA shapes (40 text + 200 patches + CLS); images: shorter side 384, longer at most 640",
               processor_size=384),
        Preset("tiny-vilt", "vilt", 24, (64, 64), 8, _tiny_vilt, "CPU-sized ViLT for the embedded default"),
        Preset("meter-clip16-roberta", "meter", 50, (384, 384), 16, _meter_paper, "METER (CLIP-ViT-B/16 + RoBERTa, 6 fusion layers), 50 text + 577 image tokens"),
        Preset("tiny-meter", "meter", 24, (64, 64), 8, _tiny_meter, "CPU-sized METER for the embedded default"),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown model '{name}': choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def _backbone_class(family: str) -> type[nn.Module]:
    if family == "vilt":
        from apt_ray.models.vilt import ViltBackbone

        return ViltBackbone
    from apt_ray.models.meter import MeterBackbone

    return MeterBackbone


def build_backbone(
    name: str,
    checkpoint: str | Path | None = None,
    vocab_size: int | None = None,
    config: PretrainedConfig | None = None,
    pad_token_id: int | None = None,
) -> nn.Module:
    """A backbone from a preset, optionally loading weights; ``config`` replaces the preset's shapes (random weights).

    ``vocab_size`` / ``pad_token_id``: the tokenizer's, for presets whose text side is sized by it (the tiny ones).

    ``checkpoint``: a transformers-format directory written by ``save_pretrained``,
    a hub id (needs internet), or for METER the official ``.ckpt``.
    """
    preset = get_preset(name)
    cls = _backbone_class(preset.family)
    if config is not None:
        return cls(config)
    if checkpoint is None:
        return cls(preset.make_config(vocab_size, pad_token_id))
    ckpt = Path(checkpoint)
    if preset.family == "meter" and ckpt.suffix == ".ckpt":
        from apt_ray.models.meter_convert import load_meter_checkpoint

        model = cls(preset.make_config(vocab_size, pad_token_id))
        load_meter_checkpoint(model, ckpt)
        return model
    looks_local = ckpt.exists() or str(checkpoint).startswith((".", "/", "~")) or str(checkpoint).count("/") != 1
    if looks_local and not ckpt.is_dir():
        raise UserError(
            f"checkpoint '{checkpoint}' does not exist or is not a directory: pass a directory written by "
            f"save_pretrained (config.json + weights){', or an official METER .ckpt file' if preset.family == 'meter' else ''}."
        )
    if ckpt.is_dir():
        check_model_type(ckpt, preset.family)
    try:
        return cls.from_pretrained(str(checkpoint))
    except UserError:
        raise
    except Exception as e:  # any loader failure here is a bad checkpoint, reported without a traceback
        raise UserError(
            f"could not load checkpoint '{checkpoint}' as a {preset.family} backbone ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Check that it is a {preset.family} checkpoint directory (config.json + model.safetensors), "
            "or a hub id reachable from this machine."
        ) from None


_MODEL_TYPES = {"vilt": "vilt", "meter": "apt_ray_meter"}


def checkpoint_config(name: str, checkpoint: str | Path | None) -> PretrainedConfig | None:
    """The backbone config a local checkpoint directory holds (None without one, or for a METER ``.ckpt``, whose
    weights must match the preset's shapes to load): what a trial trains when it differs from the preset."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser()
    if not (path / "config.json").is_file():
        return None
    family = get_preset(name).family
    check_model_type(path, family)
    if family == "vilt":
        return ViltConfig.from_pretrained(str(path))
    from apt_ray.models.meter import MeterConfig

    return MeterConfig.from_pretrained(str(path))


def check_model_type(directory: Path, family: str) -> None:
    """Refuse a checkpoint directory of another architecture before transformers half-loads it."""
    import json

    cfg = directory / "config.json"
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint directory '{directory}' has no readable config.json ({e}): pass a directory written by save_pretrained.") from None
    if model_type != _MODEL_TYPES[family]:
        raise UserError(
            f"checkpoint '{directory}' holds a '{model_type}' model, not a {family} backbone: "
            f"pick a {family} checkpoint or the model preset that matches this checkpoint."
        )
