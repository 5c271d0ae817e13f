"""The backbone and preset registry: which model names exist, what builds them, and what each one needs.

A backbone family registers its class with :func:`register_backbone` (a class decorator, like timm's
``@register_model``) and its named shapes with :func:`register_preset`, both in the backbone's own module::

    @register_backbone("vilt", model_type="vilt", processor="vilt", tokenizer="bert-base-uncased")
    class ViltBackbone(nn.Module): ...

    register_preset(Preset("tiny-vilt", "vilt", 24, (64, 64), 8, tiny_vilt_config, "CPU-sized ViLT",
                           self_pretrained=True))

Lookups (:func:`get_preset`, :func:`get_backbone`, :func:`preset_names`) first import the built-in backbone
modules (:data:`BUILTIN_BACKBONES`), once: importing this module costs nothing, and a CLI that only parses
arguments never imports a model. A backbone defined elsewhere (a plug-in, a test) registers on its own import.

Registering a name twice raises :class:`RegistryError` at import; an unknown name raises
:class:`~apt_ray.errors.UserError` listing the registered ones, with a did-you-mean.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from apt_ray.errors import UserError
from apt_ray.registries import Builtins, RegistryError, unknown_name

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PretrainedConfig

TINY_VOCAB = 512  # the synthetic tokenizer's vocabulary fits; real presets use their own

# Backbone family -> the module that registers it (and its presets), imported on the first lookup.
BUILTIN_BACKBONES: dict[str, str] = {"vilt": "apt_ray.models.vilt", "meter": "apt_ray.models.meter", "clip": "apt_ray.models.clip"}

T = TypeVar("T", bound=type)




@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone family: its class and what the rest of the code needs to know about it.

    ``model_type``: the ``model_type`` its ``save_pretrained`` directories carry in ``config.json`` (checked before
    loading, so that a directory of another architecture is refused with a clear message).
    ``processor``: the image processor family it is fed by (:func:`apt_ray.data.preprocess.default_image_processor`).
    ``tokenizer``: the hub id of the tokenizer it was pretrained with, named in errors (None: unknown).
    ``config_class``: its config class (``from_pretrained`` / ``from_dict``), by default ``cls.config_class``.
    ``file_checkpoints``: file suffix -> ``loader(model, path)`` for single-file checkpoints in a foreign format
    (METER: the official ``.ckpt``), loaded into a model built from the preset's config.
    """

    name: str
    cls: type
    model_type: str
    processor: str
    tokenizer: str | None = None
    config_class: type | None = None
    file_checkpoints: dict[str, Callable[[Any, Path], Any]] = field(default_factory=dict)

    def load_config(self, directory: str | Path) -> PretrainedConfig:
        """The config a ``save_pretrained`` directory holds."""
        if self.config_class is None:
            raise UserError(f"backbone '{self.name}' registers no config class, so a checkpoint's config cannot be read.")
        return self.config_class.from_pretrained(str(directory))

    def config_from_dict(self, data: dict[str, Any]) -> PretrainedConfig:
        if self.config_class is None:
            raise UserError(f"backbone '{self.name}' registers no config class, so a config cannot be rebuilt from JSON.")
        return self.config_class.from_dict(data)


@dataclass(frozen=True)
class Preset:
    """A backbone preset and the input shapes the paper (or the embedded default) uses.

    ``family``: the registered backbone it builds. ``make_config(vocab_size, pad_token_id)``: the backbone config
    (the tokenizer's sizes, for presets whose text side is sized by it; None: the preset's own).
    ``self_pretrained``: apt_ray pretrains it itself on the synthetic set (the tiny presets); the others need
    ``checkpoint=`` for real weights. ``meta_profile``: its forward runs on the meta device (shapes only, no
    data-dependent control flow), so FLOPs profiles need neither memory nor compute.
    """

    name: str
    family: str
    text_len: int
    image_hw: tuple[int, int]
    patch_size: int
    make_config: Callable[[int | None, int | None], PretrainedConfig]  # (vocab_size, pad_token_id)
    description: str
    processor_size: int | None = None  # the image processor's size where it differs from image_hw[0]
    self_pretrained: bool = False
    meta_profile: bool = False

    @property
    def image_size(self) -> int:
        """What the image processor resizes to: ViLT's shorter side, METER's crop."""
        return self.processor_size or self.image_hw[0]

    @property
    def image_tokens(self) -> int:
        """Image patches plus the image CLS token."""
        h, w = self.image_hw
        return (h // self.patch_size) * (w // self.patch_size) + 1

    def text_limit(self, config: PretrainedConfig | None = None) -> int | None:
        """The most text tokens the backbone takes: its text position embeddings, read from ``config`` (default: the
        preset's); None when the config does not say."""
        config = config if config is not None else self.make_config(None, None)
        text = getattr(config, "text_config", None)
        if isinstance(text, dict) and text.get("max_position_embeddings"):
            # a separate RoBERTa-style text encoder (METER): positions start after the padding index
            return int(text["max_position_embeddings"]) - int(text.get("pad_token_id") or 0) - 1
        limit = getattr(config, "max_position_embeddings", None)
        return int(limit) if limit else None

    @property
    def backbone(self) -> BackboneEntry:
        """The registered backbone family this preset builds."""
        return get_backbone(self.family)

    @property
    def processor(self) -> str:
        """The image processor family its backbone is fed by."""
        return self.backbone.processor


_BACKBONES: dict[str, BackboneEntry] = {}
_PRESETS: dict[str, Preset] = {}
_BUILTINS = Builtins(BUILTIN_BACKBONES.values())


def load_builtins() -> None:
    """Import the built-in backbone modules (once), which registers them and their presets."""
    _BUILTINS.load()


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def register_backbone(
    name: str,
    *,
    model_type: str,
    processor: str,
    tokenizer: str | None = None,
    config_class: type | None = None,
    file_checkpoints: dict[str, Callable[[Any, Path], Any]] | None = None,
) -> Callable[[T], T]:
    """Class decorator: register a backbone class (see :class:`apt_ray.models.backbone.Backbone`) under ``name``.

    The keywords are :class:`BackboneEntry`'s fields. Raises :class:`RegistryError` if ``name`` is taken.
    """

    def decorate(cls: T) -> T:
        if not _is_builtin(cls):
            load_builtins()  # a plug-in taking a built-in name fails at its own import, not at a later lookup
        if name in _BACKBONES:
            raise RegistryError(
                f"backbone '{name}' is already registered (by {_where(_BACKBONES[name].cls)}); "
                f"{_where(cls)} cannot register it again: give it another name."
            )
        _BACKBONES[name] = BackboneEntry(
            name, cls, model_type, processor, tokenizer, config_class or getattr(cls, "config_class", None),
            dict(file_checkpoints or {}),
        )
        cls.family = name  # what the backbone calls itself (e.g. in saved weights' metadata)
        return cls

    return decorate


def register_preset(preset: Preset) -> Preset:
    """Register a preset (by its name); returns it. Raises :class:`RegistryError` if the name is taken."""
    if not _is_builtin(preset.make_config):
        load_builtins()
    if preset.name in _PRESETS:
        raise RegistryError(
            f"preset '{preset.name}' is already registered (for backbone '{_PRESETS[preset.name].family}', config "
            f"{_where(_PRESETS[preset.name].make_config)}); {_where(preset.make_config)} cannot register it again: "
            "give the preset another name."
        )
    _PRESETS[preset.name] = preset
    return preset


def _is_builtin(obj: Any) -> bool:
    return getattr(obj, "__module__", None) in BUILTIN_BACKBONES.values()


def _unknown(kind: str, name: str, known: list[str]) -> UserError:
    return UserError(unknown_name(kind, name, known) + ".")


def preset_names() -> list[str]:
    """Every registered preset name, in registration order."""
    load_builtins()
    return list(_PRESETS)


def backbone_names() -> list[str]:
    """Every registered backbone family, in registration order."""
    load_builtins()
    return list(_BACKBONES)


def get_preset(name: str) -> Preset:
    """The preset ``name``; :class:`UserError` listing the registered ones (with a did-you-mean) if unknown."""
    if name not in _PRESETS:
        load_builtins()
    if name not in _PRESETS:
        raise _unknown("model", name, list(_PRESETS))
    return _PRESETS[name]


def get_backbone(family: str) -> BackboneEntry:
    """The registered backbone family ``family``; :class:`UserError` if unknown."""
    if family not in _BACKBONES:
        if family in BUILTIN_BACKBONES:
            importlib.import_module(BUILTIN_BACKBONES[family])
        else:
            load_builtins()
    if family not in _BACKBONES:
        raise _unknown("backbone", family, list(_BACKBONES))
    return _BACKBONES[family]


def unregister(name: str) -> None:
    """Remove a preset and/or backbone family named ``name`` (for tests and notebooks that redefine one)."""
    _PRESETS.pop(name, None)
    _BACKBONES.pop(name, None)
