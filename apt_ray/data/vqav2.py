"""VQA readers: ViLT-style arrow files and Hugging Face datasets, both in one per-question form.

Every reader is a `QASource`: a sequence of `QAExample` dicts
`{image: bytes, question: str, answers: list[str], question_id: int, image_id: int}`
with the text columns held in memory and the encoded image bytes fetched lazily. Answers are
normalised with `normalize_answer` and hold one entry per annotator vote.
"""

from __future__ import annotations

import io
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa

from apt_ray.data.answers import normalize_answer
from apt_ray.errors import UserError

SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "val": ("val", "validation"),
    "validation": ("validation", "val"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class QAExample(TypedDict):
    """One question in the normalised form shared by all readers."""

    image: bytes
    question: str
    answers: list[str]
    question_id: int
    image_id: int


class QASource(ABC):
    """Questions of one split; `image_bytes(i)` reads the encoded image of question i lazily."""

    name: str
    questions: list[str]
    answers: list[list[str]]
    question_ids: list[int]
    image_ids: list[int]

    def __len__(self) -> int:
        return len(self.questions)

    @abstractmethod
    def image_bytes(self, index: int) -> bytes:
        """Encoded image (JPEG/PNG bytes) of question `index`; b'' if it cannot be read."""

    def __getitem__(self, index: int) -> QAExample:
        return QAExample(
            image=self.image_bytes(index),
            question=self.questions[index],
            answers=list(self.answers[index]),
            question_id=self.question_ids[index],
            image_id=self.image_ids[index],
        )

    def select(self, indices: Sequence[int]) -> QASource:
        """A view on some of the questions."""
        return SubsetSource(self, indices)


class SubsetSource(QASource):
    """Some questions of another source, in the given order."""

    def __init__(self, base: QASource, indices: Sequence[int]) -> None:
        self.base, self.indices = base, [int(i) for i in indices]
        self.name = base.name
        self.questions = [base.questions[i] for i in self.indices]
        self.answers = [base.answers[i] for i in self.indices]
        self.question_ids = [base.question_ids[i] for i in self.indices]
        self.image_ids = [base.image_ids[i] for i in self.indices]

    def image_bytes(self, index: int) -> bytes:
        return self.base.image_bytes(self.indices[index])


class ConcatSource(QASource):
    """Several sources one after another (e.g. VQAv2 train + trainable_val)."""

    def __init__(self, parts: Sequence[QASource]) -> None:
        self.parts = list(parts)
        self.name = "+".join(p.name for p in self.parts)
        self.questions, self.answers, self.question_ids, self.image_ids = [], [], [], []
        self._where: list[tuple[int, int]] = []
        for k, part in enumerate(self.parts):
            self.questions += part.questions
            self.answers += part.answers
            self.question_ids += part.question_ids
            self.image_ids += part.image_ids
            self._where += [(k, i) for i in range(len(part))]

    def image_bytes(self, index: int) -> bytes:
        k, i = self._where[index]
        return self.parts[k].image_bytes(i)


def image_to_bytes(value: Any) -> bytes:
    """Encoded bytes from the ways datasets store images: bytes, {'bytes', 'path'}, a path, a PIL image."""
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        return image_to_bytes(value.get("path"))
    if isinstance(value, (str, Path)):
        try:
            return Path(value).read_bytes()
        except OSError:
            return b""
    if hasattr(value, "save"):  # a PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    return b""


def _as_int(value: Any, fallback: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return fallback


def _annotator_answers(raw: Any) -> list[str]:
    """Answer strings from a list of strings, a list of {'answer': ...} dicts or a dict of lists."""
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        raw = raw.get("answer", [])
    if isinstance(raw, str):
        raw = [raw]
    out = []
    for item in raw:
        text = item.get("answer") if isinstance(item, Mapping) else item
        if text is not None:
            out.append(normalize_answer(str(text)))
    return out


def votes_from_scores(labels: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Rebuild annotator votes from ViLT-style (distinct answer, soft score) pairs.

    Both the official 0.3/0.6/0.9/1.0 credits and min(1, n/3) map back by n = round(3 * score),
    so the rebuilt votes give the same soft targets under `soft_score` (a score of 1 means
    "at least 3 votes", which is full credit either way).
    """
    votes: list[str] = []
    for label, score in zip(labels, scores):
        if score and score > 0:
            votes += [label] * max(1, round(3 * float(score)))
    return votes


# ---------------------------------------------------------------- arrow (ViLT / METER / APT layout)

ARROW_REQUIRED = ("image", "questions", "answers", "question_id")


def arrow_split_path(root: str | Path, split: str, prefix: str = "vqav2") -> Path:
    """`<root>/<prefix>_<split>.arrow`, or UserError naming the arrow files that do exist."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"VQAv2 arrow folder {root} does not exist. Set data.path to the folder holding "
            f"{prefix}_train.arrow and {prefix}_val.arrow (as written by the ViLT/METER scripts)."
        )
    path = root / f"{prefix}_{split}.arrow"
    if not path.is_file():
        found = sorted(p.name for p in root.glob("*.arrow")) or ["no .arrow files"]
        raise UserError(
            f"Split {split!r} not found: {path} is missing (the folder holds: {', '.join(found)}). "
            "Check data.path, data.arrow_prefix and the split names (data.train_splits, data.val_split)."
        )
    return path


def _read_arrow(path: Path) -> pa.Table:
    """Memory-map an Arrow IPC file (file format as ViLT writes it; stream format also accepted)."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except pa.ArrowInvalid:
        pass
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    except pa.ArrowInvalid as exc:
        raise UserError(f"{path} is not an Arrow IPC file ({exc}). Rewrite it with the ViLT arrow scripts.") from exc


class ArrowVQASource(QASource):
    """One `vqav2_<split>.arrow` file: one row per image with per-question lists."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        table = _read_arrow(self.path)
        missing = [c for c in ARROW_REQUIRED if c not in table.column_names]
        if missing:
            raise UserError(
                f"{self.path} lacks the columns {missing} (it has {table.column_names}). Expected the "
                "ViLT VQAv2 layout: image, questions, answers, answer_labels, answer_scores, image_id, "
                "question_id, split."
            )
        column = table.column
        questions = column("questions").to_pylist()
        answers = column("answers").to_pylist()
        scores = column("answer_scores").to_pylist() if "answer_scores" in table.column_names else None
        qids = column("question_id").to_pylist()
        iids = column("image_id").to_pylist() if "image_id" in table.column_names else None
        self.questions, self.answers, self.question_ids, self.image_ids = [], [], [], []
        self._rows: list[int] = []
        for row, row_questions in enumerate(questions):
            row_answers = answers[row] or []
            row_scores = (scores[row] or []) if scores is not None else []
            for j, question in enumerate(row_questions or []):
                labels = row_answers[j] if j < len(row_answers) else []
                self.questions.append(question)
                self.answers.append(self._votes(labels, row_scores[j] if j < len(row_scores) else None))
                self.question_ids.append(_as_int(qids[row][j], len(self.question_ids)))
                self.image_ids.append(_as_int(iids[row], row) if iids is not None else row)
                self._rows.append(row)
        self._table: pa.Table | None = table

    @staticmethod
    def _votes(labels: Sequence[str] | None, scores: Sequence[float] | None) -> list[str]:
        labels = [normalize_answer(str(a)) for a in labels or []]
        distinct = len(set(labels)) == len(labels)
        if scores is not None and labels and len(scores) == len(labels) and distinct:
            return votes_from_scores(labels, scores)  # ViLT: distinct labels with soft scores
        return labels  # raw annotator answers

    def image_bytes(self, index: int) -> bytes:
        if self._table is None:  # reopened lazily after pickling into a worker
            self._table = _read_arrow(self.path)
        return image_to_bytes(self._table.column("image")[self._rows[index]].as_py())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_table"] = None  # never pickle the memory-mapped table
        return state


# ---------------------------------------------------------------- Hugging Face datasets

HF_REQUIRED = ("image", "question", "answers")


def _answer_strings(column: pa.ChunkedArray) -> list[Any]:
    """Per-question answers as Python lists, keeping only the `answer` text of answer records
    (list<struct<answer, ...>> or struct<answer: list, ...>) so other fields are never converted."""
    import pyarrow.compute as pc

    out: list[Any] = []
    for chunk in column.chunks:
        kind = chunk.type
        if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type) \
                and kind.value_type.get_field_index("answer") >= 0:
            lengths = pc.list_value_length(chunk).fill_null(0).to_pylist()
            texts = pc.struct_field(pc.list_flatten(chunk), "answer").to_pylist()
            start = 0
            for length in lengths:
                out.append(texts[start:start + length])
                start += length
        elif pa.types.is_struct(kind) and kind.get_field_index("answer") >= 0:
            out.extend(pc.struct_field(chunk, "answer").to_pylist())
        else:
            out.extend(chunk.to_pylist())
    return out


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~"))


def _check_not_partial_synthetic(path: Path) -> None:
    from apt_ray.data.synthetic import GENERATOR, META_FILE, is_complete

    meta = path / META_FILE
    if meta.is_file() and not is_complete(path):
        try:
            ours = json.loads(meta.read_text()).get("generator") == GENERATOR
        except (OSError, json.JSONDecodeError):
            ours = False
        if ours:
            raise UserError(
                f"{path} is an incomplete or outdated synthetic dataset. Delete it and generate it again."
            )


def open_hf_dataset(path_or_id: str) -> Mapping[str, Any]:
    """The splits of a saved `datasets` folder, a data folder (parquet, arrow, ...) or a hub id."""
    import datasets

    path = Path(path_or_id).expanduser()
    if path.exists():
        _check_not_partial_synthetic(path)
        try:
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.load_dataset(str(path))
        except Exception as exc:  # datasets raises many types for unreadable folders
            raise UserError(f"Could not read a Hugging Face dataset from {path}: {exc}. "
                            "Point data.path at a save_to_disk folder or a folder of parquet files.") from exc
        return {"train": loaded} if isinstance(loaded, datasets.Dataset) else loaded
    if not _looks_like_hub_id(path_or_id):
        raise UserError(
            f"Data path {path_or_id} does not exist. Set data.path to an existing dataset folder "
            "or to a Hugging Face hub id such as 'owner/name'."
        )
    try:
        return datasets.load_dataset(path_or_id)
    except Exception as exc:
        raise UserError(
            f"Could not load the hub dataset {path_or_id!r}: {exc}. Check the id and network access, "
            "or download it and point data.path at the local folder."
        ) from exc


def pick_split(splits: Mapping[str, Any], split: str, where: str) -> Any:
    """`splits[split]`, accepting val/validation for each other; UserError listing the splits found."""
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in splits:
            return splits[name]
    raise UserError(
        f"{where} has no split {split!r} (it has {sorted(splits)}). Set data.train_splits / "
        "data.val_split to one of those."
    )


class HFVQASource(QASource):
    """One split of a Hugging Face dataset with one row per question."""

    def __init__(self, dataset: Any, name: str = "hf") -> None:
        from datasets import Image

        self.name = name
        columns = list(dataset.column_names)
        missing = [c for c in HF_REQUIRED if c not in columns]
        if missing:
            raise UserError(
                f"Dataset split {name!r} lacks the columns {missing} (it has {columns}). A VQA dataset "
                "needs image, question and answers (a list of strings or of {'answer': ...} dicts)."
            )
        if isinstance(dataset.features.get("image"), Image):
            dataset = dataset.cast_column("image", Image(decode=False))
        text_cols = [c for c in ("question", "answers", "question_id", "image_id") if c in columns]
        table = dataset.select_columns(text_cols).with_format("arrow")[:]
        n = dataset.num_rows
        self.questions = [str(q) for q in table.column("question").to_pylist()]
        self.answers = [_annotator_answers(a) for a in _answer_strings(table.column("answers"))]
        qids = table.column("question_id").to_pylist() if "question_id" in text_cols else range(n)
        iids = table.column("image_id").to_pylist() if "image_id" in text_cols else [-1] * n
        self.question_ids = [_as_int(v, i) for i, v in enumerate(qids)]
        self.image_ids = [_as_int(v, -1) for v in iids]
        self._images = dataset.select_columns(["image"])

    def image_bytes(self, index: int) -> bytes:
        return image_to_bytes(self._images[index]["image"])


def load_arrow_split(root: str | Path, split: str, prefix: str = "vqav2") -> ArrowVQASource:
    """The questions of `<root>/<prefix>_<split>.arrow`."""
    return ArrowVQASource(arrow_split_path(root, split, prefix), name=split)


def load_hf_split(path_or_id: str, split: str) -> HFVQASource:
    """The questions of one split of a Hugging Face dataset (folder or hub id)."""
    return HFVQASource(pick_split(open_hf_dataset(path_or_id), split, str(path_or_id)), name=split)

