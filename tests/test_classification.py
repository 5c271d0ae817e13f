"""The image classification task: accuracy, the synthetic set, the datasets / imagefolder readers, refusals, and
one small sweep logging the task's metrics to MLflow."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apt_ray.data.classification import (CLASS_NAMES, accuracy_counts, balanced_labels, build_classification_data,
                                         class_scene)
from apt_ray.data.scenes import encode_png, render_scene
from apt_ray.data.spec import DataSpec
from apt_ray.errors import UserError
from apt_ray.models.presets import build_backbone
from tests.helpers import sweep_child_runs
from apt_ray.tasks import get_task


def test_accuracy_hand_worked() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0],   # argmax 0, label 0: right
                           [0.0, 1.0, 3.0],   # argmax 2, label 1: wrong
                           [1.0, 1.0, 0.0],   # tie 0/1 -> 0, label 0: right
                           [5.0, 0.0, 0.0]])  # argmax 0, label 2: wrong
    labels = torch.tensor([0, 1, 0, 2])
    assert accuracy_counts(logits, labels) == (2.0, 4.0)
    task = get_task("classification")
    sums = task.eval_batch(logits, {"labels": labels})
    assert task.metrics(sums) == {"val_accuracy": 50.0}
    assert task.loss(logits, {"labels": labels}).item() == pytest.approx(
        float(np.mean([-np.log(np.exp(r[y]) / np.exp(r).sum()) for r, y in zip(logits.numpy(), labels.numpy())])), rel=1e-6)


def test_synthetic_classes_are_balanced_and_well_defined() -> None:
    labels = balanced_labels(np.random.default_rng(0), 100, len(CLASS_NAMES))
    counts = Counter(labels.tolist())
    assert len(counts) == 24 and max(counts.values()) - min(counts.values()) <= 1
    rng = np.random.default_rng(5)
    for label in range(len(CLASS_NAMES)):
        scene = class_scene(rng, label, 64)
        main, *others = scene.objects
        assert f"{main.color} {main.shape}" == CLASS_NAMES[label]
        assert all(o.radius < main.radius and f"{o.color} {o.shape}" != CLASS_NAMES[label] for o in others)
    same = [encode_png(render_scene(class_scene(np.random.default_rng(9), 3, 64))) for _ in range(2)]
    assert same[0] == same[1]


def _spec(tmp_path: Path, **kw) -> DataSpec:
    return DataSpec(**{"path": str(tmp_path), "num_train": 48, "num_val": 24, "image_size": 64,
                       "processor_family": "meter", "patch_size": 8, "batch_size": 8, **kw})


def test_synthetic_set_loads_with_class_names(tmp_path: Path) -> None:
    data = build_classification_data(_spec(tmp_path))
    assert data.class_names == list(CLASS_NAMES) and data.num_classes == 24
    assert data.prompts[0] == "a red circle"
    batch = next(iter(data.train_loader))
    assert batch["pixel_values"].shape == (8, 3, 64, 64) and batch["labels"].dtype == torch.long
    ids = data.tokenizer(data.prompts)["input_ids"]
    assert all(data.tokenizer.unk_token_id not in row for row in ids)  # every class word is in the vocabulary
    again = build_classification_data(_spec(tmp_path))
    assert torch.equal(next(iter(again.val_loader))["pixel_values"], next(iter(data.val_loader))["pixel_values"])


def _png(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (40, 30), color)


def test_datasets_folder_reader(tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["cat", "dog", "bird"])})
    rows = {"train": [0, 1, 2, 1, 1], "validation": [2, 0]}
    DatasetDict({s: Dataset.from_dict({"image": [_png((40 * v, 0, 0)) for v in ls], "label": ls}, features=features)
                 for s, ls in rows.items()}).save_to_disk(str(tmp_path / "ds"))
    data = build_classification_data(_spec(tmp_path, kind="hf", path=str(tmp_path / "ds"), batch_size=2))
    assert data.class_names == ["cat", "dog", "bird"] and data.prompts == ["a photo of a cat.", "a photo of a dog.",
                                                                         "a photo of a bird."]
    labels = torch.cat([b["labels"] for b in data.val_loader]).tolist()
    assert labels == [2, 0]
    assert next(iter(data.val_loader))["pixel_values"].shape == (2, 3, 64, 64)  # CLIP's resize + centre crop
    assert data.majority_baseline == 0.0  # train's most frequent class (dog) is absent from val
    assert get_task("classification").result_facts(data)["chance_accuracy"] == pytest.approx(100 / 3)


def test_imagefolder_reader(tmp_path: Path) -> None:
    for split, per_class in (("train", {"ant": 2, "bee": 3}), ("validation", {"ant": 1, "bee": 1})):
        for name, n in per_class.items():
            (tmp_path / "imgs" / split / name).mkdir(parents=True)
            for i in range(n):
                _png((10 * i, 200, 0)).save(tmp_path / "imgs" / split / name / f"{i}.png")
    data = build_classification_data(_spec(tmp_path, kind="hf", path=str(tmp_path / "imgs"), batch_size=4))
    assert data.class_names == ["ant", "bee"]
    assert sorted(torch.cat([b["labels"] for b in data.train_loader]).tolist()) == [0, 0, 1, 1, 1]


def test_dataset_without_label_is_refused(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"image": [_png((0, 0, 0))], "category": [0]})
    DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(UserError, match="has no 'label' column"):
        build_classification_data(_spec(tmp_path, kind="hf", path=str(tmp_path / "nolabel")))


def test_fused_backbones_are_refused() -> None:
    task = get_task("classification")
    vilt = build_backbone("tiny-vilt")
    with pytest.raises(UserError, match="no image-only path"):
        task.profile_head(vilt, 3)


def test_text_sites_need_the_zero_shot_classifier(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="add classifier=zero_shot"):
        get_task("classification").build_data(_spec(tmp_path, text_sites=True))


def test_zero_shot_head_uses_class_prompts(tmp_path: Path) -> None:
    """The zero-shot logits equal exp(logit_scale) x cosine between the image and prompt embeddings, recomputed here
    from the backbone's CLIPModel."""
    torch.manual_seed(0)
    data = build_classification_data(_spec(tmp_path, classifier="zero_shot"))
    backbone = build_backbone("tiny-clip", vocab_size=len(data.tokenizer)).eval()
    head = get_task("classification").make_head(backbone, data)
    batch = next(iter(data.val_loader))
    enc = data.tokenizer(data.prompts, padding="max_length", max_length=40, return_tensors="pt")
    with torch.no_grad():
        logits = head(backbone.image_features(batch["pixel_values"]))
        want = backbone.clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             pixel_values=batch["pixel_values"]).logits_per_image
    assert logits.shape == (8, 24) and torch.allclose(logits, want, atol=1e-5)


@pytest.mark.integration
def test_sweep_logs_classification_metrics(tmp_path: Path) -> None:
    study = {"name": "cls-it", "model": "tiny-clip", "method": "apt", "data": "synthetic",
             "fixed": {"task": "classification", "pretrained": False, "epochs": 1, "batch_size": 8,
                       "num_train_images": 32, "num_val_images": 16},
             "search_space": {"method": {"type": "categorical", "choices": ["apt", "head_only"]}},
             "initial_points": [{"method": "apt"}, {"method": "head_only"}], "num_trials": 2, "concurrency": 2,
             "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}, "seed": 0}
    runs = sweep_child_runs(tmp_path, study)
    assert len(runs) == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    for run in runs:
        assert run.data.params["task"] == "classification"
        assert 0.0 <= run.data.metrics["val_accuracy"] <= 100.0
        assert run.data.metrics["val_score"] == run.data.metrics["val_accuracy"]
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert len(history) == 1
