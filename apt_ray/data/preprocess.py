"""Each backbone's own image processor (transformers' classes), loaded or built from a DataSpec.

ViLT uses `ViltImageProcessor` (shorter side to `image_size`, longer side capped at 1333/800 of
it, sides rounded down to a multiple of the patch size, mean/std 0.5, bicubic, batches padded to
their largest image with a `pixel_mask`); METER uses `CLIPImageProcessor` (shorter side to
`image_size`, centre crop `image_size` x `image_size`, CLIP's mean/std, bicubic).

The PIL/NumPy backend of each class is used on every machine: the authors' pipelines resize with
PIL too, and the pixels then do not depend on whether torchvision happens to be installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from apt_ray.errors import UserError

if TYPE_CHECKING:
    from transformers.image_processing_utils import BaseImageProcessor

    from apt_ray.data.spec import DataSpec

ProcessorFamily = Literal["vilt", "meter"]
CONFIG_NAME = "preprocessor_config.json"
VILT_MEAN = (0.5, 0.5, 0.5)
VILT_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_FIX = ("Set image_processor= to a folder written by an image processor's save_pretrained (it holds "
        f"{CONFIG_NAME}), to a hub id reachable from this machine, or leave it unset for the backbone's default.")


def default_image_processor(family: ProcessorFamily, image_size: int, patch_size: int = 32) -> BaseImageProcessor:
    """The family's processor at `image_size` (see the module docstring for the settings)."""
    from transformers.image_utils import PILImageResampling

    if family == "vilt":
        from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

        return ViltImageProcessorPil(
            do_resize=True, size={"shortest_edge": image_size}, size_divisor=patch_size,
            resample=PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=list(VILT_MEAN), image_std=list(VILT_STD), do_pad=True)
    if family == "meter":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(
            do_resize=True, size={"shortest_edge": image_size}, resample=PILImageResampling.BICUBIC,
            do_center_crop=True, crop_size={"height": image_size, "width": image_size},
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    raise UserError(f"processor_family={family!r} is not known; use 'vilt' or 'meter'.")


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut to `limit` characters, for a one-line error."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


def looks_like_path(value: str) -> bool:
    """True for strings that can only mean a local folder (a hub id is `name` or `owner/name`)."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value


def _load_from_folder(folder: Path) -> BaseImageProcessor:
    from transformers import AutoImageProcessor

    if not folder.is_dir():
        raise UserError(f"image_processor={str(folder)!r} is not a folder. {_FIX}")
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise UserError(f"image_processor={str(folder)!r} has no {CONFIG_NAME}. {_FIX}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
        return AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    except Exception as exc:  # bad JSON, unknown processor type, unreadable file...
        raise UserError(f"image_processor={str(folder)!r} could not be read ({first_line(exc)}). {_FIX}") from None


def load_image_processor(spec: DataSpec) -> BaseImageProcessor:
    """`spec.image_processor` (a save_pretrained folder or hub id), else the default of
    `spec.processor_family` at `spec.image_size`; raises UserError when it cannot be loaded."""
    if spec.image_processor is None:
        return default_image_processor(spec.processor_family, spec.image_size, spec.patch_size)
    value = spec.image_processor
    folder = Path(value).expanduser()
    if folder.exists() or looks_like_path(value):
        if not folder.exists():
            raise UserError(f"image_processor={value!r} does not exist. {_FIX}")
        return _load_from_folder(folder)
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(value, backend="pil")
    except Exception as exc:
        raise UserError(f"image_processor={value!r} is neither a local folder nor a hub id this machine can "
                        f"load ({first_line(exc)}). {_FIX}") from None


def target_edge(proc: BaseImageProcessor) -> int | None:
    """The output edge a processor targets: the crop height when it crops, else its shortest edge
    (or height)."""
    crop = dict(getattr(proc, "crop_size", None) or {})
    if getattr(proc, "do_center_crop", False) and crop.get("height"):
        return int(crop["height"])
    size = dict(getattr(proc, "size", None) or {})
    for key in ("shortest_edge", "height"):
        if size.get(key):
            return int(size[key])
    return None


def describe_image_processor(proc: BaseImageProcessor, source: str | None = None) -> dict[str, Any]:
    """What a trial logs about its image processor: class (or `source`, the folder or hub id it was
    loaded from), mean, std and the image edge it targets."""
    name = type(proc).__name__
    return {
        "image_processor": source or (name[:-3] if name.endswith("Pil") else name),
        "image_mean": [float(x) for x in np.atleast_1d(getattr(proc, "image_mean", []) or [])],
        "image_std": [float(x) for x in np.atleast_1d(getattr(proc, "image_std", []) or [])],
        "image_size": target_edge(proc),
    }


def resize_output_size(proc: BaseImageProcessor, height: int, width: int) -> tuple[int, int] | None:
    """(height, width) that `proc`'s resize step gives an image of this size, computed with the
    processor class's own size rule; None when the class is not one whose rule is known here."""
    from transformers.image_utils import ChannelDimension
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vilt import image_processing_pil_vilt as vilt

    size = dict(getattr(proc, "size", None) or {})  # a dict or a SizeDict (whose dict() drops unset keys)
    shorter = size.get("shortest_edge")
    if not shorter or {k for k, v in size.items() if v} != {"shortest_edge"}:
        return None
    probe = np.empty((3, height, width), dtype=np.uint8)  # only its shape is read
    if type(proc) is vilt.ViltImageProcessorPil:
        longer = int(vilt.MAX_LONGER_EDGE / vilt.MAX_SHORTER_EDGE * shorter)
        return vilt.get_resize_output_image_size(probe, shorter=shorter, longer=longer,
                                                 size_divisor=proc.size_divisor,
                                                 input_data_format=ChannelDimension.FIRST)
    if type(proc) is CLIPImageProcessorPil:
        from transformers.image_transforms import get_resize_output_image_size

        return tuple(get_resize_output_image_size(probe, size=shorter, default_to_square=False,
                                                  input_data_format=ChannelDimension.FIRST))
    return None
