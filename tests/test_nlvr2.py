"""The NLVR2 task: accuracy, statements, the ViLT/METER arrow layout, pair batches, token types, cost, one sweep."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from apt_ray.cli import main as apt_ray_main
from apt_ray.data.scenes import Scene, SceneObject
from apt_ray.data.spec import DataSpec
from apt_ray.tasks import get_task
from tests.helpers import sweep_child_runs


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def nlvr2_rows(pairs: int, split: str) -> dict[str, list]:
    """Rows as the authors' write_nlvr2.py stores them: red image_0, blue image_1, two statements per pair."""
    return {"image_0": [png((220, 20, 20)) for _ in range(pairs)], "image_1": [png((20, 20, 220)) for _ in range(pairs)],
            "questions": [[f"there is a red circle {i}", f"there are {i} blue objects"] for i in range(pairs)],
            "answers": [["True", "False"] if i % 2 == 0 else ["False", "True"] for i in range(pairs)],
            "identifier": [f"{split}-{i}-0" for i in range(pairs)]}


def write_nlvr2(folder: Path, split: str, rows: dict[str, list]) -> Path:
    """``nlvr2_<split>.arrow`` in the Arrow IPC file format, as the authors' scripts write it."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(rows)
    path = folder / f"nlvr2_{split}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
        writer.write_table(table)
    return path


# -- the metric -------------------------------------------------------------------------------------------------

def test_accuracy_on_hand_worked_batches() -> None:
    task = get_task("nlvr2")
    # argmax per row: 0, 1, 0, 0 against labels 0, 1, 1, 1 -> 2 of 4 right
    first = task.eval_batch(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.5, 0.2]]), {"labels": torch.tensor([0, 1, 1, 1])})
    # argmax 1, 1 against 1, 0 -> 1 of 2
    second = task.eval_batch(torch.tensor([[-1.0, 1.0], [0.0, 0.1]]), {"labels": torch.tensor([1, 0])})
    assert first == {"correct": 2.0, "count": 4.0} and second == {"correct": 1.0, "count": 2.0}
    sums = {k: first[k] + second[k] for k in task.eval_keys}
    assert task.metrics(sums) == {"val_nlvr2_accuracy": pytest.approx(50.0)}
    assert task.metrics({"correct": 3.0, "count": 4.0})["val_nlvr2_accuracy"] == pytest.approx(75.0)
    assert task.score == "val_nlvr2_accuracy" and task.backbone_passes == 2


def test_loss_is_cross_entropy_over_the_two_classes() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    loss = get_task("nlvr2").loss(logits, {"labels": torch.tensor([1, 0])})
    expected = (torch.log(torch.tensor(2.0)) + torch.log(1 + torch.exp(torch.tensor(-2.0)))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# -- synthetic statements ----------------------------------------------------------------------------------------

def _scene(*objects: tuple[str, str]) -> Scene:
    return Scene(tuple(SceneObject(c, s, "small", 0, i, 0.0, 0.0, 1.0) for i, (c, s) in enumerate(objects)), 30, 64)


def test_statement_truth_on_a_hand_built_pair() -> None:
    from apt_ray.data.nlvr2 import statement_text, statement_truth

    left, right = _scene(("red", "circle"), ("blue", "square")), _scene(("red", "circle"), ("green", "triangle"), ("red", "diamond"))
    cases = [("left", "red", "circle", None, True), ("left", "green", "triangle", None, False),
             ("right", "green", "triangle", None, True), ("right", "blue", "square", None, False),
             ("both", "red", "circle", None, True), ("both", "blue", "square", None, False),
             ("count", "red", None, 3, True), ("count", "red", None, 2, False), ("count", "yellow", None, 0, True),
             ("count", "blue", None, 1, True), ("left", "blue", None, None, True), ("right", "blue", None, None, False),
             ("both", "red", None, None, True), ("both", "green", None, None, False)]
    for kind, color, shape, count, truth in cases:
        assert statement_truth(kind, left, right, color, shape, count) is truth, (kind, color, shape, count)
    assert statement_text("both", "orange", "square", None) == "there is an orange square in the left and in the right"
    assert statement_text("count", "blue", None, 1) == "there is 1 blue object"
    assert statement_text("left", "red", None, None) == "there is a red object in the left"


def test_synthetic_splits_are_balanced_seeded_and_in_the_tiny_vocabulary() -> None:
    from apt_ray.data.nlvr2 import generate_split

    rows = generate_split(31, 3, 32, seed=5, split_index=0)  # 93 statements: balanced to within one
    answers = [a for row in rows["answers"] for a in row]
    assert len(answers) == 93 and abs(answers.count("True") - answers.count("False")) <= 1
    even = generate_split(20, 4, 32, seed=5, split_index=1)
    flat = [a for row in even["answers"] for a in row]
    assert flat.count("True") == flat.count("False") == 40
    assert set(t for row in even["statement_types"] for t in row) == {"left", "right", "both", "count"}
    assert generate_split(31, 3, 32, seed=5, split_index=0) == rows
    assert generate_split(31, 3, 32, seed=6, split_index=0)["questions"] != rows["questions"]
    # every word is one the shapes VQA vocabulary has (colours, shapes, numbers, places, function words)
    vocab = {"there", "is", "are", "a", "an", "in", "the", "left", "right", "and", "object", "objects",
             "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "diamond", "0", "1", "2", "3", "4"}
    words = {w for row in rows["questions"] + even["questions"] for q in row for w in q.split()}
    assert words <= vocab, words - vocab


# -- the arrow layout --------------------------------------------------------------------------------------------

def test_arrow_reader_reads_the_authors_layout(tmp_path: Path) -> None:
    from apt_ray.data.nlvr2 import load_arrow_split

    rows = nlvr2_rows(3, "train")
    write_nlvr2(tmp_path, "train", rows)
    source = load_arrow_split(tmp_path, "train")
    assert len(source) == 6
    assert source.statements == [q for row in rows["questions"] for q in row]
    assert source.labels == [1, 0, 0, 1, 1, 0]
    example = source[3]
    assert example["image_0"] == rows["image_0"][1] and example["image_1"] == rows["image_1"][1]
    assert example["statement"] == "there are 1 blue objects" and example["label"] == 1


def test_statement_subsets_are_balanced_and_seeded(tmp_path: Path) -> None:
    from apt_ray.data.nlvr2 import _limit, load_arrow_split

    rows = nlvr2_rows(4, "train")
    rows["answers"] = [["True", "True"], ["True", "True"], ["True", "False"], ["False", "True"]]  # 6 true, 2 false
    write_nlvr2(tmp_path, "train", rows)
    source = load_arrow_split(tmp_path, "train")
    four = _limit(source, 4, seed=3)
    assert sorted(four.labels) == [0, 0, 1, 1]
    assert sorted(_limit(source, 5, seed=3).labels) == [0, 0, 1, 1, 1]  # the odd one is true
    assert sorted(_limit(source, 7, seed=3).labels) == [0, 0, 1, 1, 1, 1, 1]  # only 2 false exist: the rest true
    assert _limit(source, 4, seed=3).identifiers == four.identifiers
    assert all(source.labels[source.identifiers.index(i)] == y for i, y in zip(four.identifiers, four.labels))
    assert _limit(source, 8, seed=3) is source and _limit(source, None, seed=3) is source


def test_arrow_build_data_validates_on_dev_and_batches_both_images(tmp_path: Path) -> None:
    from apt_ray.data.nlvr2 import build_data

    write_nlvr2(tmp_path, "train", nlvr2_rows(4, "train"))
    write_nlvr2(tmp_path, "dev", nlvr2_rows(2, "dev"))
    spec = DataSpec(kind="arrow", path=str(tmp_path), image_size=16, patch_size=8, max_text_len=12, batch_size=4)
    data = build_data(spec)
    assert data.val_split == "dev" and len(data.val_loader.dataset) == 4 and len(data.train_loader.dataset) == 8
    batch = next(iter(data.val_loader))
    assert set(get_task("nlvr2").batch_keys) <= set(batch) | {"pixel_mask", "pixel_mask_1"}
    assert batch["labels"].tolist() == [1, 0, 0, 1]
    assert batch["pixel_values"].shape == batch["pixel_values_1"].shape == (4, 3, 16, 16)
    # image_0 is red and image_1 blue: the red channel is higher in the first, the blue channel in the second
    assert (batch["pixel_values"][:, 0] > batch["pixel_values"][:, 2]).all()
    assert (batch["pixel_values_1"][:, 2] > batch["pixel_values_1"][:, 0]).all()


@pytest.mark.parametrize("lack,needle", [("answers", "lacks the columns answers"), ("image_1", "lacks the columns image_1"),
                                         ("one image", "has no image_1")])
def test_bad_arrow_files_are_refused(lack: str, needle: str, tmp_path: Path) -> None:
    from apt_ray.data.nlvr2 import load_arrow_split
    from apt_ray.errors import UserError

    rows = nlvr2_rows(2, "dev")
    if lack == "one image":
        rows["image_1"][1] = None
    else:
        del rows[lack]
    write_nlvr2(tmp_path, "dev", rows)
    with pytest.raises(UserError, match=needle):
        load_arrow_split(tmp_path, "dev")


# -- token types and the pair head -------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny-vilt", "tiny-meter"])
def test_two_passes_with_grown_token_types(model: str) -> None:
    from apt_ray.models.presets import build_backbone, get_preset

    torch.manual_seed(0)
    backbone = build_backbone(model).eval()
    task = get_task("nlvr2")
    inputs = task.profile_inputs(backbone, 8, get_preset(model).image_hw, seed=0)
    args = list(inputs.values())
    before = backbone(*args[:4])  # VQA's single pass, before the table grows
    table = backbone.extra_modules()["token_type"][0]
    rows = table.weight.detach().clone()
    head = task.make_head(backbone, None)
    grown = backbone.extra_modules()["token_type"][0].weight
    assert grown.shape[0] == 3 and torch.equal(grown[:2], rows) and torch.equal(grown[2], rows[1])
    # type 1 still reads the same row: VQA unchanged (ViLT's CPU forward itself varies by ~1e-7 between calls)
    assert torch.allclose(backbone(*args[:4]), before, atol=1e-6, rtol=0)
    with torch.no_grad():
        grown[2] += torch.randn(grown.shape[1])  # not a constant: the LayerNorms would cancel a uniform shift
    features = task.features(backbone, *args)
    assert features.shape == (1, 2 * backbone.pooled_size)
    assert torch.allclose(features[:, : backbone.pooled_size], before, atol=1e-6, rtol=0)
    image_1_as_type_1 = backbone(*args[:2], args[4], args[5])
    # the second image reads row 2
    assert (features[:, backbone.pooled_size:] - image_1_as_type_1).abs().max() > 1e-3
    assert head(features).shape == (1, 2)
    assert head.net[0].in_features == 2 * backbone.pooled_size and head.net[0].out_features == 2 * backbone.hidden_size


def test_profile_counts_two_passes_and_the_pair_head(capsys: pytest.CaptureFixture[str]) -> None:
    def prof(*task: str) -> dict:
        assert apt_ray_main(["profile", "--model", "tiny-meter", "--method", "apt", "--num-prompts", "4", "--rank", "2",
                             *task, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    pair, vqa = prof("--task", "nlvr2"), prof("--task", "vqa")
    assert pair["task"] == "nlvr2" and pair["backbone_passes"] == 2
    pooled, hidden, width = 128, 64, 3129  # tiny-meter: pooled = 2 x hidden
    vqa_head = pooled * 2 * hidden + 2 * hidden * width  # Linear(pooled, 2h), Linear(2h, 3129)
    pair_head = 2 * pooled * 2 * hidden + 2 * hidden * 2  # Linear(2 pooled, 2h), Linear(2h, 2)
    assert pair["base_gmacs"] * 1e9 == pytest.approx(2 * (vqa["base_gmacs"] * 1e9 - vqa_head) + pair_head, abs=2)
    assert pair["analytic_additional_gmacs"] == pytest.approx(2 * vqa["analytic_additional_gmacs"], rel=1e-12)
    assert pair["measured_additional_gmacs"] == pytest.approx(pair["analytic_additional_gmacs"], rel=1e-6)
    assert pair["updated_params"] == vqa["updated_params"]
    assert pair["head_params"] == (2 * pooled + 1) * 2 * hidden + 2 * 2 * hidden + (2 * hidden + 1) * 2
    assert pair["trainable_groups"]["token_type"] == 3 * hidden


# -- one sweep ---------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_an_nlvr2_sweep_logs_the_task_metrics_to_mlflow(tmp_path: Path) -> None:
    study = {"name": "nl", "model": "tiny-meter", "method": "apt", "num_trials": 2, "concurrency": 2, "seed": 0,
             "fixed": {"task": "nlvr2", "pretrained": False, "epochs": 1, "batch_size": 8, "num_train_images": 8,
                       "num_val_images": 4, "questions_per_image": 2, "num_prompts": 2, "rank": 2},
             "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}}
    children = sweep_child_runs(tmp_path, study)
    assert len(children) == 2
    for run in children:
        metrics = run.data.metrics
        assert "val_nlvr2_accuracy" in metrics and metrics["val_score"] == metrics["val_nlvr2_accuracy"]
        assert 0.0 <= metrics["val_nlvr2_accuracy"] <= 100.0
        assert run.data.params.get("task") == "nlvr2"
