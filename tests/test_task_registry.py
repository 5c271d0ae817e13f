"""The task registry: a task defined here, in the test (dominant-colour classification over its own random images,
with its own dataset, collate, head, cross-entropy loss and accuracy), trains through the unchanged training loop
on tiny-vilt and on the toy backbone; the VQA task's alias; name collisions and unknown names."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from apt_ray.config import TrainConfig, build_train_config
from apt_ray.data.collate import CollateOutput
from apt_ray.data.loaders import make_loader
from apt_ray.data.stats import BatchCounts, DataStats
from apt_ray.data.tokenizer import build_wordlevel_tokenizer
from apt_ray.errors import UserError
from apt_ray.models.presets import build_backbone
from apt_ray.tasks import (
    SCORE_KEY, RegistryError, Task, canonical_metric, get_task, read_metric, register_task, task_names, unregister_task,
)
from apt_ray.tasks.base import MODEL_INPUTS, TaskDefaults, pooled_features
from apt_ray.tasks.registry import BUILTIN_TASKS, registered_task, score_label
from apt_ray.train.loop import train_loop_per_worker
from tests.toy_backbone import TOY

COLOURS = ("red", "green", "blue")
QUESTION = "which colour dominates the image"


class ColourImages(Dataset):
    """Random images, each with one colour channel lifted: the label is that channel."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, len(COLOURS), (n,), generator=g)
        self.images = torch.randn(n, 3, size, size, generator=g) * 0.5
        self.images[torch.arange(n), self.labels] += 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class ColourCollate:
    def __init__(self, tokenizer: Any, text_len: int) -> None:
        enc = tokenizer(QUESTION, padding="max_length", truncation=True, max_length=text_len, return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> CollateOutput:
        b = len(items)
        batch = {"input_ids": self.ids.expand(b, -1).clone(), "attention_mask": self.mask.expand(b, -1).clone(),
                 "pixel_values": torch.stack([x for x, _ in items]), "colour": torch.tensor([y for _, y in items])}
        return CollateOutput(batch, BatchCounts(b, 0, 0))


class ColourData:
    """The toy task's bundle (see ``apt_ray.tasks.base.TaskData``)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.tokenizer = build_wordlevel_tokenizer([QUESTION, *COLOURS])
        collate = ColourCollate(self.tokenizer, spec.max_text_len)
        common = dict(seed=spec.seed, world_size=spec.world_size, rank=spec.rank)
        n_train, n_val = spec.max_train_questions or 32, spec.max_val_questions or 16
        self.train_loader = make_loader(ColourImages(n_train, spec.image_size, spec.seed), collate,
                                        DataStats("train", questions=n_train), batch_size=spec.batch_size, shuffle=True, **common)
        self.val_loader = make_loader(ColourImages(n_val, spec.image_size, spec.seed + 1), collate,
                                      DataStats("val", questions=n_val), batch_size=spec.batch_size, shuffle=False, **common)

    def image_processor_info(self) -> dict[str, Any]:
        return {"image_processor": "none (random tensors)"}


class ColourTask:
    """Which of red, green, blue dominates the image: one Linear layer, cross-entropy, accuracy as the score."""

    score = "val_colour_accuracy"
    eval_keys = ("correct", "count", "loss_sum")
    batch_keys = MODEL_INPUTS
    metric_aliases: dict[str, str] = {}

    def build_data(self, spec: Any) -> ColourData:
        return ColourData(spec)

    def make_head(self, backbone: nn.Module, data: ColourData) -> nn.Module:
        return nn.Linear(backbone.pooled_size, len(COLOURS))

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), batch["colour"])

    def eval_batch(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        y = batch["colour"]
        return {"correct": float((logits.argmax(dim=1) == y).sum()), "count": float(len(y)),
                "loss_sum": float(nn.functional.cross_entropy(logits, y, reduction="sum"))}

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        return {"val_colour_accuracy": 100.0 * sums["correct"] / n, "val_colour_loss": sums["loss_sum"] / n,
                "val_examples": sums["count"]}

    def head_width(self, data: ColourData) -> int:
        return len(COLOURS)

    def result_facts(self, data: ColourData) -> dict[str, Any]:
        return {"classes": len(COLOURS)}


@pytest.fixture
def colour_task():
    register_task("colour")(ColourTask)
    try:
        yield get_task("colour")
    finally:
        unregister_task("colour")
    assert "colour" not in task_names()


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APT_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


SMALL = dict(pretrained=False, max_train_questions=32, max_val_questions=16, batch_size=8, epochs=1, lr=3e-3, seed=0)


def _train(tmp_path, **kw) -> dict[str, Any]:
    return train_loop_per_worker({"task": "colour", **SMALL, "output_dir": str(tmp_path), **kw})


def test_the_toy_task_is_registered_and_implements_the_protocol(colour_task):
    assert isinstance(colour_task, ColourTask) and isinstance(colour_task, Task) and colour_task.name == "colour"
    assert task_names() == (*BUILTIN_TASKS, "colour")
    assert TrainConfig(task="colour").task == "colour" and TrainConfig().task == "vqa"
    assert isinstance(get_task("vqa"), Task)


def test_the_loop_trains_the_toy_task_and_reports_its_accuracy_as_the_score(tmp_path, colour_task):
    result = _train(tmp_path, model="tiny-vilt", method="apt", num_prompts=4)
    last = result["history"][-1]
    assert result["task"] == "colour" and result["epochs"] == 1 and result["global_step"] == 4  # 32 / 8
    assert last[SCORE_KEY] == last["val_colour_accuracy"] == result[SCORE_KEY] == result["val_colour_accuracy"]
    assert last["val_examples"] == 16.0 and 0.0 <= last[SCORE_KEY] <= 100.0
    # the accuracy is a multiple of 1/16 (16 validation images), and the loss the one the task computed
    assert (last[SCORE_KEY] * 16 / 100.0) == pytest.approx(round(last[SCORE_KEY] * 16 / 100.0))
    assert math.isfinite(last["val_colour_loss"]) and math.isfinite(last["train_loss"])
    assert result["classes"] == 3 and "majority_baseline" not in result and "val_vqa_score" not in result
    pooled = build_backbone("tiny-vilt").pooled_size
    assert result["trainable_groups"]["head"] == 3 * pooled + 3  # the task's own Linear head on the pooled features


@pytest.mark.parametrize("method", ["apt", "deep_prompt", "kv_prompt", "lora", "adapter", "head_only", "full"])
def test_the_toy_task_trains_on_the_toy_backbone(tmp_path, colour_task, method):
    """Every site method (and the two ends) trains the toy task on the toy backbone: nothing outside the tests knows either."""
    result = _train(tmp_path, model=TOY, method=method, num_prompts=2)
    last = result["history"][-1]
    assert result["model"] == TOY and result["global_step"] == 4
    assert last[SCORE_KEY] == last["val_colour_accuracy"] and math.isfinite(result["train_loss"])
    groups = result["trainable_groups"]
    assert groups["head"] == 32 * 3 + 3
    assert ("method" in groups) == (method != "head_only")


def test_a_task_without_the_optional_members_gets_their_defaults(colour_task):
    assert colour_task.features is pooled_features and colour_task.evaluate is None
    assert colour_task.backbone_passes == 1 and colour_task.default_head_width == TaskDefaults.default_head_width
    assert score_label("colour") == "validation colour accuracy" and score_label("vqa") == "validation VQA score"
    assert score_label(None) == score_label("no_such_task") == "validation score"


def _two_views(backbone: nn.Module, input_ids, attention_mask, pixel_values, pixel_mask=None) -> torch.Tensor:
    """The image and its mirror image, one backbone pass each, pooled features side by side."""
    first = backbone(input_ids, attention_mask, pixel_values, pixel_mask)
    return torch.cat([first, backbone(input_ids, attention_mask, pixel_values.flip(-1), pixel_mask)], dim=-1)


class TwoViewColourTask(ColourTask):
    """The colour task over two backbone passes, evaluated by its own pass over the validation images."""

    features = staticmethod(_two_views)
    backbone_passes = 2

    def make_head(self, backbone: nn.Module, data: ColourData) -> nn.Module:
        return nn.Linear(2 * backbone.pooled_size, len(COLOURS))

    def evaluate(self, model: nn.Module, data: ColourData, ctx: Any) -> dict[str, float]:
        right = seen = 0
        for batch in data.val_loader:
            logits = model(*(batch.get(k) for k in self.batch_keys))
            right += int((logits.argmax(dim=1) == batch["colour"]).sum())
            seen += len(batch["colour"])
        right, seen = ctx.all_sum([float(right), float(seen)])
        return {"val_colour_accuracy": 100.0 * right / seen, "val_images_seen": seen}


def test_a_task_with_two_passes_and_its_own_evaluation_trains_and_costs_twice(tmp_path):
    from apt_ray.methods.spec import MethodSpec
    from apt_ray.profile.cost import closed_form_cost, profile

    with registered_task("two_view", TwoViewColourTask):
        result = train_loop_per_worker({"task": "two_view", **SMALL, "model": TOY, "method": "apt", "num_prompts": 2,
                                        "output_dir": str(tmp_path)})
        spec = MethodSpec(name="apt", num_prompts=8, rank=4)
        once = closed_form_cost("tiny-vilt", spec, 24, (64, 64))
        twice = closed_form_cost("tiny-vilt", spec, 24, (64, 64), task="two_view")
        measured = profile("tiny-vilt", spec, task="two_view", num_answers=3)
    last = result["history"][-1]
    assert last["val_images_seen"] == 16.0 and last[SCORE_KEY] == last["val_colour_accuracy"]
    assert result["trainable_groups"]["head"] == 2 * 32 * 3 + 3  # the head reads both passes
    assert twice.additional_gmacs == pytest.approx(2 * once.additional_gmacs) and twice.updated_params == once.updated_params
    assert measured.backbone_passes == 2 and measured.task == "two_view"
    assert measured.measured_additional_gmacs == pytest.approx(twice.additional_gmacs, rel=1e-6)
    assert measured.analytic_additional_gmacs == pytest.approx(twice.additional_gmacs, rel=1e-9)


def test_the_linear_probe_needs_a_head_with_a_linear_form(tmp_path, colour_task):
    with pytest.raises(UserError, match="linear_probe needs a head with a linear form"):
        _train(tmp_path, model=TOY, method="linear_probe")


def test_unknown_task_gets_did_you_mean(colour_task):
    with pytest.raises(UserError) as err:
        get_task("colur")
    msg = str(err.value)
    assert "unknown task 'colur'" in msg and "did you mean 'colour'" in msg and f"choose one of {', '.join((*BUILTIN_TASKS, 'colour'))}" in msg
    with pytest.raises(UserError) as err:
        build_train_config(overrides={"task": "vqa2"})
    assert "unknown task 'vqa2'" in str(err.value) and "did you mean 'vqa'" in str(err.value)
    with pytest.raises(UserError) as err:
        get_task("zzzzzz")
    assert "did you mean" not in str(err.value) and "choose one of" in str(err.value)


def test_registering_a_name_twice_raises(colour_task):
    with pytest.raises(RegistryError, match="task 'colour' is already registered .*ColourTask"):
        register_task("colour")(type("Other", (ColourTask,), {}))
    with pytest.raises(RegistryError, match="task 'vqa' is already registered .*VQATask"):
        register_task("vqa")(type("Other", (ColourTask,), {}))
    assert isinstance(get_task("colour"), ColourTask) and type(get_task("vqa")).__name__ == "VQATask"


def test_an_alias_declared_two_ways_is_refused(colour_task):
    clash = type("Clash", (ColourTask,), {"metric_aliases": {"val_vqa_score": "val_colour_accuracy"}})
    with pytest.raises(RegistryError, match="maps metric 'val_vqa_score'"):
        register_task("clash")(clash)
    assert "clash" not in task_names()


def test_the_vqa_alias_maps_the_old_score_name():
    assert canonical_metric("val_vqa_score") == SCORE_KEY and canonical_metric("train_loss") == "train_loss"
    assert read_metric({"val_vqa_score": 41.0}, SCORE_KEY) == 41.0  # a run of an older version
    assert read_metric({"val_vqa_score": 41.0, SCORE_KEY: 42.0}, SCORE_KEY) == 42.0
    assert read_metric({"train_loss": 1.0}, SCORE_KEY) is None


def test_the_registry_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, apt_ray.config, apt_ray.tasks; from apt_ray.tasks import task_names; print(task_names()); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "vqa" in out.stdout, out.stderr
