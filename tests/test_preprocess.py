"""Tests of the backbones' own image processors and tokenizers as build_data uses them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from apt_ray.data.build import build_data
from apt_ray.data.collate import ImageBatcher
from apt_ray.data.preprocess import CLIP_MEAN, CLIP_STD, default_image_processor, describe_image_processor
from apt_ray.data.spec import DataSpec
from apt_ray.errors import UserError, run_command

# (width, height) of the val images: all different, none square, one odd crop offset for METER
VAL_SIZES = [(40, 30), (30, 52), (75, 40), (33, 90), (57, 64)]
TRAIN_SIZES = [(20, 36), (48, 24)]
QUESTIONS = ["what color is the big circle?", "how many squares are there?", "is it red?",
             "what shape is left of the small blue thing?", "is there a triangle?"]
ANSWERS = ["red", "2", "yes", "circle", "no"]


def _noise_png(width: int, height: int, seed: int, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_arrow(root: Path) -> tuple[Path, list[bytes]]:
    """vqav2_{train,val}.arrow in the ViLT/METER layout, one question per image; returns the val images
    (in row order; the last one is greyscale, so decoding must convert it to RGB)."""
    root.mkdir(parents=True, exist_ok=True)
    val_images = []
    for split, sizes in (("train", TRAIN_SIZES), ("val", VAL_SIZES)):
        rows: dict[str, list] = {k: [] for k in ("image", "questions", "answers", "answer_labels", "answer_scores",
                                                 "image_id", "question_id", "split")}
        for i, (w, h) in enumerate(sizes):
            image = _noise_png(w, h, seed=100 * len(split) + i, mode="L" if i == len(sizes) - 1 else "RGB")
            if split == "val":
                val_images.append(image)
            answer = ANSWERS[i % len(ANSWERS)]
            for key, value in (("image", image), ("questions", [QUESTIONS[i % len(QUESTIONS)]]),
                               ("answers", [[answer]]), ("answer_labels", [[i]]), ("answer_scores", [[1.0]]),
                               ("image_id", i), ("question_id", [i]), ("split", split)):
                rows[key].append(value)
        table = pa.Table.from_pydict(rows)
        with pa.OSFile(str(root / f"vqav2_{split}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    return root, val_images


def _rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _val_batch(spec: DataSpec) -> tuple[dict[str, torch.Tensor], object]:
    bundle = build_data(spec)
    batches = list(bundle.val_loader)
    assert len(batches) == 1
    assert batches[0]["question_id"].tolist() == list(range(len(VAL_SIZES)))  # row order kept
    return batches[0], bundle


# ---------------------------------------------------------------- ViLT


def _vilt_resized(width: int, height: int, shorter: int, divisor: int) -> tuple[int, int]:
    """(height, width) after ViLT's resize, worked out here: shorter side to `shorter`, longer side capped
    at int(1333 / 800 * shorter), rounded to the nearest pixel, then down to a multiple of `divisor`."""
    longer = int(1333 / 800 * shorter)
    scale = shorter / min(width, height)
    h, w = height * scale, width * scale
    if max(h, w) > longer:
        cap = longer / max(h, w)
        h, w = h * cap, w * cap
    h, w = int(h + 0.5), int(w + 0.5)
    return h // divisor * divisor, w // divisor * divisor


def test_vilt_processor_from_folder_matches_the_processor_and_masks_the_padding(tmp_path: Path) -> None:
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]  # not the defaults, so the folder must be read
    processor = ViltImageProcessorPil(size={"shortest_edge": 48}, size_divisor=16, image_mean=mean, image_std=std)
    processor.save_pretrained(str(tmp_path / "proc"))
    arrow, images = _write_arrow(tmp_path / "arrow")
    spec = DataSpec(kind="vqav2_arrow", path=str(arrow), image_processor=str(tmp_path / "proc"), image_size=48,
                    patch_size=16, batch_size=8, max_text_len=12)
    batch, bundle = _val_batch(spec)

    reference = processor(images=[_rgb(b) for b in images], return_tensors="pt")
    assert batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    assert torch.equal(batch["pixel_mask"], reference["pixel_mask"].long())

    sizes = [_vilt_resized(w, h, 48, 16) for w, h in VAL_SIZES]
    top_h, top_w = max(h for h, _ in sizes), max(w for _, w in sizes)
    assert batch["pixel_values"].shape == (len(images), 3, top_h, top_w)
    assert batch["pixel_mask"].dtype == torch.long and batch["pixel_mask"].shape == (len(images), top_h, top_w)
    assert len(set(sizes)) > 1  # padding is exercised
    for i, (h, w) in enumerate(sizes):
        expected = torch.zeros(top_h, top_w, dtype=torch.long)
        expected[:h, :w] = 1
        assert torch.equal(batch["pixel_mask"][i], expected), (VAL_SIZES[i], (h, w))
        assert bool((batch["pixel_values"][i][:, expected == 0] == 0).all())  # padded with zeros
    info = bundle.image_processor_info()
    assert info == {"image_processor": str(tmp_path / "proc"), "image_mean": pytest.approx(mean),
                    "image_std": pytest.approx(std), "image_size": 48}
    assert type(bundle.image_processor).__name__.startswith("ViltImageProcessor")


def test_vilt_default_processor_settings_cap_the_longer_side() -> None:
    spec = DataSpec(image_size=384, patch_size=32)
    from apt_ray.data.preprocess import load_image_processor

    processor = load_image_processor(spec)
    assert describe_image_processor(processor) == {"image_processor": "ViltImageProcessor",
                                                   "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                                                   "image_size": 384}
    assert processor.size_divisor == 32 and int(processor.resample) == int(Image.Resampling.BICUBIC)
    wide = Image.fromarray(np.zeros((400, 2000, 3), dtype=np.uint8))  # 5:1, so the longer side is capped
    out = processor(images=[wide, Image.fromarray(np.zeros((500, 500, 3), dtype=np.uint8))], return_tensors="pt")
    assert _vilt_resized(2000, 400, 384, 32) == (128, 608)  # 639 (= int(1333/800 * 384)) // 32 * 32
    assert out["pixel_values"].shape == (2, 3, 384, 608)
    assert out["pixel_mask"][0].sum().item() == 128 * 608 and out["pixel_mask"][1].sum().item() == 384 * 384


# ---------------------------------------------------------------- METER


def _clip_reference(image: Image.Image, size: int) -> np.ndarray:
    """CLIP preprocessing written out with PIL and numpy: shorter side to `size` (longer side truncated
    to an int, as torchvision's Resize does), bicubic, centre crop (offset rounded down), /255,
    (x - mean) / std, channels first."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.float64)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top:top + size, left:left + size] / 255.0
    return ((crop - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)


def test_meter_default_processor_is_clips_resize_crop_and_normalisation(tmp_path: Path) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    arrow, images = _write_arrow(tmp_path / "arrow")
    spec = DataSpec(kind="vqav2_arrow", path=str(arrow), processor_family="meter", image_size=32, batch_size=8)
    batch, bundle = _val_batch(spec)
    assert "pixel_mask" not in batch
    assert isinstance(bundle.image_processor, CLIPImageProcessorPil)
    assert batch["pixel_values"].shape == (len(images), 3, 32, 32) and batch["pixel_values"].dtype == torch.float32

    # Tolerance: both sides resize the same uint8 pixels with PIL's bicubic, so they differ only in the float32
    # rounding of the processor's rescale and normalise; |values| < 2.2, so a few float32 ulps are < 1e-6.
    reference = np.stack([_clip_reference(_rgb(b), 32) for b in images])
    np.testing.assert_allclose(batch["pixel_values"].numpy(), reference, rtol=0, atol=1e-5)

    own = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    assert torch.equal(batch["pixel_values"], own(images=[_rgb(b) for b in images], return_tensors="pt")["pixel_values"])
    info = bundle.image_processor_info()
    assert info["image_processor"] == "CLIPImageProcessor" and info["image_size"] == 32
    assert info["image_mean"] == pytest.approx(CLIP_MEAN) and info["image_std"] == pytest.approx(CLIP_STD)


@pytest.mark.parametrize("family", ["vilt", "meter"])
def test_skipping_an_identity_resize_changes_no_pixel(family: str) -> None:
    processor = default_image_processor(family, 64, 8)
    squares = [_noise_png(64, 64, seed=s) for s in range(6)]
    batcher = ImageBatcher(processor)
    out, ok = batcher(squares)
    assert all(ok) and batcher._resize_is_identity == {(64, 64): True}  # the cheap path was taken
    full = processor(images=[_rgb(b) for b in squares], return_tensors="pt")
    assert torch.equal(out["pixel_values"], full["pixel_values"])
    assert ("pixel_mask" in out) == (family == "vilt")
    mixed = [*squares[:2], _noise_png(64, 80, seed=9)]  # one image needs its resize: no skip
    out, _ = batcher(mixed)
    full = processor(images=[_rgb(b) for b in mixed], return_tensors="pt")
    assert torch.equal(out["pixel_values"], full["pixel_values"])


# ---------------------------------------------------------------- tokenizers

CORPUS = [*QUESTIONS, "a large red circle at the top left", "two small blue squares", "the green triangle",
          "what is the color of the square on the right?", "yes", "no", "circle"] * 3


def _roberta_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    fast.save_pretrained(str(folder))
    return folder


def _bert_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = BertTokenizerFast(vocab=tok.get_vocab(), do_lower_case=True)  # transformers 5: a vocab dict
    assert len(fast) == tok.get_vocab_size()
    fast.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_backbone_tokenizer_folder_frames_and_pads_the_questions(kind: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = (_roberta_tokenizer if kind == "roberta" else _bert_tokenizer)(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(folder))
    start, end, pad = ((tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if kind == "roberta"
                       else (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id))
    assert (start, end, pad) == ((0, 2, 1) if kind == "roberta" else (2, 3, 0))
    arrow, _ = _write_arrow(tmp_path / "arrow")
    spec = DataSpec(kind="vqav2_arrow", path=str(arrow), image_size=32, patch_size=8, batch_size=8, max_text_len=20,
                    tokenizer=str(folder))
    batch, bundle = _val_batch(spec)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert bundle.tokenizer.pad_token_id == pad
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        expected = tok(QUESTIONS[row % len(QUESTIONS)])["input_ids"]
        assert n == len(expected) < 20  # nothing truncated
        assert ids[row, :n].tolist() == expected
        assert ids[row, 0].item() == start and ids[row, n - 1].item() == end
        assert bool((ids[row, n:] == pad).all()) and bool((mask[row, n:] == 0).all())
        assert tok.unk_token_id not in expected


# ---------------------------------------------------------------- bad input


def _bad(tmp_path: Path, **overrides: object) -> DataSpec:
    arrow = tmp_path / "arrow"
    if not arrow.exists():
        _write_arrow(arrow)
    return DataSpec(kind="vqav2_arrow", path=str(arrow), image_size=32, patch_size=8, **overrides)


def test_missing_or_unreadable_folders_raise_one_clear_user_error(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "preprocessor_config.json").write_text("{not json", encoding="utf-8")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "NoSuchProcessor"}))
    _write_arrow(tmp_path / "arrow")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    cases = [
        (dict(image_processor=str(tmp_path / "nowhere")), "image_processor=.*does not exist"),
        (dict(image_processor=str(empty)), "image_processor=.*has no preprocessor_config.json"),
        (dict(image_processor=str(broken)), "image_processor=.*could not be read"),
        (dict(image_processor=str(unknown)), "image_processor=.*could not be read"),
        (dict(image_processor=str(broken / "preprocessor_config.json")), "image_processor=.*not a folder"),
        (dict(tokenizer=str(tmp_path / "nowhere")), "tokenizer=.*does not exist"),
        (dict(tokenizer=str(empty)), "tokenizer=.*holds none of"),
    ]
    for overrides, pattern in cases:
        with pytest.raises(UserError, match=pattern) as info:
            build_data(_bad(tmp_path, **overrides))
        message = str(info.value)
        assert "\n" not in message and "save_pretrained" in message, message
        key = next(iter(overrides))
        assert run_command("apt-ray", lambda o=overrides: build_data(_bad(tmp_path, **o)) and 0) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{key}=" in err and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
