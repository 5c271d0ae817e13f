"""Where a trial's text tokenizer and image processor come from: the backbone's own.

Order: an explicit ``tokenizer=`` / ``image_processor=`` key; else the checkpoint's (a ``save_pretrained``
directory holds both next to the weights; a hub id names them too); else, for a self-pretrained tiny backbone,
the ones saved with it. A METER ``.ckpt`` holds no tokenizer, so it needs ``tokenizer=``. Without any source
the data side uses the synthetic set's own tokenizer and the family's standard image processor.
"""

from __future__ import annotations

from pathlib import Path

from apt_ray.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
PROCESSOR_FILE = "preprocessor_config.json"


def family_tokenizer(family: str) -> str | None:
    """The tokenizer a backbone family was pretrained with (its registered ``tokenizer``): what a user should pass
    when a checkpoint has none."""
    from apt_ray.models.registry import get_backbone

    try:
        return get_backbone(family).tokenizer
    except UserError:
        return None


def has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any((directory / f).is_file() for f in TOKENIZER_FILES)


def has_image_processor(directory: Path) -> bool:
    return (directory / PROCESSOR_FILE).is_file()


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") != 1


def resolve_tokenizer(family: str, checkpoint: str | None, tokenizer: str | None, pretrained_dir: Path | None) -> str | None:
    """The tokenizer's directory or hub id, or None (the synthetic set's own / one built over the questions)."""
    if tokenizer:
        return tokenizer
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if path.suffix == ".ckpt":
            raise UserError(
                f"checkpoint '{checkpoint}' is a METER .ckpt, which holds no tokenizer: pass tokenizer={family_tokenizer('meter')} "
                "(a hub id) or tokenizer=<directory with RoBERTa's tokenizer files>, the tokenizer METER's text encoder was trained with."
            )
        if not _is_local(checkpoint):
            return checkpoint  # a hub id names its tokenizer too
        if not path.exists():
            raise UserError(f"checkpoint '{checkpoint}' does not exist: pass a directory written by save_pretrained "
                            "(config.json + weights), an official METER .ckpt file, or a hub id.")
        if path.is_dir():
            from apt_ray.models.presets import check_model_type

            check_model_type(path, family)  # another architecture's directory: say that, not "no tokenizer"
        if has_tokenizer(path):
            return str(path)
        raise UserError(
            f"checkpoint directory '{checkpoint}' has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass "
            f"tokenizer=<directory or hub id> ({family_tokenizer(family) or 'the one the checkpoint was trained with'} for {family}), "
            "or save the tokenizer into the checkpoint directory with save_pretrained."
        )
    if pretrained_dir is not None and has_tokenizer(pretrained_dir):
        return str(pretrained_dir)
    return None


def resolve_image_processor(checkpoint: str | None, image_processor: str | None, pretrained_dir: Path | None) -> str | None:
    """The image processor's directory or hub id, or None (the family's standard processor at the trial's size)."""
    if image_processor:
        return image_processor
    for candidate in (checkpoint, pretrained_dir):
        if candidate is not None and _is_local(str(candidate)) and has_image_processor(Path(candidate).expanduser()):
            return str(Path(candidate).expanduser())
    return None
