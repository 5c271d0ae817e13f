"""NLVR2 data: the synthetic scene-pair statements, the ViLT/METER arrow layout, a pair collator, ``build_data``.

Every reader gives an :class:`NLVR2Source`: one example per statement, ``{image_0, image_1: bytes, statement: str,
label: int (1 = true), identifier: str}``. Rows follow the authors' ``write_nlvr2.py`` layout: one row per image
pair with ``image_0``, ``image_1`` (encoded bytes), ``questions`` (the statements about the pair), ``answers``
("True"/"False" per statement) and ``identifier``. The synthetic set is written in that layout with ``datasets``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from apt_ray.data.spec import ARROW_KINDS, DataSpec
from apt_ray.data.synthetic import COMPLETE_MARKER
from apt_ray.errors import UserError

log = logging.getLogger("apt_ray.data")

ARROW_PREFIX = "nlvr2"
REQUIRED_COLUMNS = ("image_0", "image_1", "questions", "answers")
DEFAULT_VAL_SPLIT = "dev"  # the authors validate on dev (test1 is the reported test split)
SYNTHETIC_SPLITS = ("train", "dev", "test1")
GENERATOR = "apt_ray.shapes_nlvr2"
GENERATOR_VERSION = 1
TOKENIZER_DIR = "tokenizer"
STATEMENT_TYPES = ("left", "right", "both", "count")
MAX_COUNT = 4  # the numbers the tiny backbones' vocabulary knows (0-4)
NEAR_MISS_SHARE = 0.25  # false statements naming a colour the pair does show, on the wrong side or one side only


# ---------------------------------------------------------------- synthetic statements

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _has(scene: Any, color: str, shape: str | None) -> bool:
    return any(o.color == color and shape in (None, o.shape) for o in scene.objects)


def _color_total(scenes: Sequence[Any], color: str) -> int:
    return sum(o.color == color for s in scenes for o in s.objects)


def statement_truth(kind: str, left: Any, right: Any, color: str, shape: str | None, count: int | None) -> bool:
    """Whether a statement of ``kind`` about (``color``, ``shape`` / ``count``) holds for the scene pair: ``left``
    = image_0, ``right`` = image_1; ``shape`` None: an object of any shape; ``count``: the number of ``color``
    objects over both images."""
    if kind == "left":
        return _has(left, color, shape)
    if kind == "right":
        return _has(right, color, shape)
    if kind == "both":
        return _has(left, color, shape) and _has(right, color, shape)
    if kind == "count":
        return _color_total((left, right), color) == count
    raise ValueError(f"unknown statement kind {kind!r}")


def statement_text(kind: str, color: str, shape: str | None, count: int | None) -> str:
    """The English of a statement, in the words of the shapes VQA vocabulary."""
    if kind == "count":
        return f"there is 1 {color} object" if count == 1 else f"there are {count} {color} objects"
    place = {"left": "in the left", "right": "in the right", "both": "in the left and in the right"}[kind]
    return f"there is {_article(color)} {color} {shape or 'object'} {place}"


def _pick_statement(rng: np.random.Generator, kind: str, left: Any, right: Any, truth: bool) -> tuple[str, str | None, int | None] | None:
    """(color, shape, count) of a ``kind`` statement whose truth is ``truth``, or None if the pair has none."""
    from apt_ray.data.scenes import COLORS

    if kind == "count":
        totals = {c: _color_total((left, right), c) for c in COLORS}
        colors = [c for c in COLORS if totals[c] <= MAX_COUNT]
        color = colors[int(rng.integers(len(colors)))]
        if truth:
            return color, None, totals[color]
        wrong = [n for n in range(MAX_COUNT + 1) if n != totals[color]]
        return color, None, wrong[int(rng.integers(len(wrong)))]
    # colours only: the frozen tiny backbones tell colours apart far more readily than shapes
    hits = [(c, None) for c in COLORS if statement_truth(kind, left, right, c, None, None) == truth]
    if not truth:  # near misses: a colour the pair does show, on the wrong side or on one side only
        near = [k for k in hits if _has(left, k[0], None) or _has(right, k[0], None)]
        if near and rng.random() < NEAR_MISS_SHARE:
            hits = near
    if not hits:
        return None
    color, shape = hits[int(rng.integers(len(hits)))]
    return color, shape, None


def _sample_pair(rng: np.random.Generator, size: int) -> tuple[Any, Any]:
    """Two random scenes; half the time the right one shows a (colour, shape) of the left one, so "both" holds often."""
    from apt_ray.data.scenes import sample_scene

    left, right = sample_scene(rng, size), sample_scene(rng, size)
    if rng.random() < 0.5:
        src = left.objects[int(rng.integers(len(left.objects)))]
        k = int(rng.integers(len(right.objects)))
        objects = list(right.objects)
        objects[k] = replace(objects[k], color=src.color, shape=src.shape)
        right = replace(right, objects=tuple(objects))
    return left, right


def generate_split(num_pairs: int, statements_per_pair: int, image_size: int, seed: int, split_index: int) -> dict[str, list[Any]]:
    """Rows of one split in the authors' layout (plus ``statement_types``), seeded by (seed, split index) only.

    Labels alternate true/false within a pair, starting with true on even pairs, so a split is balanced to within
    one statement (exactly, when pairs or statements per pair are even); each statement kind is drawn at random.
    """
    from apt_ray.data.scenes import encode_png, render_scene

    rng = np.random.default_rng([seed, split_index, 2])
    cols: dict[str, list[Any]] = {k: [] for k in ("image_0", "image_1", "questions", "answers", "statement_types", "identifier")}
    for i in range(num_pairs):
        left, right = _sample_pair(rng, image_size)
        texts, answers, kinds = [], [], []
        for j in range(statements_per_pair):
            truth = (i + j) % 2 == 0
            order = [STATEMENT_TYPES[int(k)] for k in rng.permutation(len(STATEMENT_TYPES))]
            for kind in order:
                picked = _pick_statement(rng, kind, left, right, truth)
                if picked is not None:
                    break
            assert picked is not None  # "left"/"right" false always exist; "count" always has both
            assert statement_truth(kind, left, right, *picked) == truth
            texts.append(statement_text(kind, *picked))
            answers.append(str(truth))
            kinds.append(kind)
        cols["image_0"].append({"bytes": encode_png(render_scene(left)), "path": None})
        cols["image_1"].append({"bytes": encode_png(render_scene(right)), "path": None})
        cols["questions"].append(texts)
        cols["answers"].append(answers)
        cols["statement_types"].append(kinds)
        cols["identifier"].append(f"{SYNTHETIC_SPLITS[split_index]}-{i}")
    flat = [a for row in cols["answers"] for a in row]
    if abs(flat.count("True") - flat.count("False")) > 1:
        raise RuntimeError(f"true/false balance broken: {flat.count('True')} true, {flat.count('False')} false")
    return cols


def _features() -> Any:
    from datasets import Features, Image, List, Value

    return Features({"image_0": Image(), "image_1": Image(), "questions": List(Value("string")),
                     "answers": List(Value("string")), "statement_types": List(Value("string")),
                     "identifier": Value("string")})


def synthetic_dir(spec: DataSpec) -> Path:
    """Where the synthetic NLVR2 set of ``spec`` lives under the cache root."""
    name = (f"nlvr2-v{GENERATOR_VERSION}-seed{spec.synthetic_seed}-n{spec.num_train}-{spec.num_val}-{spec.num_test}"
            f"-q{spec.questions_per_image}-px{spec.render_size}")
    return spec.cache_root() / "synthetic" / name


def is_complete(folder: Path) -> bool:
    """True if ``folder`` holds a finished synthetic NLVR2 set of this generator version."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (folder / COMPLETE_MARKER).is_file() and meta.get("generator") == GENERATOR \
        and meta.get("generator_version") == GENERATOR_VERSION


def ensure_synthetic(spec: DataSpec) -> Path:
    """Generate the synthetic NLVR2 set of ``spec`` unless it exists (atomically, under a file lock)."""
    from datasets import Dataset, DatasetDict

    from apt_ray.data.synthetic import build_once, datasets_bars
    from apt_ray.data.tokenizer import build_wordlevel_tokenizer

    def write(tmp: Path) -> None:
        sizes = {"train": spec.num_train, "dev": spec.num_val, "test1": spec.num_test}
        splits, report = {}, {}
        for index, split in enumerate(SYNTHETIC_SPLITS):
            if sizes[split] == 0:
                continue
            cols = generate_split(sizes[split], spec.questions_per_image, spec.render_size, spec.synthetic_seed, index)
            splits[split] = Dataset.from_dict(cols, features=_features())
            flat = [a for row in cols["answers"] for a in row]
            report[split] = {"pairs": sizes[split], "statements": len(flat), "true": flat.count("True")}
            if split == "train":
                build_wordlevel_tokenizer(sorted({q for row in cols["questions"] for q in row}), tmp / TOKENIZER_DIR)
        with datasets_bars():
            DatasetDict(splits).save_to_disk(str(tmp))
        meta = {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, "seed": spec.synthetic_seed,
                "image_size": spec.render_size, "statements_per_pair": spec.questions_per_image, "splits": report}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    return build_once(synthetic_dir(spec), write, is_complete)


# ---------------------------------------------------------------- readers

def _label(value: Any) -> int | None:
    """1 / 0 from the authors' "True"/"False" strings (or booleans); None for anything else."""
    if isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower()
    return {"true": 1, "false": 0}.get(text)


class NLVR2Source:
    """The statements of one split (a table in the authors' layout); images are read lazily by row."""

    def __init__(self, table: Any, name: str, where: str, reopen: Any = None) -> None:
        import pyarrow.compute as pc

        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise UserError(
                f"The NLVR2 {name!r} split at {where} lacks the columns {', '.join(missing)} (it has "
                f"{', '.join(table.column_names)}). NLVR2 data needs image_0 and image_1 (encoded image bytes), "
                "questions (a list of statements per row) and answers (a list of \"True\"/\"False\" per row), as the "
                "ViLT/METER write_nlvr2.py writes them: rewrite the files in that layout."
            )
        for column in ("image_0", "image_1"):
            col = table.column(column)
            sizes = pc.binary_length(pc.struct_field(col, "bytes") if str(col.type).startswith("struct") else col)
            empty = [i for i, n in enumerate(sizes.fill_null(0).to_pylist()) if not n]
            if empty:
                raise UserError(
                    f"Row {empty[0]} of the NLVR2 {name!r} split at {where} has no {column} ({len(empty)} rows lack "
                    "it): every NLVR2 example is a pair of images. Drop those rows or add their second image."
                )
        questions, answers = table.column("questions").to_pylist(), table.column("answers").to_pylist()
        ids = table.column("identifier").to_pylist() if "identifier" in table.column_names else list(range(len(questions)))
        self.name, self.where = name, where
        self.statements: list[str] = []
        self.labels: list[int] = []
        self.identifiers: list[str] = []
        self.rows: list[int] = []
        for row, (texts, labels) in enumerate(zip(questions, answers)):
            texts, labels = texts or [], labels or []
            if len(texts) != len(labels):
                raise UserError(f"Row {row} of the NLVR2 {name!r} split at {where} has {len(texts)} statements but "
                                f"{len(labels)} answers: give one \"True\"/\"False\" answer per statement.")
            for j, (text, value) in enumerate(zip(texts, labels)):
                label = _label(value)
                if label is None:
                    raise UserError(f"Row {row} of the NLVR2 {name!r} split at {where} answers {value!r}: NLVR2 "
                                    "answers are \"True\" or \"False\".")
                self.statements.append(str(text))
                self.labels.append(label)
                self.identifiers.append(f"{ids[row]}-{j}")
                self.rows.append(row)
        self._table, self._reopen = table, reopen

    def __len__(self) -> int:
        return len(self.statements)

    def _image(self, column: str, row: int) -> bytes:
        from apt_ray.data.vqav2 import image_to_bytes

        if self._table is None:
            self._table = self._reopen()
        return image_to_bytes(self._table.column(column)[row].as_py())

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {"image_0": self._image("image_0", row), "image_1": self._image("image_1", row),
                "statement": self.statements[index], "label": self.labels[index], "identifier": self.identifiers[index]}

    def select(self, indices: Sequence[int]) -> NLVR2Source:
        out = object.__new__(NLVR2Source)
        out.__dict__.update(self.__dict__)
        for key in ("statements", "labels", "identifiers", "rows"):
            setattr(out, key, [getattr(self, key)[i] for i in indices])
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._reopen is not None:
            state["_table"] = None  # a memory-mapped table is reopened in the worker, never pickled
        return state


def load_arrow_split(root: str | Path, split: str, prefix: str = ARROW_PREFIX) -> NLVR2Source:
    """The statements of ``<root>/<prefix>_<split>.arrow`` (the ViLT/METER NLVR2 files)."""
    from functools import partial

    from apt_ray.data.vqav2 import _read_arrow, arrow_split_path

    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UserError(f"NLVR2 arrow folder {folder} does not exist. Set data_path to the folder holding "
                        f"{prefix}_train.arrow and {prefix}_dev.arrow (as written by the ViLT/METER write_nlvr2.py).")
    path = arrow_split_path(folder, split, prefix)
    return NLVR2Source(_read_arrow(path), split, str(path), reopen=partial(_read_arrow, path))


def _dataset_split(spec: DataSpec, split: str) -> NLVR2Source:
    """One split of the synthetic set or of a ``datasets`` folder (``hf``) in the same columns."""
    from datasets import Image

    from apt_ray.data.vqav2 import open_hf_dataset, pick_split

    if spec.kind == "synthetic":
        folder = ensure_synthetic(spec)
        from datasets import load_from_disk

        splits, where = load_from_disk(str(folder)), str(folder)
    else:
        if not spec.path:
            raise UserError("data=hf needs data_path: a datasets folder with image_0, image_1, questions, answers.")
        splits, where = open_hf_dataset(spec.path), spec.path
    if split == DEFAULT_VAL_SPLIT and split not in splits:  # a datasets folder may call it val / validation
        split = "val"
    dataset = pick_split(splits, split, where)
    for column in ("image_0", "image_1"):
        if isinstance(dataset.features.get(column), Image):
            dataset = dataset.cast_column(column, Image(decode=False))
    return NLVR2Source(dataset.data.table, split, where)


def val_split_of(spec: DataSpec) -> str:
    """The validation split: NLVR2's ``dev`` where ``spec`` keeps the generic default ``val``, else the one it names."""
    return DEFAULT_VAL_SPLIT if spec.val_split == "val" else spec.val_split


def open_split(spec: DataSpec, split: str) -> NLVR2Source:
    if spec.kind in ARROW_KINDS:
        if not spec.path:
            raise UserError("data=arrow needs data_path: the folder holding nlvr2_train.arrow and nlvr2_dev.arrow.")
        return load_arrow_split(spec.path, split, spec.arrow_prefix or ARROW_PREFIX)
    return _dataset_split(spec, split)


# ---------------------------------------------------------------- batching

class NLVR2Collator:
    """Examples -> input_ids, attention_mask, pixel_values / pixel_mask (image_0), pixel_values_1 / pixel_mask_1
    (image_1), labels (long, 1 = true). Both images go through the processor together, so ViLT pads them alike."""

    def __init__(self, tokenizer: Any, *, image_processor: Any, max_text_len: int) -> None:
        from apt_ray.data.collate import ImageBatcher

        self.tokenizer, self.max_text_len = tokenizer, max_text_len
        self.images = ImageBatcher(image_processor)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> Any:
        import torch

        from apt_ray.data.collate import CollateOutput, encode_texts
        from apt_ray.data.stats import BatchCounts

        n = len(examples)
        pixels, ok = self.images([ex["image_0"] for ex in examples] + [ex["image_1"] for ex in examples])
        both = [a and b for a, b in zip(ok[:n], ok[n:])]
        decoded = np.cumsum(ok) - 1  # position of each decoded image in the processor's output
        first = [int(decoded[i]) for i in range(n) if both[i]]
        second = [int(decoded[n + i]) for i in range(n) if both[i]]
        kept = [ex for ex, good in zip(examples, both) if good]
        input_ids, attention_mask, truncated = encode_texts(self.tokenizer, [ex["statement"] for ex in kept], self.max_text_len)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": torch.tensor([int(ex["label"]) for ex in kept], dtype=torch.long)}
        for key, tensor in pixels.items():
            batch[key] = tensor[first]
            batch[f"{key}_1"] = tensor[second]
        return CollateOutput(batch, BatchCounts(n, both.count(False), truncated))


@dataclass
class NLVR2Bundle:
    """What the NLVR2 task's :meth:`build_data` returns (see :class:`apt_ray.tasks.base.TaskData`)."""

    train_loader: Any
    val_loader: Any
    tokenizer: Any
    spec: DataSpec
    location: str = ""
    image_processor: Any = None
    val_split: str = DEFAULT_VAL_SPLIT
    majority_baseline: float = 50.0  # percent right when always answering the train split's majority label

    def image_processor_info(self) -> dict[str, Any]:
        from apt_ray.data.preprocess import describe_image_processor

        return describe_image_processor(self.image_processor, self.spec.image_processor)


def _limit(source: NLVR2Source, limit: int | None, seed: int) -> NLVR2Source:
    """A seeded subset of ``limit`` statements, half true and half false (the extra one of an odd limit, or what
    one label lacks, drawn from the other label)."""
    if limit is None or limit >= len(source):
        return source
    rng = np.random.default_rng(seed)
    by_label = [[i for i, y in enumerate(source.labels) if y == label] for label in (1, 0)]
    want = [min(len(by_label[0]), limit - min(len(by_label[1]), limit // 2))]
    want.append(limit - want[0])
    picked = [int(i) for pool, n in zip(by_label, want) for i in rng.choice(pool, size=n, replace=False)]
    return source.select(sorted(picked))


def _warn_unknown_words(tokenizer: Any, statements: Sequence[str]) -> None:
    """Log the statement words a word-level tokenizer maps to its unknown token (they carry no meaning)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    words = sorted({w for s in set(statements) for w in s.lower().split()})
    unknown = [w for w, i in zip(words, tokenizer.convert_tokens_to_ids(words)) if i == unk]
    if unknown and len(unknown) < len(words):
        log.warning("NLVR2 statements use words the tokenizer does not know (read as %s): %s",
                    tokenizer.unk_token, ", ".join(unknown[:20]))


def build_data(spec: DataSpec) -> NLVR2Bundle:
    """Loaders over the NLVR2 statements of ``spec`` (synthetic, arrow or hf), sharded and seeded like VQA's."""
    from transformers import AutoTokenizer

    from apt_ray.data.build import load_processor_for, _load_named_tokenizer
    from apt_ray.data.loaders import make_loader
    from apt_ray.data.stats import DataStats

    processor = load_processor_for(spec)
    val_split = val_split_of(spec)
    if len(spec.train_splits) != 1:
        raise UserError(f"NLVR2 trains on one split; got {list(spec.train_splits)}. Set a single train split.")
    train = open_split(spec, spec.train_splits[0])
    val = open_split(spec, val_split)
    train = _limit(train, spec.max_train_questions, spec.seed)
    val = _limit(val, spec.max_val_questions, spec.seed + 1)
    for source, split in ((train, spec.train_splits[0]), (val, val_split)):
        if len(source) == 0:
            raise UserError(f"The NLVR2 {split!r} split at {source.where} has no statements: point data_path at "
                            "files whose splits hold statements.")
    if spec.tokenizer:
        tokenizer = _load_named_tokenizer(spec.tokenizer)
    elif spec.kind == "synthetic":
        tokenizer = AutoTokenizer.from_pretrained(str(ensure_synthetic(spec) / TOKENIZER_DIR))
    else:
        from apt_ray.data.tokenizer import build_wordlevel_tokenizer

        tokenizer = build_wordlevel_tokenizer(sorted(set(train.statements)))
    _warn_unknown_words(tokenizer, train.statements)
    collate = NLVR2Collator(tokenizer, image_processor=processor, max_text_len=spec.max_text_len)
    common = dict(seed=spec.seed, world_size=spec.world_size, rank=spec.rank, num_workers=spec.num_workers,
                  max_bad_image_fraction=spec.max_bad_image_fraction)
    train_loader = make_loader(train, collate, DataStats(split="train", questions=len(train), max_text_len=spec.max_text_len),
                               batch_size=spec.batch_size, shuffle=True, **common)
    val_loader = make_loader(val, collate, DataStats(split=val_split, questions=len(val), max_text_len=spec.max_text_len),
                             batch_size=spec.eval_batch_size or spec.batch_size, shuffle=False, **common)
    majority = int(2 * sum(train.labels) >= len(train))
    baseline = 100.0 * sum(label == majority for label in val.labels) / len(val)
    return NLVR2Bundle(train_loader, val_loader, tokenizer, spec, location=str(train.where), image_processor=processor,
                       val_split=val_split, majority_baseline=baseline)
