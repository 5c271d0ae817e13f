"""Image-text retrieval: recall@K on hand-worked score matrices (ties pessimistic), its chance level, the rank loss,
the pair batching, the synthetic captions, the Flickr30K arrow reader on files written here in the ViLT/METER layout,
re-ranking against the full evaluation, the profile of the rank head, and one sweep logging the task's metrics."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from apt_ray.cli import main as apt_ray_main
from apt_ray.data.recall import chance_recall, recall_hits, recall_metrics
from apt_ray.data.retrieval import ARROW_PREFIX, SYNTHETIC_CAPTIONS_PER_IMAGE, read_arrow_split, synthetic_splits
from apt_ray.errors import UserError
from apt_ray.tasks import get_task
from apt_ray.tasks.registry import load_builtins

load_builtins()  # the built-in tasks register in their listed order before this module imports one of them directly
from apt_ray.tasks.retrieval import pair_features, rank_loss  # noqa: E402
from tests.helpers import sweep_child_runs


# -- recall@K -----------------------------------------------------------------------------------------------------

def test_recall_on_a_hand_worked_matrix_with_ties() -> None:
    # 3 images; captions 0,1 describe image 0, caption 2 image 1, caption 3 image 2. Rows: captions, columns: images.
    scores = torch.tensor([
        [0.9, 0.1, 0.2],   # IR: image 0 first -> rank 1
        [0.5, 0.5, 0.1],   # IR: tied with image 1 -> pessimistic rank 2
        [0.3, 0.3, 0.3],   # IR: tied with both -> rank 3
        [0.0, 0.2, 0.1],   # IR: image 2 behind image 1 -> rank 2
    ])
    owner = torch.tensor([0, 0, 1, 2])
    hits = recall_hits(scores, owner, ks=(1, 2, 3))
    assert (hits["ir_hits_1"], hits["ir_hits_2"], hits["ir_hits_3"]) == (1, 3, 4)
    # TR: image 0's best caption scores 0.9, no other image's caption reaches it -> rank 1.
    # image 1: its caption scores 0.3; captions of others at >= 0.3: caption 1 (0.5) -> rank 2.
    # image 2: its caption scores 0.1; others >= 0.1: captions 0 (0.2) and 2 (0.3) -> rank 3 (caption 1's 0.1 ties too)
    #          caption 1 scores 0.1 for image 2: a tie, so it counts ahead -> rank 4.
    assert (hits["tr_hits_1"], hits["tr_hits_2"], hits["tr_hits_3"]) == (1, 2, 2)
    assert hits["captions"] == 4 and hits["images"] == 3
    metrics = recall_metrics(hits, ks=(1, 2, 3))
    assert metrics["val_ir_r1"] == pytest.approx(25.0) and metrics["val_tr_r2"] == pytest.approx(200 / 3)
    assert metrics["val_recall_mean"] == pytest.approx((25 + 75 + 100 + 100 / 3 + 200 / 3 + 200 / 3) / 6)


def test_a_constant_scorer_retrieves_nothing_at_r1() -> None:
    scores = torch.zeros(6, 3)
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    hits = recall_hits(scores, owner, ks=(1, 3, 4, 5))
    assert hits["ir_hits_1"] == 0 and hits["ir_hits_3"] == 6  # every image ties: the positive ranks last (3rd)
    assert hits["tr_hits_4"] == 0 and hits["tr_hits_5"] == 3  # 4 other captions tie ahead of the best positive


def test_tr_takes_the_best_own_caption_and_ties_with_negatives_rank_it_later() -> None:
    # captions 0, 1 describe image 0 and caption 2 image 1
    scores = torch.tensor([[0.2, 0.6], [0.9, 0.6], [0.9, 0.6]])
    hits = recall_hits(scores, torch.tensor([0, 0, 1]), ks=(1, 2, 3))
    # image 0: best own caption 0.9 (caption 1), tied with caption 2 -> rank 2; its caption 0 (0.2) does not count
    # image 1: own caption 0.6 tied with both captions of image 0 -> rank 3
    assert (hits["tr_hits_1"], hits["tr_hits_2"], hits["tr_hits_3"]) == (0, 1, 2)


def test_chance_levels_by_hand() -> None:
    two = chance_recall([1, 1], ks=(1,))
    assert two["val_ir_r1"] == pytest.approx(50.0) and two["val_tr_r1"] == pytest.approx(50.0)
    three = chance_recall([2, 2, 2], ks=(1, 5))
    assert three["val_ir_r1"] == pytest.approx(100 / 3) and three["val_ir_r5"] == pytest.approx(100.0)
    assert three["val_tr_r1"] == pytest.approx(100 * (1 - 4 / 6))  # 2 of 6 captions are positives
    assert three["val_tr_r5"] == pytest.approx(100.0)  # 4 negatives cannot fill 5 places


# -- loss and batching ----------------------------------------------------------------------------------------------

def test_rank_loss_random_and_hard_negatives() -> None:
    logits = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.0, 4.0, 1.0, 2.0]).view(-1, 1)  # 2 images x 4 candidates
    batch = {"target": torch.tensor([0, 0]), "negative": torch.tensor([[False, True, True, True]] * 2),
             "num_negatives": torch.tensor([3, 3])}
    want = (torch.logsumexp(torch.tensor([5.0, 1, 3, 2]), 0) - 5 + torch.logsumexp(torch.tensor([0.0, 4, 1, 2]), 0) - 0) / 2
    assert rank_loss(logits, batch).item() == pytest.approx(want.item(), rel=1e-6)
    # hard: keep the 1 highest-scoring negative; row 0's column 2 is not a negative (e.g. the same image)
    hard = {"target": torch.tensor([0, 1]), "negative": torch.tensor([[False, True, False, True], [True, False, True, True]]),
            "num_negatives": torch.tensor([1, 1])}
    want = (math.log1p(math.exp(2 - 5)) + math.log1p(math.exp(2 - 4))) / 2  # row 0: [5 vs 2], row 1: [4 vs 2]
    assert rank_loss(logits, hard).item() == pytest.approx(want, rel=1e-6)


class Recorder(torch.nn.Module):
    """Returns, per pair, the first text id and the image's mean pixel: which image met which text."""

    def forward(self, input_ids, attention_mask, pixel_values, pixel_mask=None):
        return torch.stack([input_ids[:, 0].float(), pixel_values.mean(dim=(1, 2, 3))], dim=1)


def test_pair_features_give_each_image_its_group_of_captions() -> None:
    ids = torch.arange(6).view(6, 1)
    pixels = torch.stack([torch.full((3, 2, 2), 10.0), torch.full((3, 2, 2), 20.0)])
    out = pair_features(Recorder(), ids, torch.ones_like(ids), pixels, None)
    assert out[:, 0].tolist() == [0, 1, 2, 3, 4, 5] and out[:, 1].tolist() == [10, 10, 10, 20, 20, 20]
    with pytest.raises(ValueError):
        pair_features(Recorder(), ids[:5], torch.ones(5, 1), pixels, None)


def _collator(negatives: str, seed: int = 0):
    from apt_ray.data.preprocess import default_image_processor
    from apt_ray.data.retrieval import NegativesCollator
    from apt_ray.data.tokenizer import build_wordlevel_tokenizer

    split = synthetic_splits({"train": 10}, image_size=32, seed=0)["train"]
    tok = build_wordlevel_tokenizer(sorted(set(split.captions)))
    collate = NegativesCollator(tok, split, image_processor=default_image_processor("meter", 32, 8), max_text_len=64,
                                num_negatives=3, negatives=negatives, seed=seed)
    return split, tok, collate


def test_random_negatives_are_captions_of_other_images_and_seeded() -> None:
    from apt_ray.data.retrieval import PairDataset

    split, tok, collate = _collator("random")
    pairs = PairDataset(split)
    examples = [pairs[j] for j in (0, 3, 4, 9)]  # captions of images 0, 1, 2, 4
    batch = collate(examples).batch
    texts = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
    owner = {t.replace(" ", ""): i for t, i in zip(split.captions, split.caption_image)}
    assert batch["input_ids"].shape[0] == 4 * 4 and batch["pixel_values"].shape[0] == 4
    for row, ex in enumerate(examples):
        group = [owner[t.replace(" ", "")] for t in texts[4 * row:4 * row + 4]]
        assert group[0] == ex["image_index"] and ex["image_index"] not in group[1:]
    assert batch["target"].tolist() == [0] * 4 and batch["negative"][:, 0].sum() == 0 and batch["negative"][:, 1:].all()
    again = _collator("random")[2](examples).batch
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert not torch.equal(_collator("random", seed=1)[2](examples).batch["input_ids"], batch["input_ids"])


def test_hard_negatives_pair_every_image_with_every_caption_of_the_batch() -> None:
    from apt_ray.data.retrieval import PairDataset

    split, tok, collate = _collator("hard")
    pairs = PairDataset(split)
    examples = [pairs[j] for j in (0, 1, 2)]  # image 0 twice (its two captions), image 1 once
    batch = collate(examples).batch
    assert batch["input_ids"].shape[0] == 9 and batch["target"].tolist() == [0, 1, 2]
    assert batch["negative"].tolist() == [[False, False, True], [False, False, True], [True, True, False]]


# -- synthetic set --------------------------------------------------------------------------------------------------

def test_synthetic_captions_are_distinct_across_images_and_seeded() -> None:
    a = synthetic_splits({"train": 120, "val": 40}, image_size=32, seed=3)
    b = synthetic_splits({"train": 120, "val": 40}, image_size=32, seed=3)
    for name in ("train", "val"):
        split = a[name]
        assert split.captions_per_image == [SYNTHETIC_CAPTIONS_PER_IMAGE] * len(split.image_ids)
        owners: dict[str, set[int]] = {}
        for text, i in zip(split.captions, split.caption_image):
            owners.setdefault(text, set()).add(i)
        assert all(len(o) == 1 for o in owners.values())  # no text describes two images
        assert list(split.images) == list(b[name].images) and split.captions == b[name].captions
    assert not set(a["train"].captions) & set(a["val"].captions)  # validation scenes are withheld from training


# -- arrow reader ---------------------------------------------------------------------------------------------------

def png(i: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30 * i % 255, 100, 200)).save(buf, format="PNG")
    return buf.getvalue()


def write_f30k(folder: Path, split: str, rows: dict[str, list], prefix: str = ARROW_PREFIX) -> Path:
    """One arrow file as ViLT's write_f30k_karpathy writes it (IPC file format)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pydict(rows)
    path = folder / f"{prefix}_{split}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def f30k_rows(n: int, split: str, captions: int = 5) -> dict[str, list]:
    return {"image": [png(i) for i in range(n)],
            "caption": [[f"photo {i} number {c}" for c in range(captions)] for i in range(n)],
            "image_id": [f"{1000 + i}.jpg" for i in range(n)], "split": [split] * n}


def test_arrow_reader_on_the_vilt_meter_layout(tmp_path: Path) -> None:
    write_f30k(tmp_path, "val", f30k_rows(3, "val"))
    split = read_arrow_split(tmp_path, "val")
    assert split.image_ids == ["1000.jpg", "1001.jpg", "1002.jpg"]
    assert len(split.captions) == 15 and split.captions[6] == "photo 1 number 1" and split.caption_image[6] == 1
    assert split.captions_per_image == [5, 5, 5]
    assert split.images[2] == png(2)


@pytest.mark.parametrize("drop,needle", [(("caption",), "lacks the column(s) caption"),
                                         (("image", "image_id"), "lacks the column(s) image, image_id")])
def test_arrow_missing_columns_are_named(tmp_path: Path, drop: tuple[str, ...], needle: str) -> None:
    rows = {k: v for k, v in f30k_rows(2, "val").items() if k not in drop}
    write_f30k(tmp_path, "val", rows)
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_arrow_split(tmp_path, "val")


def test_arrow_captions_without_images_are_refused(tmp_path: Path) -> None:
    rows = f30k_rows(3, "val")
    rows["image"][1] = b""
    write_f30k(tmp_path, "val", rows)
    with pytest.raises(UserError, match=r"captions but no image bytes in 1 of its 3 rows \(image_id 1001.jpg\)"):
        read_arrow_split(tmp_path, "val")


def test_train_on_arrow_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`apt-ray train task=retrieval data=arrow` reads the files (images of another size, 5 captions each)."""
    write_f30k(tmp_path / "f30k", "train", f30k_rows(6, "train"))
    write_f30k(tmp_path / "f30k", "val", f30k_rows(4, "val"))
    out = tmp_path / "result.json"
    code = apt_ray_main(["train", "--model", "tiny-meter", "--method", "head_only", "task=retrieval", "pretrained=false",
                         "data=arrow", f"data_path={tmp_path / 'f30k'}", "epochs=1", "max_steps=2", "batch_size=4",
                         "num_negatives=2", f"output_dir={tmp_path / 'out'}", "--json-out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["images_ranked"] == 4 and result["captions_ranked"] == 20
    assert {"val_ir_r1", "val_ir_r5", "val_ir_r10", "val_tr_r1", "val_tr_r5", "val_tr_r10", "val_recall_mean"} <= set(result)
    assert result["val_score"] == result["val_recall_mean"]


# -- evaluation and re-ranking --------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: this machine's cores are shared, and two threads contend badly for tiny forwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _eval_setup(model: str, **spec_fields):
    from apt_ray.config import TrainConfig
    from apt_ray.models.presets import build_backbone
    from apt_ray.models.task_model import TaskModel
    from apt_ray.tasks.base import EvalContext

    cfg = TrainConfig(model=model, task="retrieval", pretrained=False, max_train_questions=8, max_val_questions=6,
                      num_negatives=2, batch_size=4, **spec_fields)
    task = get_task("retrieval")
    data = task.build_data(cfg.data_spec())
    torch.manual_seed(0)
    backbone = build_backbone(model, None, vocab_size=len(data.tokenizer), pad_token_id=data.tokenizer.pad_token_id)
    net = TaskModel(backbone, task.make_head(backbone, data), features=task.features).eval()
    ctx = EvalContext(torch.device("cpu"), torch.autocast("cpu", enabled=False), 0, 1, lambda v: v)
    return task, data, net, ctx


@pytest.fixture(scope="module")
def meter_eval():
    """A random tiny METER with the rank head, 6 val images x 2 captions, and its full score matrix."""
    from apt_ray.tasks.retrieval import score_matrix

    task, data, net, ctx = _eval_setup("tiny-meter")
    with torch.no_grad():
        full = score_matrix(net, data, ctx)
    return task, data, net, ctx, full


def test_rerank_with_k_at_least_every_candidate_equals_the_full_evaluation(meter_eval) -> None:
    from dataclasses import replace as dc_replace

    from apt_ray.tasks.retrieval import score_matrix

    task, data, net, ctx, full = meter_eval
    m, n = full.shape
    assert (m, n) == (12, 6)
    with torch.no_grad():
        wide = dc_replace(data, spec=data.spec.model_copy(update={"rerank_top_k": max(m, n)}))
        assert torch.equal(score_matrix(net, wide, ctx), full)
        narrow = dc_replace(data, spec=data.spec.model_copy(update={"rerank_top_k": 2}))
        part = score_matrix(net, narrow, ctx)
    scored = torch.isfinite(part)
    # the pairs kept score as in the full matrix (other batch compositions: float rounding only)
    assert torch.allclose(part[scored], full[scored], rtol=0, atol=1e-6)
    assert (scored.sum(dim=1) >= 2).all() and (scored.sum(dim=0) >= 2).all() and not scored.all()


def test_rerank_needs_unimodal_states() -> None:
    with pytest.raises(UserError, match="rerank_top_k=3 ranks candidates by the backbone's unimodal"):
        _eval_setup("tiny-vilt", rerank_top_k=3)


def test_evaluation_is_split_over_ranks_and_summed(meter_eval) -> None:
    """Two ranks each score their own caption rows; the sum of their matrices is the one-rank matrix."""
    from apt_ray.tasks.base import EvalContext
    from apt_ray.tasks.retrieval import score_matrix

    _, data, net, ctx, full = meter_eval
    with torch.no_grad():
        parts = [score_matrix(net, data, EvalContext(ctx.device, ctx.autocast, r, 2, lambda v: v)) for r in (0, 1)]
    assert torch.allclose(parts[0] + parts[1], full, rtol=0, atol=1e-6)  # batches of other rows: rounding only
    assert (parts[0][1::2] == 0).all() and (parts[1][0::2] == 0).all()


# -- profile --------------------------------------------------------------------------------------------------------

def test_profile_of_the_rank_head_equals_the_closed_form(capsys: pytest.CaptureFixture[str]) -> None:
    from apt_ray.methods.spec import MethodSpec
    from apt_ray.profile.cost import closed_form_cost

    def prof(*extra: str) -> dict:
        assert apt_ray_main(["profile", "--model", "tiny-meter", "--method", "apt", "--num-prompts", "4", "--rank", "2",
                             "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    retrieval, vqa = prof("--task", "retrieval"), prof("--task", "vqa")
    pooled, hidden, width = 128, 64, 3129  # tiny-meter: pooled = 2 x hidden; VQA head: Linear(pooled, 2h), Linear(2h, w)
    head_difference = (pooled * 2 * hidden + 2 * hidden * width) - pooled * 1
    assert (vqa["base_gmacs"] - retrieval["base_gmacs"]) * 1e9 == pytest.approx(head_difference, abs=1)
    closed = closed_form_cost("tiny-meter", MethodSpec(name="apt", num_prompts=4, rank=2), retrieval["text_len"],
                              tuple(retrieval["image_hw"]), task="retrieval")
    assert retrieval["analytic_additional_gmacs"] == pytest.approx(closed.additional_gmacs, rel=1e-12)
    assert retrieval["measured_additional_gmacs"] == pytest.approx(closed.additional_gmacs, rel=1e-6)
    assert retrieval["head_params"] == pooled + 1


# -- one sweep ------------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_a_retrieval_sweep_logs_the_task_metrics_to_mlflow(tmp_path: Path) -> None:
    study = {"name": "rt", "model": "tiny-meter", "method": "apt", "num_trials": 2, "concurrency": 2, "seed": 0,
             "fixed": {"task": "retrieval", "pretrained": False, "epochs": 1, "batch_size": 8, "num_negatives": 2,
                       "max_train_questions": 8, "max_val_questions": 4, "num_prompts": 2, "rank": 2},
             "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}}
    children = sweep_child_runs(tmp_path, study)
    assert len(children) == 2
    for run in children:
        metrics = run.data.metrics
        assert {"val_ir_r1", "val_ir_r5", "val_ir_r10", "val_tr_r1", "val_tr_r5", "val_tr_r10", "val_recall_mean"} <= set(metrics)
        assert metrics["val_score"] == metrics["val_recall_mean"]
        assert run.data.params.get("task") == "retrieval"
