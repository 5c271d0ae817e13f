"""Tests of apt_ray.data: synthetic generation, readers, tokenizer, batching, metrics, build."""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from apt_ray.data import questions as qa
from apt_ray.data.answers import answer_coverage, build_answer_vocab, normalize_answer, soft_score, soft_targets
from apt_ray.data.build import build_caption_loader, build_data
from apt_ray.data.collate import VQACollator
from apt_ray.data.metrics import majority_baseline, vqa_score
from apt_ray.data.spec import DataSpec
from apt_ray.data.synthetic import (
    COMPLETE_MARKER,
    build_synthetic_vqa,
    dataset_fingerprint,
    is_complete,
    load_synthetic,
    read_meta,
)
from apt_ray.data.tokenizer import build_wordlevel_tokenizer
from apt_ray.data.vqav2 import load_arrow_split, load_hf_split
from apt_ray.errors import UserError

TINY = dict(num_train=12, num_val=6, num_test=3, image_size=32, questions_per_image=3, progress=False)


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic_vqa(tmp_path_factory.mktemp("syn") / "shapes", seed=0, **TINY)


def _png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- synthetic generation

def test_same_seed_same_fingerprint_other_seed_differs(tiny_synthetic: Path, tmp_path: Path) -> None:
    again = build_synthetic_vqa(tmp_path / "again", seed=0, **TINY)
    other = build_synthetic_vqa(tmp_path / "other", seed=1, **TINY)
    fp = dataset_fingerprint(tiny_synthetic)
    assert fp == dataset_fingerprint(again) == read_meta(tiny_synthetic)["fingerprint"]
    assert fp != dataset_fingerprint(other)
    ds = load_synthetic(tiny_synthetic)
    assert set(ds) == {"train", "val", "test"}
    assert ds["train"].num_rows == 12 * 3
    needed = {"image", "question", "answers", "question_type", "caption", "image_id", "question_id"}
    assert needed <= set(ds["train"].column_names)
    row = ds["train"][0]
    assert len(row["answers"]) == qa.NUM_ANNOTATORS and row["image"].size == (32, 32)
    assert Counter(row["answers"]).most_common(1)[0][0] == row["answer"]
    assert len(set(ds["train"]["question_id"])) == ds["train"].num_rows


def test_reuses_finished_set_and_refuses_other_parameters(tiny_synthetic: Path) -> None:
    stamp = (tiny_synthetic / COMPLETE_MARKER).stat().st_mtime_ns
    assert build_synthetic_vqa(tiny_synthetic, seed=0, **TINY) == tiny_synthetic
    assert (tiny_synthetic / COMPLETE_MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="already holds"):
        build_synthetic_vqa(tiny_synthetic, seed=5, **TINY)


def test_answers_balanced_below_stated_share(tmp_path: Path) -> None:
    path = build_synthetic_vqa(tmp_path / "bal", num_train=80, num_val=40, num_test=0, image_size=32,
                               questions_per_image=3, seed=3, progress=False)
    ds = load_synthetic(path)
    for split in ("train", "val"):
        answers = ds[split]["answer"]
        assert len(answers) >= qa.BALANCE_MIN_QUESTIONS
        top_share = Counter(answers).most_common(1)[0][1] / len(answers)
        assert top_share <= qa.MAX_ANSWER_SHARE
        assert len(set(answers)) >= 15
        assert set(ds[split]["question_type"]) == set(qa.QUESTION_TYPES)
    baseline = majority_baseline(ds["train"]["answers"], ds["val"]["answers"])
    assert baseline <= 100 * qa.MAX_ANSWER_SHARE + 5


def test_interrupted_generation_leaves_nothing_that_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import apt_ray.data.synthetic as synthetic

    def boom(path: Path) -> str:
        raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(synthetic, "dataset_fingerprint", boom)
    out = tmp_path / "shapes"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_synthetic_vqa(out, seed=0, **TINY)
    assert not out.exists()
    assert not list(tmp_path.glob(".shapes.tmp-*"))
    with pytest.raises(UserError, match="No synthetic dataset"):
        load_synthetic(out)


def test_killed_generation_is_detected_and_regenerated(tiny_synthetic: Path, tmp_path: Path) -> None:
    partial = tmp_path / "shapes"
    shutil.copytree(tiny_synthetic, partial)
    (partial / COMPLETE_MARKER).unlink()  # as if killed before the marker was written
    assert not is_complete(partial)
    with pytest.raises(UserError, match="not a complete"):
        load_synthetic(partial)
    with pytest.raises(UserError, match="incomplete"):
        load_hf_split(str(partial), "train")
    rebuilt = build_synthetic_vqa(partial, seed=0, **TINY)
    assert is_complete(rebuilt)
    assert dataset_fingerprint(rebuilt) == dataset_fingerprint(tiny_synthetic)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_roundtrips_through_autotokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    texts = ["What color is the circle?", "a large red circle at the top left", "red"]
    built = build_wordlevel_tokenizer(texts, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = loaded("what COLOR is the square?")["input_ids"]
    assert ids == built("what COLOR is the square?")["input_ids"]
    tokens = loaded.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "what", "color", "is", "the", "[UNK]", "?", "[SEP]"]
    assert [loaded.pad_token_id, loaded.unk_token_id, loaded.cls_token_id, loaded.sep_token_id,
            loaded.mask_token_id] == [0, 1, 2, 3, 4]
    assert build_wordlevel_tokenizer(reversed(texts)).get_vocab() == built.get_vocab()


def test_synthetic_tokenizer_covers_train_text(tiny_synthetic: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_synthetic / "tokenizer"))
    train = load_synthetic(tiny_synthetic)["train"]
    for text in [*train["question"][:20], *train["caption"][:5], *qa.ALL_ANSWERS]:
        assert tok.unk_token_id not in tok(text)["input_ids"]


# ---------------------------------------------------------------- answers and metrics

def test_soft_score_values() -> None:
    assert [soft_score(n) for n in range(5)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert soft_targets(["2"] * 8 + ["3", "4"]) == pytest.approx({"2": 1.0, "3": 1 / 3, "4": 1 / 3})
    with pytest.raises(ValueError):
        soft_score(-1)


def test_vqa_score_hand_worked() -> None:
    # answers: [yes, no, red, blue]
    targets = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],      # predicts yes: 1
        [0.0, 0.0, 2 / 3, 1 / 3],  # predicts red: 2/3
        [0.0, 1 / 3, 0.0, 1.0],    # predicts yes: 0
    ])
    logits = torch.tensor([
        [5.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 3.0, 2.0],
        [9.0, 0.0, 0.0, 1.0],
    ])
    assert vqa_score(logits, targets) == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert vqa_score(targets, targets) == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)  # oracle = best target


def test_majority_baseline_hand_worked() -> None:
    train = [["yes"] * 10, ["yes"] * 9 + ["no"], ["no"] * 10]
    evaluation = [["yes"] * 10, ["yes"] * 2 + ["no"] * 8, ["no"] * 10]
    assert majority_baseline(train, evaluation) == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


def test_answer_vocab_order_topk_and_oov_counted() -> None:
    train = [["b"] * 10, ["a"] * 10, ["c"] * 2 + ["b"] * 8, ["d"]]
    assert build_answer_vocab(train, top_k=None) == ["b", "a", "c", "d"]
    vocab = build_answer_vocab(train, top_k=2)
    assert vocab == ["b", "a"]
    cov = answer_coverage([["c"] * 10, ["a"] * 9 + ["z"], ["b"]], vocab)
    assert (cov.questions, cov.questions_without_vocab_answer) == (3, 1)
    assert (cov.annotator_answers, cov.oov_annotator_answers) == (21, 11)
    with pytest.raises(UserError):
        build_answer_vocab([[], []])


def test_normalize_answer() -> None:
    assert normalize_answer(" Two ") == "2"
    assert normalize_answer("The Dog.") == "dog"
    assert normalize_answer("2.5") == "2.5"
    assert normalize_answer("t-shirt") == "t shirt"
    assert all(normalize_answer(a) == a for a in qa.ALL_ANSWERS)


# ---------------------------------------------------------------- both real-data layouts

_IMAGES = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0), (0, 200, 200), (90, 90, 90)]
_QUESTIONS = {  # image index -> [(question, ten annotator answers)]
    0: [("what color is it?", ["red"] * 8 + ["orange"] * 2), ("is it round?", ["no"] * 10)],
    1: [("what color is it?", ["green"] * 9 + ["Blue"]), ("how many things?", ["one"] * 6 + ["2"] * 4)],
    2: [("what color is it?", ["blue"] * 7 + ["green", "green", "red"])],
    3: [("is it yellow?", ["yes"] * 10), ("what color is it?", ["yellow"] * 5 + ["orange"] * 5)],
    4: [("what color is it?", ["green"] * 6 + ["blue"] * 4), ("is it round?", ["yes"] * 9 + ["no"])],
    5: [("what color is it?", ["gray"] * 10)],
}
_SPLITS = {"train": [0, 1, 2, 3], "val": [4, 5]}


def _official_credit(votes: int) -> float:
    """VQA accuracy averaged over the ten 9-annotator subsets, as the ViLT arrow files store it."""
    return {1: 0.3, 2: 0.6, 3: 0.9}.get(votes, 1.0)


def _write_both_layouts(root: Path, bad_images: set[int] = frozenset()) -> tuple[Path, Path]:
    """The same tiny VQA data as ViLT arrow files and as a Hugging Face dataset."""
    from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, List, Value

    arrow_dir, hf_dir = root / "arrow", root / "hf"
    arrow_dir.mkdir(parents=True)
    label_of: dict[str, int] = {}
    hf_splits = {}
    for split, image_indices in _SPLITS.items():
        rows: dict[str, list] = {k: [] for k in ("image", "questions", "answers", "answer_labels",
                                                 "answer_scores", "image_id", "question_id", "split")}
        hf: dict[str, list] = {k: [] for k in ("image", "question", "answers", "question_id", "image_id")}
        for i in image_indices:
            image = b"not an image" if i in bad_images else _png(_IMAGES[i])
            labels, scores, answers_col, qids = [], [], [], []
            for j, (question, answers) in enumerate(_QUESTIONS[i]):
                counts = Counter(normalize_answer(a) for a in answers)
                distinct = sorted(counts)
                answers_col.append(distinct)
                labels.append([label_of.setdefault(a, len(label_of)) for a in distinct])
                scores.append([_official_credit(counts[a]) for a in distinct])
                qids.append(1000 * i + j)
                hf["image"].append({"bytes": image, "path": None})
                hf["question"].append(question)
                hf["answers"].append([{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)])
                hf["question_id"].append(1000 * i + j)
                hf["image_id"].append(i)
            for key, value in (("image", image), ("questions", [q for q, _ in _QUESTIONS[i]]),
                               ("answers", answers_col), ("answer_labels", labels), ("answer_scores", scores),
                               ("image_id", i), ("question_id", qids), ("split", split)):
                rows[key].append(value)
        table = pa.Table.from_pydict(rows)
        with pa.OSFile(str(arrow_dir / f"vqav2_{split}.arrow"), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        features = Features({
            "image": ImageFeature(), "question": Value("string"),
            "answers": List({"answer": Value("string"), "answer_id": Value("int32")}),
            "question_id": Value("int64"), "image_id": Value("int64"),
        })
        hf_splits["validation" if split == "val" else split] = Dataset.from_dict(hf, features=features)
    DatasetDict(hf_splits).save_to_disk(str(hf_dir))
    return arrow_dir, hf_dir


def test_arrow_and_hf_readers_agree(tmp_path: Path) -> None:
    arrow_dir, hf_dir = _write_both_layouts(tmp_path)
    for split in ("train", "val"):
        arrow, hf = load_arrow_split(arrow_dir, split), load_hf_split(str(hf_dir), split)
        assert len(arrow) == len(hf) == sum(len(_QUESTIONS[i]) for i in _SPLITS[split])
        for i in range(len(arrow)):
            a, h = arrow[i], hf[i]
            assert (a["question"], a["question_id"], a["image_id"]) == (h["question"], h["question_id"], h["image_id"])
            assert a["image"] == h["image"]
            assert soft_targets(a["answers"]) == pytest.approx(soft_targets(h["answers"]))
    assert hf[0]["answers"].count("green") == 6  # raw votes kept, normalised ("Blue" -> "blue")

    bundles = [build_data(DataSpec(kind=kind, path=str(path), image_size=16, patch_size=8, max_text_len=8,
                                    batch_size=4))
               for kind, path in (("vqav2_arrow", arrow_dir), ("hf", hf_dir))]
    assert bundles[0].answers == bundles[1].answers
    assert bundles[0].majority_baseline == pytest.approx(bundles[1].majority_baseline)
    for loader_a, loader_h in ((bundles[0].val_loader, bundles[1].val_loader),
                               (bundles[0].train_loader, bundles[1].train_loader)):
        for batch_a, batch_h in zip(loader_a, loader_h, strict=True):
            assert batch_a.keys() == batch_h.keys()
            for key in batch_a:
                assert torch.equal(batch_a[key], batch_h[key]), key
    assert bundles[1].stats["val"].questions_without_vocab_answer == 1  # "gray" never seen in train


def test_worker_processes_give_the_same_batches(tmp_path: Path) -> None:
    arrow_dir, _ = _write_both_layouts(tmp_path)
    runs = []
    for workers in (0, 2):
        bundle = build_data(DataSpec(kind="vqav2_arrow", path=str(arrow_dir), image_size=16, patch_size=8, batch_size=2,
                                     num_workers=workers))
        runs.append([b for b in bundle.train_loader])
        assert bundle.stats["train"].pass_examples == 7
    for batch_a, batch_b in zip(*runs, strict=True):
        assert all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)


def test_missing_paths_and_splits_raise_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        build_data(DataSpec(kind="vqav2_arrow", path=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="does not exist"):
        build_data(DataSpec(kind="hf", path=str(tmp_path / "nowhere" / "data")))
    with pytest.raises(UserError, match="path is not set"):
        build_data(DataSpec(kind="hf"))
    arrow_dir, hf_dir = _write_both_layouts(tmp_path)
    with pytest.raises(UserError, match="vqav2_test.arrow"):
        build_data(DataSpec(kind="vqav2_arrow", path=str(arrow_dir), val_split="test"))
    with pytest.raises(UserError, match="no split 'test'"):
        build_data(DataSpec(kind="hf", path=str(hf_dir), val_split="test"))


def test_empty_split_raises_user_error(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, List, Value

    features = Features({"image": ImageFeature(), "question": Value("string"),
                         "answers": List(Value("string"))})
    one = {"image": [{"bytes": _png((1, 2, 3)), "path": None}], "question": ["q?"], "answers": [["yes"] * 10]}
    empty = {"image": [], "question": [], "answers": []}
    DatasetDict({"train": Dataset.from_dict(one, features=features),
                 "val": Dataset.from_dict(empty, features=features)}).save_to_disk(
        str(tmp_path / "hf"), num_shards={"train": 1, "val": 1})
    with pytest.raises(UserError, match="has no questions"):
        build_data(DataSpec(kind="hf", path=str(tmp_path / "hf")))

    table = pa.Table.from_pydict({"image": pa.array([], pa.binary()), "questions": pa.array([], pa.list_(pa.string())),
                                  "answers": pa.array([], pa.list_(pa.list_(pa.string()))),
                                  "question_id": pa.array([], pa.list_(pa.int64()))})
    (tmp_path / "arrow").mkdir()
    for split in ("train", "val"):
        with pa.ipc.new_file(str(tmp_path / "arrow" / f"vqav2_{split}.arrow"), table.schema) as writer:
            writer.write_table(table)
    with pytest.raises(UserError, match="has no questions"):
        build_data(DataSpec(kind="vqav2_arrow", path=str(tmp_path / "arrow")))


# ---------------------------------------------------------------- batching

def _examples(n: int, bad: set[int] = frozenset(), question: str = "what color is it?") -> list[dict]:
    return [{"image": b"\x89PNG broken" if i in bad else _png((10 * i % 255, 0, 0), 20),
             "question": question, "answers": ["red"] * 9 + ["blue"], "question_id": i, "image_id": i}
            for i in range(n)]


def test_collate_shapes_truncation_and_bad_images_counted() -> None:
    tok = build_wordlevel_tokenizer(["what color is it the big red thing over there ?"])
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    processor = ViltImageProcessorPil(size={"shortest_edge": 12}, size_divisor=4, image_mean=[0.5] * 3,
                                      image_std=[0.25] * 3)
    collate = VQACollator(tok, ["red", "blue"], image_processor=processor, max_text_len=7)
    examples = _examples(3, question="what color is it?") + _examples(2, bad={1}, question="what color is the big red thing?")
    batch, counts = collate(examples)
    assert (counts.examples, counts.undecodable_images, counts.truncated_texts) == (5, 1, 1)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 7)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["pixel_values"].shape == (4, 3, 12, 12) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_mask"].shape == (4, 12, 12) and batch["pixel_mask"].dtype == torch.long
    assert batch["labels"].tolist()[0] == pytest.approx([1.0, 1 / 3])
    assert batch["question_id"].tolist() == [0, 1, 2, 0]
    assert tok.convert_ids_to_tokens(batch["input_ids"][3].tolist())[-1] == "[SEP]"
    red = batch["pixel_values"][1, 0, 0, 0].item()  # red channel 10/255, normalised by (x - .5) / .25
    assert red == pytest.approx((10 / 255 - 0.5) / 0.25, abs=1e-5)


def test_loader_skips_bad_images_and_raises_above_threshold(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, List, Value

    def write(name: str, bad: set[int]) -> Path:
        rows = {"image": [], "question": [], "answers": []}
        for i in range(40):
            rows["image"].append({"bytes": b"garbage" if i in bad else _png((i, 0, 0)), "path": None})
            rows["question"].append("what color is the thing in the middle of the image?")
            rows["answers"].append(["red"] * 10)
        features = Features({"image": ImageFeature(), "question": Value("string"), "answers": List(Value("string"))})
        ds = Dataset.from_dict(rows, features=features)
        DatasetDict({"train": ds, "val": ds}).save_to_disk(str(tmp_path / name))
        return tmp_path / name

    spec = dict(kind="hf", image_size=8, patch_size=8, max_text_len=6, batch_size=8)
    bundle = build_data(DataSpec(path=str(write("one_bad", {7})), **spec))
    with caplog.at_level(logging.WARNING, logger="apt_ray.data"):
        seen = sum(b["labels"].shape[0] for b in bundle.val_loader)
    stats = bundle.stats["val"]
    assert seen == 39 and stats.pass_undecodable_images == 1 and stats.pass_examples == 40
    assert stats.pass_truncated_texts == 39  # the undecodable example is dropped before tokenising
    assert "1/40 undecodable" in caplog.text and "39/39 texts truncated" in caplog.text

    bundle = build_data(DataSpec(path=str(write("many_bad", set(range(0, 40, 4)))), **spec))
    with pytest.raises(UserError, match="could not be decoded"):
        for _ in bundle.train_loader:
            pass


# ---------------------------------------------------------------- build_data on the synthetic set

def test_build_data_synthetic_end_to_end(tiny_synthetic: Path) -> None:
    spec = DataSpec(path=str(tiny_synthetic), image_size=24, patch_size=8, max_text_len=16, batch_size=5, seed=7)
    bundle = build_data(spec)
    assert bundle.answers and bundle.num_answers == len(bundle.answers) <= len(qa.ALL_ANSWERS)
    assert 0 < bundle.majority_baseline < 30
    batch = next(iter(bundle.train_loader))
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "pixel_mask", "labels", "question_id"}
    assert batch["pixel_values"].shape == (5, 3, 24, 24)
    assert batch["pixel_mask"].dtype == torch.long and bool((batch["pixel_mask"] == 1).all())  # nothing padded
    assert batch["labels"].shape == (5, bundle.num_answers)
    assert (batch["input_ids"][:, 0] == bundle.tokenizer.cls_token_id).all()
    assert (batch["labels"].max(dim=1).values == 1.0).all()

    def order(loader, epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        return [q for b in loader for q in b["question_id"].tolist()]

    again = build_data(spec)
    assert order(bundle.train_loader, 0) == order(again.train_loader, 0)
    assert order(bundle.train_loader, 0) != order(bundle.train_loader, 1)
    assert sorted(order(bundle.train_loader, 1)) == sorted(order(again.train_loader, 3))

    shards = [build_data(spec.model_copy(update={"world_size": 2, "rank": r})).train_loader for r in (0, 1)]
    parts = [order(s, 2) for s in shards]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(order(bundle.train_loader, 2))


def test_build_data_generates_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APT_RAY_CACHE", str(tmp_path / "cache"))
    spec = DataSpec(num_train=6, num_val=3, num_test=0, image_size=24, patch_size=8, batch_size=4,
                    max_val_questions=5)
    bundle = build_data(spec)
    assert is_complete(Path(bundle.location)) and Path(bundle.location).is_relative_to(tmp_path / "cache")
    assert bundle.stats["val"].questions == 5
    captions = build_caption_loader(spec, batch_size=3)
    assert len(captions.dataset) == 6  # one pair per image
    batch = next(iter(captions))
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "pixel_mask"}
    assert batch["pixel_values"].shape == (3, 3, 24, 24) and batch["pixel_mask"].shape == (3, 24, 24)


def test_data_spec_validation() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        DataSpec(batch_size=0)
    with pytest.raises(ValidationError):
        DataSpec(rank=2, world_size=2)
    with pytest.raises(ValidationError):
        DataSpec(unknown_field=1)
    with pytest.raises(ValidationError, match="patch_size"):
        DataSpec(image_size=16, patch_size=32)  # ViLT would round every side down to 0
    with pytest.raises(ValidationError):
        DataSpec(processor_family="clip")
    with pytest.raises(ValidationError):
        DataSpec(mean=(0.5, 0.5, 0.5))  # normalisation belongs to the image processor now
    assert json.loads(DataSpec().model_dump_json())["kind"] == "synthetic"
