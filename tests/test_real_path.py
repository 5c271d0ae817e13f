"""The real path on real-format artefacts built here (no hub): a ViLT saved with ``save_pretrained`` next to a BERT
WordPiece tokenizer and a ``ViltImageProcessor``; an official-layout METER ``.ckpt`` with a RoBERTa BPE tokenizer
directory; VQAv2 arrow files in the ViLT/METER layout with images of different shapes.

``apt-ray train ... epochs=1 max_steps=2`` runs on each, and the tests check what reached the model: the backbone
tokenizer's ids, the backbone processor's pixels, the authors' trainable set, the recipe's rates, and that the
logged cost describes the checkpoint's own shapes.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
from PIL import Image

from apt_ray.cli import main as apt_ray_main
from apt_ray.models.task_model import TaskModel
from apt_ray.models.vqa import VQAModel
from tests.test_meter import official_state_dict

QUESTIONS = ["what color is the thing?", "is it round?", "how many shapes are there?", "where is the red square?",
             "what shape is on the left?", "is the circle bigger than the square?"]
ANSWERS = ["red", "yes", "no", "two", "left", "circle"]
SIZES = [(80, 48), (48, 96), (64, 64), (96, 72), (56, 80), (72, 40)]  # (width, height): no two alike
SPLITS = {"train": [0, 1, 2, 3], "val": [4, 5]}
VILT_LAYERS, VILT_HIDDEN = 3, 96  # differ from the tiny-vilt preset (4 layers of 128): the checkpoint must win


def png(index: int) -> bytes:
    w, h = SIZES[index]
    image = Image.new("RGB", (w, h), (40 * index % 255, 90, 200 - 30 * index))
    for x in range(0, w, 7):  # some structure, so resizing matters
        image.putpixel((x, (x * 3) % h), (255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_vqav2_arrow(folder: Path) -> Path:
    """``vqav2_{train,val}.arrow`` with the ViLT/METER columns; two questions per image."""
    folder.mkdir(parents=True)
    labels: dict[str, int] = {}
    for split, images in SPLITS.items():
        rows: dict[str, list] = {k: [] for k in ("image", "questions", "answers", "answer_labels", "answer_scores",
                                                 "image_id", "question_id", "split")}
        for i in images:
            qs = [QUESTIONS[i], QUESTIONS[(i + 1) % len(QUESTIONS)]]
            answers = [[ANSWERS[i]], [ANSWERS[(i + 2) % len(ANSWERS)]]]
            rows["image"].append(png(i))
            rows["questions"].append(qs)
            rows["answers"].append(answers)
            rows["answer_labels"].append([[labels.setdefault(a, len(labels)) for a in ans] for ans in answers])
            rows["answer_scores"].append([[1.0] for _ in answers])
            rows["image_id"].append(i)
            rows["question_id"].append([100 * i, 100 * i + 1])
            rows["split"].append(split)
        table = pa.Table.from_pydict(rows)
        with pa.OSFile(str(folder / f"vqav2_{split}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return folder


def bert_tokenizer(folder: Path):
    """A BERT WordPiece tokenizer trained here with `tokenizers` ([PAD]=0, [CLS], [SEP])."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(QUESTIONS * 3, vocab_size=120, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    folder.mkdir(parents=True, exist_ok=True)
    wp.save_model(str(folder))
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(folder))
    return tok


def roberta_tokenizer(folder: Path):
    """A RoBERTa-format byte-level BPE tokenizer (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(QUESTIONS * 3, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                               cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    tok.save_pretrained(str(folder))
    return tok


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import ViltConfig, ViltImageProcessor

    from apt_ray.models.meter import MeterBackbone, tiny_meter_config
    from apt_ray.models.vilt import ViltBackbone

    root = tmp_path_factory.mktemp("real")
    arrow = write_vqav2_arrow(root / "arrow")
    vilt_dir = root / "vilt"
    bert = bert_tokenizer(vilt_dir)
    torch.manual_seed(0)
    vilt_cfg = ViltConfig(vocab_size=len(bert), hidden_size=VILT_HIDDEN, num_hidden_layers=VILT_LAYERS, num_attention_heads=4,
                          intermediate_size=192, image_size=64, patch_size=8, max_position_embeddings=24, max_image_length=-1)
    ViltBackbone(vilt_cfg).save_pretrained(vilt_dir)
    ViltImageProcessor(size={"shortest_edge": 64}, size_divisor=8).save_pretrained(str(vilt_dir))

    roberta_dir = root / "roberta"
    roberta = roberta_tokenizer(roberta_dir)
    meter_cfg = tiny_meter_config(vocab_size=len(roberta), pad_token_id=roberta.pad_token_id)
    ckpt = root / "meter.ckpt"
    torch.save({"state_dict": official_state_dict(meter_cfg)}, ckpt)

    small_vilt = root / "vilt_small_vocab"  # an embedding table smaller than the tokenizer
    small_cfg = ViltConfig(**{**vilt_cfg.to_dict(), "vocab_size": 20})
    ViltBackbone(small_cfg).save_pretrained(small_vilt)
    meter_dir = root / "meter_dir"  # a METER (RoBERTa pads with 1) saved with save_pretrained
    MeterBackbone(meter_cfg).save_pretrained(meter_dir)
    return {"arrow": arrow, "vilt": vilt_dir, "bert": bert, "roberta_dir": roberta_dir, "roberta": roberta, "ckpt": ckpt,
            "small_vilt": small_vilt, "meter_dir": meter_dir, "root": root}


class Spy:
    """Records what reaches the model's forward, the model itself and the optimiser the loop builds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import apt_ray.train.loop as loop

        self.calls: list[dict[str, torch.Tensor | None]] = []
        self.model: TaskModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        forward, build = TaskModel.forward, loop.build_optimizer  # the loop builds a TaskModel (VQAModel inherits it)

        def spy_forward(model, input_ids, attention_mask, pixel_values, pixel_mask=None):  # noqa: ANN001
            if model is self.model:  # the trial's model (not the cost profile's copy)
                self.calls.append({"input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(),
                                   "pixel_values": pixel_values.clone(), "pixel_mask": None if pixel_mask is None else pixel_mask.clone()})
            return forward(model, input_ids, attention_mask, pixel_values, pixel_mask)

        def spy_build(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            self.model = model
            self.optimizer = build(model, *args, **kwargs)
            return self.optimizer

        monkeypatch.setattr(TaskModel, "forward", spy_forward)
        monkeypatch.setattr(loop, "build_optimizer", spy_build)


def train(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "result.json"
    code = apt_ray_main(["train", *args, "data=vqav2_arrow", "epochs=1", "max_steps=2", "batch_size=4", "device=cpu",
                         f"output_dir={tmp_path / 'run'}", "--json-out", str(out)])
    err = capsys.readouterr().err
    return code, (json.loads(out.read_text()) if out.exists() else {}), err


def vilt_args(a: dict[str, Any], method: str = "apt") -> list[str]:
    return ["--model", "tiny-vilt", "--method", method, f"checkpoint={a['vilt']}", f"data_path={a['arrow']}", "num_prompts=5", "rank=2"]


def meter_args(a: dict[str, Any], method: str = "apt") -> list[str]:
    return ["--model", "tiny-meter", "--method", method, f"checkpoint={a['ckpt']}", f"tokenizer={a['roberta_dir']}",
            f"data_path={a['arrow']}", "num_prompts=5", "rank=2", "image_size=64"]


def all_questions() -> list[str]:
    return [QUESTIONS[j % len(QUESTIONS)] for i in SPLITS["train"] + SPLITS["val"] for j in (i, i + 1)]


# ------------------------------------------------------------------------------------------------ ViLT

def test_vilt_gets_bert_ids_and_vilt_pixels(artefacts: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import ViltImageProcessor

    spy = Spy(monkeypatch)
    code, result, err = train(vilt_args(artefacts), tmp_path, capsys)
    assert code == 0, err
    # ids: each row is the BERT tokenizer's encoding of one question ([CLS] ... [SEP], [PAD]=0 after)
    bert = artefacts["bert"]
    expected = {tuple(bert(q, padding="max_length", max_length=24, truncation=True)["input_ids"]) for q in all_questions()}
    rows = [tuple(r.tolist()) for c in spy.calls for r in c["input_ids"]]
    assert rows and set(rows) <= expected
    assert all(r[0] == bert.cls_token_id and bert.sep_token_id in r for r in rows)
    # pixels: each row, cut to its unpadded size, is ViltImageProcessor's own output for one of the images
    proc = ViltImageProcessor.from_pretrained(str(artefacts["vilt"]))
    singles = [proc(Image.open(io.BytesIO(png(i))).convert("RGB"), return_tensors="pt") for i in range(len(SIZES))]
    for call in spy.calls:
        assert call["pixel_mask"] is not None
        for pixels, mask in zip(call["pixel_values"], call["pixel_mask"]):
            h, w = int(mask[:, 0].sum()), int(mask[0].sum())
            assert int(mask.sum()) == h * w  # the mask is one top-left rectangle
            matches = [s for s in singles if tuple(s["pixel_values"].shape[-2:]) == (h, w)
                       and torch.allclose(s["pixel_values"][0], pixels[:, :h, :w], atol=1e-5)]
            assert len(matches) == 1
            assert float(pixels[:, h:, :].abs().sum() + pixels[:, :, w:].abs().sum()) == 0.0
    # what the run logs: its tokenizer and image processing
    assert result["tokenizer"] == str(artefacts["vilt"])
    assert result["image_mean"] == pytest.approx([0.5] * 3) and result["image_std"] == pytest.approx([0.5] * 3)
    assert result["image_processor"] == str(artefacts["vilt"]) and result["image_size"] == 64
    assert result["recipe"] == "embedded" and result["trainable_groups"]["method"] == result["updated_params"]


def test_vilt_checkpoint_shapes_win_over_the_preset(artefacts: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The checkpoint has 3 layers of width 96 (the preset: 4 of 128): the logged cost is the checkpoint's."""
    code, result, err = train(vilt_args(artefacts), tmp_path, capsys)
    assert code == 0, err
    p, r, d = 5, 2, VILT_HIDDEN
    assert result["updated_params"] == VILT_LAYERS * (p * d + 2 * d * r + 1)
    # ViLT's real images vary per batch: the profile counts the preset's reference shape (64x64 -> 64 patches + CLS)
    n = 24 + 65
    assert result["additional_gmacs"] == pytest.approx(VILT_LAYERS * (2 * n * p * d + 2 * p * d * r) / 1e9, rel=1e-6)
    assert "reference" in result["profile_shape"]


# The authors' rule: a parameter trains when its name holds one of these (their ViLT/METER modules' names mapped
# to ours); METER's text and vision encoders never train, and METER's APT keeps its scale frozen.
AUTHORS_KEYS = ("head.", "pooler.", "token_type_embeddings", "extras.cls_token")
METHOD_KEYS = {"apt": ("site_methods",), "deep_prompt": ("site_methods",), "lora": ("lora_",), "adapter": ("adapter",), "head_only": ()}


def authors_trainable(model: VQAModel, method: str, meter: bool) -> set[str]:
    keys = AUTHORS_KEYS + METHOD_KEYS[method]
    names = {n for n, _ in model.named_parameters() if any(k in n for k in keys)}
    if meter:
        names = {n for n in names if not n.startswith(("backbone.text_encoder.", "backbone.vision_encoder."))}
        names = {n for n in names if not n.endswith("log_scale")}
    return names


@pytest.mark.parametrize("method", ["apt", "deep_prompt", "lora", "adapter", "head_only"])
def test_vilt_trainable_set_is_the_authors(method: str, artefacts: dict[str, Any], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    code, result, err = train(vilt_args(artefacts, method), tmp_path, capsys)
    assert code == 0, err
    trainable = {n for n, p in spy.model.named_parameters() if p.requires_grad}
    assert trainable == authors_trainable(spy.model, method, meter=False)
    # both token-type tables match the authors' name filter on ViLT: the modality one and BERT's own
    assert {"backbone.vilt.embeddings.token_type_embeddings.weight",
            "backbone.vilt.embeddings.text_embeddings.token_type_embeddings.weight"} <= trainable


def test_vilt_cls_replacement_starts_at_the_cls_embedding(artefacts: dict[str, Any], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The learnable [CLS] starts as BERT's embedding of [CLS] at position 0, and it is what the first text token gets."""
    spy = Spy(monkeypatch)
    code, _, err = train([*vilt_args(artefacts), "lr=1e-12", "head_lr=1e-12"], tmp_path, capsys)
    assert code == 0, err
    emb = spy.model.backbone.vilt.embeddings.text_embeddings
    cls = artefacts["bert"].cls_token_id
    word, pos, typ, norm = emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight, emb.LayerNorm
    expected = torch.nn.functional.layer_norm(word[cls] + pos[0] + typ[0], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    assert torch.allclose(spy.model.extras["cls_token"].detach(), expected.detach(), atol=1e-5)


# ------------------------------------------------------------------------------------------------ METER

def test_meter_ckpt_gets_roberta_ids_positions_and_clip_pixels(artefacts: dict[str, Any], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import CLIPImageProcessor

    spy = Spy(monkeypatch)
    positions: list[tuple[object, torch.Tensor]] = []  # (backbone, position ids it embedded)
    import apt_ray.models.meter as meter

    init = meter.MeterBackbone.__init__

    def init_and_hook(self, config):  # noqa: ANN001
        init(self, config)
        self.text_encoder.embeddings.position_embeddings.register_forward_hook(lambda m, a, o: positions.append((self, a[0].clone())))

    monkeypatch.setattr(meter.MeterBackbone, "__init__", init_and_hook)
    code, result, err = train(meter_args(artefacts), tmp_path, capsys)
    assert code == 0, err
    ids = torch.cat([c["input_ids"] for c in spy.calls])
    mask = torch.cat([c["attention_mask"] for c in spy.calls])
    # RoBERTa's ids: <s>=0 first, </s>=2 last real token, <pad>=1 after
    assert (ids[:, 0] == 0).all() and ((ids == 1) == (mask == 0)).all()
    last = mask.sum(1) - 1
    assert (ids[torch.arange(len(ids)), last] == 2).all()
    # position ids skip padding: 2, 3, ... for real tokens, the pad id (1) for padding
    pos = torch.cat([p for backbone, p in positions if backbone is spy.model.backbone and p.shape[1] == ids.shape[1]][: len(spy.calls)])
    expected = torch.where(mask.bool(), torch.cumsum(mask, 1) + 1, torch.ones_like(mask))
    assert torch.equal(pos, expected)
    # pixels: CLIP's own processor at 64 (resize the shorter side, centre crop, CLIP mean/std)
    clip = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    singles = [clip(Image.open(io.BytesIO(png(i))).convert("RGB"), return_tensors="pt")["pixel_values"][0] for i in range(len(SIZES))]
    for call in spy.calls:
        assert call["pixel_mask"] is None and call["pixel_values"].shape[-2:] == (64, 64)
        for pixels in call["pixel_values"]:
            assert sum(torch.allclose(s, pixels, atol=1e-4) for s in singles) == 1
    assert result["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert result["tokenizer"] == str(artefacts["roberta_dir"])


@pytest.mark.parametrize("method", ["apt", "deep_prompt"])
def test_meter_trainable_set_and_recipe_rates(method: str, artefacts: dict[str, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """apt-meter-vqa: base 2.5e-5; the method and poolers at x5, the head at x50, token types and [CLS] at x1;
    biases and LayerNorm weights without weight decay; AdamW betas (0.9, 0.98)."""
    spy = Spy(monkeypatch)
    code, result, err = train([*meter_args(artefacts, method), "recipe=apt-meter-vqa", "batch_size=4"], tmp_path, capsys)
    assert code == 0, err
    model = spy.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == authors_trainable(model, method, meter=True)
    name_of = {id(p): n for n, p in model.named_parameters()}
    base = 2.5e-5
    method_mult = {"apt": 5, "deep_prompt": 1}[method]  # APT lives in the cross-modal layers, their deep prompts outside
    rate = {"head.": 50 * base, "pooler.": 5 * base, "site_methods": method_mult * base, "token_type_embeddings": base, "extras.cls_token": base}
    seen = set()
    for group in spy.optimizer.param_groups:
        assert group["betas"] == (0.9, 0.98)
        for p in group["params"]:
            n = name_of[id(p)]
            want = next(v for k, v in rate.items() if k in n)
            assert group["initial_lr"] == pytest.approx(want), n
            decays = not (n.endswith("bias") or "LayerNorm" in n or ".net.1." in n)
            assert (group["weight_decay"] > 0) == decays, n
            seen.add(n)
    assert seen == trainable
    assert result["recipe"] == "apt-meter-vqa"


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("case", ["vocab", "pad", "ckpt_without_tokenizer", "missing_tokenizer", "missing_processor"])
def test_real_path_bad_input(case: str, artefacts: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = artefacts
    args, needle = {
        "vocab": (["--model", "tiny-vilt", f"checkpoint={a['small_vilt']}", f"tokenizer={a['vilt']}", f"data_path={a['arrow']}"],
                  "embedding table has 20 rows"),
        "pad": (["--model", "tiny-meter", f"checkpoint={a['meter_dir']}", f"tokenizer={a['vilt']}", f"data_path={a['arrow']}"],
                "pads with id 0 but the backbone expects padding id 1"),
        "ckpt_without_tokenizer": (["--model", "tiny-meter", f"checkpoint={a['ckpt']}", f"data_path={a['arrow']}"], "tokenizer=roberta-base"),
        "missing_tokenizer": ([*vilt_args(a), f"tokenizer={tmp_path / 'nowhere'}"], "tokenizer="),
        "missing_processor": ([*vilt_args(a), f"image_processor={tmp_path / 'nowhere'}"], "image_processor="),
    }[case]
    code, result, err = train(args, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and not result, err
    assert "Traceback" not in err and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "run").exists()
