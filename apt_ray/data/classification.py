"""Image classification data: a synthetic set of scenes around one dominant object, and a reader for any
`datasets` folder (``save_to_disk``, an imagefolder, a hub id) with ``image`` and ``label`` columns.

Synthetic classes are colour-shape pairs ("red circle"): each image holds one large object of its class and 0-2
small objects of other pairs, so the class is the scene's largest object. Labels are balanced (every class the
same count, +-1) and the set is a function of its seed; it is written with `datasets` (``label`` a ``ClassLabel``
with the class names) into the cache, aside first and renamed when whole.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from apt_ray.data.collate import CollateOutput, ImageBatcher
from apt_ray.data.loaders import CountingLoader, make_loader
from apt_ray.data.preprocess import describe_image_processor
from apt_ray.data.scenes import COLORS, GRID, MIN_SCENE_SIZE, SHAPES, Scene, SceneObject, encode_png, render_scene
from apt_ray.data.synthetic import COMPLETE_MARKER, build_once, datasets_bars
from apt_ray.data.spec import ARROW_KINDS, DataSpec
from apt_ray.data.stats import BatchCounts, DataStats
from apt_ray.data.vqav2 import image_to_bytes, open_hf_dataset, pick_split
from apt_ray.errors import UserError

GENERATOR_VERSION = 1
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
MAX_DISTRACTORS = 2
_LARGE, _SMALL = 0.42, 0.22  # half-extent as a fraction of a grid cell (scenes.py draws "large" at 0.42)
PROMPT_TEMPLATES = {"synthetic": "a {}", "real": "a photo of a {}."}  # the latter: CLIP's ImageNet prompt


def _object(rng: np.random.Generator, name: str, cell: int, size: int, large: bool) -> SceneObject:
    color, shape = name.split(" ")
    side = size / GRID
    radius = (_LARGE if large else _SMALL) * side
    slack = max(0.0, side / 2 - radius - 1.0)
    jx, jy = rng.uniform(-slack, slack, size=2)
    row, col = divmod(cell, GRID)
    return SceneObject(color, shape, "large" if large else "small", row, col,
                       (col + 0.5) * side + float(jx), (row + 0.5) * side + float(jy), radius)


def class_scene(rng: np.random.Generator, label: int, size: int) -> Scene:
    """A scene whose largest object is class ``label``, with 0-2 small objects of other classes."""
    if size < MIN_SCENE_SIZE:
        raise ValueError(f"scene size must be at least {MIN_SCENE_SIZE} pixels, got {size}")
    count = 1 + int(rng.integers(0, MAX_DISTRACTORS + 1))
    cells = [int(c) for c in rng.choice(GRID * GRID, size=count, replace=False)]
    others = [i for i in range(len(CLASS_NAMES)) if i != label]
    objects = [_object(rng, CLASS_NAMES[label], cells[0], size, True)]
    objects += [_object(rng, CLASS_NAMES[int(rng.choice(others))], c, size, False) for c in cells[1:]]
    return Scene(objects=tuple(objects), background=int(rng.integers(15, 60)), size=size)


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """``n`` labels, each class ``n // num_classes`` or one more times, in a seeded random order."""
    return rng.permutation(np.arange(n) % num_classes)


def synthetic_dir(spec: DataSpec) -> Path:
    """The cache folder of the synthetic classification set that ``spec`` describes."""
    return (spec.cache_root() / "classification" /
            f"scenes-v{GENERATOR_VERSION}-seed{spec.synthetic_seed}-n{spec.num_train}-{spec.num_val}-px{spec.render_size}")


def _write(tmp: Path, sizes: Mapping[str, int], image_size: int, seed: int) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    features = Features({"image": Image(), "label": ClassLabel(names=list(CLASS_NAMES)), "caption": Value("string")})
    splits = {}
    for index, (split, n) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, 1000 + index])  # 1000+: apart from the VQA set's split streams
        labels = balanced_labels(rng, n, len(CLASS_NAMES))
        cols: dict[str, list[Any]] = {"image": [], "label": [], "caption": []}
        for label in labels:
            scene = class_scene(rng, int(label), image_size)
            cols["image"].append({"bytes": encode_png(render_scene(scene)), "path": None})
            cols["label"].append(int(label))
            cols["caption"].append(f"a {scene.objects[0].phrase()}")
        splits[split] = Dataset.from_dict(cols, features=features)
    with datasets_bars():
        DatasetDict(splits).save_to_disk(str(tmp))
    meta = {"generator": "apt_ray.classification", "version": GENERATOR_VERSION, "seed": seed,
            "image_size": image_size, "splits": dict(sizes), "classes": list(CLASS_NAMES)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def ensure_synthetic_classification(spec: DataSpec) -> Path:
    """Generate the synthetic classification set of ``spec`` unless cached; its folder."""
    return build_once(synthetic_dir(spec),
                      lambda tmp: _write(tmp, {"train": spec.num_train, "val": spec.num_val}, spec.render_size, spec.synthetic_seed),
                      lambda folder: (folder / COMPLETE_MARKER).is_file())


# ---------------------------------------------------------------------------------------------- reading


def class_names(dataset: Any, where: str) -> list[str]:
    """The class names of a split: its ``ClassLabel`` names, else the label ids as text; UserError without ``label``."""
    from datasets import ClassLabel

    columns = list(dataset.column_names)
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise UserError(
            f"The classification data at {where} has no {' or '.join(repr(c) for c in missing)} column (its columns: "
            f"{', '.join(columns)}). The classification task reads an 'image' column and an integer 'label' column "
            "(a ClassLabel gives the class names): rename the columns (datasets' rename_column) or point data_path "
            "at an image folder (one subfolder per class)."
        )
    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    labels = dataset["label"]
    if any(not isinstance(v, (int, np.integer)) or v < 0 for v in labels):
        raise UserError(f"The 'label' column at {where} must hold class ids 0..C-1 (integers), got e.g. {labels[:3]}: "
                        "cast it to a ClassLabel (datasets' class_encode_column).")
    return [str(i) for i in range(max(labels, default=-1) + 1)]


class ClassificationDataset(Dataset):
    """One split as {'image': encoded bytes, 'label': int} examples."""

    def __init__(self, dataset: Any) -> None:
        from datasets import Image

        if isinstance(dataset.features.get("image"), Image):
            dataset = dataset.cast_column("image", Image(decode=False))
        self.dataset = dataset.select_columns(["image", "label"])
        self.labels = [int(v) for v in self.dataset["label"]]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": image_to_bytes(self.dataset[index]["image"]), "label": self.labels[index]}


class ClassificationCollator:
    """Examples -> pixel_values (B, 3, H, W) through the backbone's image processor, labels (B,) long."""

    def __init__(self, image_processor: Any) -> None:
        self.images = ImageBatcher(image_processor)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> CollateOutput:
        pixels, ok = self.images([ex["image"] for ex in examples])
        labels = [int(ex["label"]) for ex, good in zip(examples, ok) if good]
        batch = {**pixels, "labels": torch.tensor(labels, dtype=torch.long)}
        return CollateOutput(batch, BatchCounts(len(examples), ok.count(False), 0))


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(correct, count): examples whose highest logit is their label (ties go to the lower class id)."""
    return float((logits.argmax(dim=-1) == labels).sum().item()), float(labels.numel())


@dataclass
class ClassificationData:
    """What the classification task builds: loaders, tokenizer (class prompts, backbone sizing), class names."""

    train_loader: CountingLoader
    val_loader: CountingLoader
    tokenizer: Any
    spec: DataSpec
    class_names: list[str]
    prompts: list[str]
    majority_baseline: float  # % of val examples in the train split's most frequent class
    location: str = ""
    image_processor: Any = None
    stats: dict[str, DataStats] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image_processor_info(self) -> dict[str, Any]:
        return describe_image_processor(self.image_processor, self.spec.image_processor)


def _subset(dataset: Any, limit: int | None, seed: int) -> Any:
    if limit is None or limit >= dataset.num_rows:
        return dataset
    picked = np.random.default_rng(seed).choice(dataset.num_rows, size=limit, replace=False)
    return dataset.select(sorted(int(i) for i in picked))


def _open_quietly(where: str) -> Mapping[str, Any]:
    """``open_hf_dataset`` without datasets' progress bars (a refused run prints its one error line only)."""
    with datasets_bars():
        return open_hf_dataset(where)


def _tokenizer(spec: DataSpec, texts: list[str]) -> Any:
    """The named tokenizer (a checkpoint's, the self-pretrained backbone's), else a WordLevel one over ``texts``."""
    from apt_ray.data.build import load_tokenizer
    from apt_ray.data.tokenizer import build_wordlevel_tokenizer

    if spec.tokenizer:
        return load_tokenizer(spec)
    return build_wordlevel_tokenizer(texts)


def build_classification_data(spec: DataSpec) -> ClassificationData:
    """Loaders over ``spec``'s classification data: the synthetic set, or a `datasets` folder / hub id (``hf``)."""
    from apt_ray.data.build import load_processor_for

    if spec.kind in ARROW_KINDS:
        raise UserError("The classification task reads no arrow files: use data=synthetic, or data=hf with data_path "
                        "set to a datasets folder (save_to_disk), an image folder or a hub id with image and label.")
    processor = load_processor_for(spec)
    if spec.kind == "synthetic":
        where = str(ensure_synthetic_classification(spec))
    elif not spec.path:
        raise UserError("data=hf needs data_path: a datasets folder (save_to_disk), an image folder (one subfolder "
                        "per class) or a hub id, with 'image' and 'label' columns.")
    else:
        local = Path(spec.path).expanduser()
        where = str(local.resolve()) if local.exists() else spec.path  # datasets reads relative folders as hub names
    splits = _open_quietly(where)
    train = pick_split(splits, spec.train_splits[0], where)
    names = class_names(train, where)
    val = pick_split(splits, spec.val_split, where)
    class_names(val, where)
    train = _subset(train, spec.max_train_questions, spec.seed)
    val = _subset(val, spec.max_val_questions, spec.seed + 1)
    for split, ds in (("train", train), ("val", val)):
        if ds.num_rows == 0:
            raise UserError(f"The {split} split at {where} is empty: point data_path at a dataset with examples there.")
    template = PROMPT_TEMPLATES["synthetic" if spec.kind == "synthetic" else "real"]
    prompts = [template.format(name) for name in names]
    tokenizer = _tokenizer(spec, prompts)
    train_set, val_set = ClassificationDataset(train), ClassificationDataset(val)
    top = Counter(train_set.labels).most_common(1)[0][0]
    majority = 100.0 * sum(1 for v in val_set.labels if v == top) / len(val_set)
    collate = ClassificationCollator(processor)
    stats = {s: DataStats(split=s, questions=len(d)) for s, d in (("train", train_set), ("val", val_set))}
    common = dict(seed=spec.seed, world_size=spec.world_size, rank=spec.rank, num_workers=spec.num_workers,
                  max_bad_image_fraction=spec.max_bad_image_fraction)
    train_loader = make_loader(train_set, collate, stats["train"], batch_size=spec.batch_size, shuffle=True, **common)
    val_loader = make_loader(val_set, collate, stats["val"], batch_size=spec.eval_batch_size or spec.batch_size,
                             shuffle=False, **common)
    return ClassificationData(train_loader, val_loader, tokenizer, spec, names, prompts, majority, where, processor, stats)
