"""The synthetic "shapes" VQA set: seeded generation, atomic writing, fingerprinting, loading.

A finished dataset folder holds a `datasets.DatasetDict` (splits train/val[/test], one row per
question), a `tokenizer/` folder (transformers format), `meta.json` and a `_COMPLETE` marker.
It is written into a temporary sibling folder and renamed into place only when whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from apt_ray.data import questions as qa
from apt_ray.data.scenes import COLORS, MIN_SCENE_SIZE, SHAPES, caption, encode_png, render_scene, sample_scene
from apt_ray.data.tokenizer import build_wordlevel_tokenizer
from apt_ray.errors import UserError

GENERATOR = "apt_ray.shapes"
GENERATOR_VERSION = 1
COMPLETE_MARKER = "_COMPLETE"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS: tuple[str, ...] = ("train", "val", "test")
_ID_STRIDE = 10_000_000  # image ids of split i start at i * _ID_STRIDE
_QUESTION_STRIDE = 100  # question id = image id * 100 + question index

DEFAULT_NUM_TRAIN = 3000
DEFAULT_NUM_VAL = 500
DEFAULT_NUM_TEST = 500
DEFAULT_QUESTIONS_PER_IMAGE = 3
DEFAULT_IMAGE_SIZE = 64


def _generate_split(
    split_index: int, num_images: int, *, image_size: int, seed: int, questions_per_image: int, bar: tqdm
) -> tuple[dict[str, list[Any]], qa.AnswerBalancer]:
    """Rows of one split; the split's generator is seeded by (seed, split index) only."""
    rng = np.random.default_rng([seed, split_index])
    balancer = qa.AnswerBalancer()
    cols: dict[str, list[Any]] = {k: [] for k in (
        "image", "question", "answers", "answer", "question_type", "caption", "image_id", "question_id")}
    for i in range(num_images):
        scene = sample_scene(rng, image_size)
        png = encode_png(render_scene(scene))
        text = caption(scene)
        image_id = split_index * _ID_STRIDE + i
        for j, cand in enumerate(balancer.pick(rng, qa.scene_questions(scene), questions_per_image)):
            cols["image"].append({"bytes": png, "path": None})
            cols["question"].append(cand.question)
            cols["answers"].append(qa.annotator_answers(rng, cand))
            cols["answer"].append(cand.answer)
            cols["question_type"].append(cand.question_type)
            cols["caption"].append(text)
            cols["image_id"].append(image_id)
            cols["question_id"].append(image_id * _QUESTION_STRIDE + j)
        bar.update(1)
    return cols, balancer


def _features() -> Any:
    from datasets import Features, Image, List, Value

    return Features({
        "image": Image(),
        "question": Value("string"),
        "answers": List(Value("string")),
        "answer": Value("string"),
        "question_type": Value("string"),
        "caption": Value("string"),
        "image_id": Value("int64"),
        "question_id": Value("int64"),
    })


def _check_balance(split: str, balancer: qa.AnswerBalancer) -> None:
    total = sum(balancer.counts.values())
    if total >= qa.BALANCE_MIN_QUESTIONS and balancer.max_share() > qa.MAX_ANSWER_SHARE:
        raise RuntimeError(  # a generator bug, not a user mistake
            f"answer balance broken in split {split}: max share {balancer.max_share():.3f} "
            f"> {qa.MAX_ANSWER_SHARE}"
        )


def _params(num_train: int, num_val: int, num_test: int, image_size: int, seed: int, qpi: int) -> dict[str, int]:
    return {"num_train": num_train, "num_val": num_val, "num_test": num_test,
            "image_size": image_size, "seed": seed, "questions_per_image": qpi}


def _validate(params: dict[str, int]) -> None:
    problems = []
    if params["num_train"] < 1 or params["num_val"] < 1:
        problems.append("num_train and num_val must be at least 1")
    if params["num_test"] < 0:
        problems.append("num_test must be >= 0")
    if params["image_size"] < MIN_SCENE_SIZE:
        problems.append(f"image_size must be at least {MIN_SCENE_SIZE}")
    if not 1 <= params["questions_per_image"] < _QUESTION_STRIDE:
        problems.append(f"questions_per_image must be between 1 and {_QUESTION_STRIDE - 1}")
    if params["seed"] < 0:
        problems.append("seed must be >= 0")
    if max(params["num_train"], params["num_val"], params["num_test"]) >= _ID_STRIDE:
        problems.append(f"each split must have fewer than {_ID_STRIDE} images")
    if problems:
        raise UserError(f"Invalid synthetic dataset parameters: {'; '.join(problems)}. Fix them and rerun.")


def is_complete(path: str | Path) -> bool:
    """True if `path` is a finished synthetic dataset of this generator version."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file() or not (path / META_FILE).is_file():
        return False
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("generator") == GENERATOR and meta.get("generator_version") == GENERATOR_VERSION


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta.json of a finished dataset."""
    return json.loads((Path(path) / META_FILE).read_text())


@contextlib.contextmanager
def datasets_bars(shown: bool = False) -> Iterator[None]:
    """`datasets`' progress bars off inside the block unless ``shown`` (as they were after it): a generator's or a
    refused run's output stays its own lines."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    were_off = are_progress_bars_disabled()
    if not shown:
        disable_progress_bars()
    try:
        yield
    finally:
        if not shown and not were_off:
            enable_progress_bars()


def build_once(final: Path, write: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """``final``, unless ``complete(final)`` already: ``write(tmp)`` fills a fresh sibling folder, which then gets a
    ``_COMPLETE`` marker and replaces ``final`` in one rename, under a file lock, so concurrent trials build a set once
    and a killed build leaves nothing half-written in its place."""
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if complete(final):
            return final
        shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            write(tmp)
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _write_dataset(tmp: Path, params: dict[str, int], progress: bool) -> None:
    """Generate every split into `tmp` (the DatasetDict, tokenizer, meta.json)."""
    from datasets import Dataset, DatasetDict

    sizes = {"train": params["num_train"], "val": params["num_val"], "test": params["num_test"]}
    splits: dict[str, Any] = {}
    report: dict[str, Any] = {}
    with tqdm(total=sum(sizes.values()), desc="shapes VQA", unit="img", disable=not progress) as bar:
        for index, split in enumerate(SPLITS):
            if sizes[split] == 0:
                continue
            cols, balancer = _generate_split(
                index, sizes[split], image_size=params["image_size"], seed=params["seed"],
                questions_per_image=params["questions_per_image"], bar=bar)
            _check_balance(split, balancer)
            splits[split] = Dataset.from_dict(cols, features=_features())
            report[split] = {
                "images": sizes[split],
                "questions": len(cols["question"]),
                "max_answer_share": round(balancer.max_share(), 4),
                "answer_counts": dict(sorted(balancer.counts.items())),
                "question_types": dict(sorted(Counter(cols["question_type"]).items())),
            }
            if split == "train":
                texts = [*set(cols["caption"]), *cols["question"], *qa.ALL_ANSWERS]
                build_wordlevel_tokenizer(sorted(texts), tmp / TOKENIZER_DIR)

    with datasets_bars(shown=progress):
        DatasetDict(splits).save_to_disk(str(tmp))

    meta = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        **params,
        "splits": report,
        "answers": list(qa.ALL_ANSWERS),
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "question_types": list(qa.QUESTION_TYPES),
        "annotators_per_question": qa.NUM_ANNOTATORS,
        "max_answer_share_guaranteed": qa.MAX_ANSWER_SHARE,
        "balance_applies_from_questions": qa.BALANCE_MIN_QUESTIONS,
        "fingerprint": dataset_fingerprint(tmp),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _remove_stale(final: Path) -> None:
    """Drop leftovers of earlier interrupted runs (called with the lock held)."""
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if final.exists() and not is_complete(final):
        looks_ours = (final / META_FILE).exists() or (final / "dataset_dict.json").exists()
        if final.is_dir() and (looks_ours or not any(final.iterdir())):
            shutil.rmtree(final)
        else:
            raise UserError(
                f"{final} exists and is not a synthetic dataset; refusing to replace it. "
                "Pass an empty or new folder as the output directory."
            )


def build_synthetic_vqa(
    out_dir: str | Path,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    num_test: int = DEFAULT_NUM_TEST,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    questions_per_image: int = DEFAULT_QUESTIONS_PER_IMAGE,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Generate the shapes VQA set into `out_dir` and return it.

    If `out_dir` already holds a finished set with the same parameters it is reused; with other
    parameters a UserError is raised unless `overwrite`. Same parameters give a byte-identical
    dataset (see `dataset_fingerprint`). Safe against concurrent callers and interruption: the
    data appear at `out_dir` only once complete.
    """
    params = _params(num_train, num_val, num_test, image_size, seed, questions_per_image)
    _validate(params)
    final = Path(out_dir).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if is_complete(final) and not overwrite:
            existing = {k: read_meta(final).get(k) for k in params}
            if existing == params:
                return final
            raise UserError(
                f"{final} already holds a synthetic dataset built with {existing}, not {params}. "
                "Choose another folder, delete that one, or pass overwrite=True."
            )
        _remove_stale(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
        try:
            _write_dataset(tmp, params, progress)
            (tmp / COMPLETE_MARKER).write_text(read_meta(tmp)["fingerprint"] + "\n")
            if final.exists():  # overwrite of a finished set: move it aside first
                trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-old-", dir=final.parent))
                os.replace(final, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def load_synthetic(path: str | Path) -> Any:
    """The DatasetDict of a finished synthetic set; UserError if missing or incomplete."""
    from datasets import load_from_disk

    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(
            f"No synthetic dataset at {path}. Generate it with "
            "apt_ray.data.synthetic.build_synthetic_vqa(path) or point data.path at an existing one."
        )
    if not is_complete(path):
        raise UserError(
            f"{path} is not a complete synthetic dataset (no {COMPLETE_MARKER} marker, or written by "
            f"another generator version; generation was probably interrupted). Delete the folder and "
            "generate it again."
        )
    return load_from_disk(str(path))


def _feed(h: Any, value: Any) -> None:
    """Hash a value with its type and length so different values never collide by concatenation."""
    if value is None:
        h.update(b"N")
    elif isinstance(value, bool):
        h.update(b"T" if value else b"F")
    elif isinstance(value, int):
        h.update(b"I%d;" % value)
    elif isinstance(value, float):
        h.update(b"D" + repr(value).encode() + b";")
    elif isinstance(value, str):
        data = value.encode("utf-8")
        h.update(b"S%d:" % len(data) + data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        h.update(b"B%d:" % len(data) + data)
    elif isinstance(value, dict):
        h.update(b"M%d:" % len(value))
        for key in sorted(value):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(b"L%d:" % len(value))
        for item in value:
            _feed(h, item)
    else:
        raise TypeError(f"cannot fingerprint a {type(value).__name__}")


def _column_values(table: Any, name: str) -> Iterator[Any]:
    for chunk in table.column(name).chunks:
        yield from chunk.to_pylist()


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 over the saved splits' features and cell values (images included, no timestamps)."""
    from datasets import load_from_disk

    dd = load_from_disk(str(path))
    h = hashlib.sha256()
    for split in sorted(dd):
        ds = dd[split]
        _feed(h, split)
        _feed(h, json.dumps(ds.features.to_dict(), sort_keys=True))
        _feed(h, ds.num_rows)
        table = ds.data.table
        for name in sorted(table.column_names):
            _feed(h, name)
            for value in _column_values(table, name):
                _feed(h, value)
    return h.hexdigest()
