"""The training loop: it learns, it is reproducible, and it resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apt_ray.cli import main
from apt_ray.config import build_train_config
from apt_ray.errors import UserError
from apt_ray.train.checkpoint import HEAD_WEIGHTS, METHOD_WEIGHTS, method_size_bytes
from apt_ray.train.loop import Trainer, train_loop_per_worker
from apt_ray.train.session import LocalSession, latest_checkpoint

TINY = dict(model="tiny-vilt", pretrained=False, num_train_images=48, num_val_images=12, questions_per_image=2,
            batch_size=8, epochs=2, lr=3e-3, method="apt", num_prompts=4)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APT_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(tmp_path: Path, **kw) -> dict:
    return train_loop_per_worker({**TINY, "output_dir": str(tmp_path), **kw})


def test_same_seed_same_metrics(tmp_path):
    a = _run(tmp_path / "a", max_steps=4)
    b = _run(tmp_path / "b", max_steps=4)
    c = _run(tmp_path / "c", max_steps=4, seed=1)
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert a["val_vqa_score"] == b["val_vqa_score"]
    assert a["history"][-1]["train_loss"] != c["history"][-1]["train_loss"]


def test_result_times_the_set_up_before_the_first_step(tmp_path):
    """started_unix/setup_s (what benchmarks/trial_overhead.py and the sweeps' start-up figure rest on): the set-up
    lies between the call and the end of the run, and it is not the training itself."""
    import time

    t0 = time.time()
    res = _run(tmp_path, max_steps=4)
    t1 = time.time()
    assert t0 <= res["started_unix"] <= res["started_unix"] + res["setup_s"] <= t1
    assert res["setup_s"] > 0 and res["torch_threads"] >= 1
    train_s = res["global_step"] * res["step_time_ms"] / 1000
    assert res["setup_s"] + train_s <= t1 - t0
    epoch = res["history"][-1]  # the epoch's training time and throughput give back its samples (the scaling study's sums)
    assert 0 < epoch["train_time_s"] <= t1 - t0
    assert epoch["samples_per_s"] * epoch["train_time_s"] == pytest.approx(res["global_step"] * TINY["batch_size"])


def test_resumed_at_the_final_checkpoint_reports_once_more(tmp_path):
    """A run cut off after its last checkpoint (a killed sweep driver) is resumed with nothing left to train: it
    reports its last metrics again, or a Tune trial waiting on it would get no result."""
    done = _run(tmp_path / "a", epochs=1)
    session = LocalSession(tmp_path / "b", resume_from=str(tmp_path / "a"))
    cfg = build_train_config(overrides={**TINY, "epochs": 1, "output_dir": str(tmp_path / "b")})
    again = Trainer(cfg, session).fit()
    assert again["global_step"] == done["global_step"] and again["val_vqa_score"] == done["val_vqa_score"]
    assert session.history == [done["history"][-1]]


def test_short_run_lowers_the_loss(tmp_path):
    cfg = build_train_config(overrides={**TINY, "epochs": 3, "output_dir": str(tmp_path), "lr": 5e-3, "method": "linear_probe"})
    trainer = Trainer(cfg, LocalSession(tmp_path))
    result = trainer.fit()
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    assert result["global_step"] == 3 * trainer.steps_per_epoch


def test_resume_continues_at_the_same_step_with_the_same_next_loss(tmp_path):
    cfg = build_train_config(overrides={**TINY, "output_dir": str(tmp_path / "full")})
    uninterrupted = Trainer(cfg, LocalSession(tmp_path / "full"))
    per_epoch = uninterrupted.steps_per_epoch
    losses: list[float] = []
    step = uninterrupted._train_step
    uninterrupted._train_step = lambda batch: losses.append(step(batch)) or losses[-1]  # type: ignore[method-assign]
    result_full = uninterrupted.fit()

    # The epoch-1 checkpoint is what a run killed during epoch 2 leaves behind.
    ckpt = tmp_path / "full" / "checkpoints" / f"step_{per_epoch:08d}"
    assert latest_checkpoint(ckpt) == ckpt
    resumed = Trainer(cfg, LocalSession(tmp_path / "resumed", resume_from=ckpt))
    result = resumed.fit()
    assert result["global_step"] == result_full["global_step"] == 2 * per_epoch
    assert resumed.first_losses[0] == pytest.approx(losses[per_epoch], rel=1e-6)
    assert result["history"][1]["train_loss"] == pytest.approx(result_full["history"][1]["train_loss"], rel=1e-6)
    assert result["val_vqa_score"] == pytest.approx(result_full["val_vqa_score"])


def test_method_only_checkpoint_is_small(tmp_path):
    _run(tmp_path, max_steps=1, epochs=1)
    ckpt = latest_checkpoint(tmp_path)
    from apt_ray.models.presets import build_backbone

    backbone = build_backbone("tiny-vilt", vocab_size=64)
    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    assert method_size_bytes(ckpt) < 0.05 * backbone_bytes
    from safetensors.torch import load_file

    method, head = set(load_file(str(ckpt / METHOD_WEIGHTS))), set(load_file(str(ckpt / HEAD_WEIGHTS)))
    # APT's per-site parameters and the authors' trained extras (poolers, token types, learnable [CLS]); no other backbone weight
    assert any("site_methods" in n for n in method)
    assert all(any(k in n for k in ("site_methods", "pooler.", "token_type_embeddings", "extras.cls_token")) for n in method), method
    assert head and all(n.startswith("head.") for n in head)


def test_cli_train_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["train", "--model", "tiny-vilt", "--method", "linear_probe", "--epochs", "1", "--json-out", str(out)]
    args += [f"{k}={v}" for k, v in TINY.items() if k not in ("model", "method", "epochs")] + [f"output_dir={tmp_path}", "max_steps=2"]
    assert main(args) == 0
    data = json.loads(out.read_text())
    for key in ("val_score", "val_vqa_score", "majority_baseline", "additional_gmacs", "updated_params", "epochs", "global_step", "samples_per_s"):
        assert key in data
    assert data["global_step"] == 2 and data["updated_params"] == 0
    out = capsys.readouterr().out
    assert "val score" in out and "val_vqa_score" in out  # the task's score, then the VQA task's own metric
    assert data["val_score"] == data["val_vqa_score"] and data["task"] == "vqa"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["lr=-1"], "lr=-1"),
        (["head_lr=0"], "head_lr=0"),
        (["epochs=0"], "epochs=0"),
        (["batch_size=0"], "batch_size=0"),
        (["num_promtps=3"], "did you mean 'num_prompts'"),
        (["--method", "prefix"], "method"),
        (["--model", "bert"], "unknown model"),
        (["depth=99"], "depth 99"),
        (["resume_from=/nonexistent/x"], "holds no checkpoint"),
        (["data=vqav2_arrow", "data_path=/nonexistent", "pretrained=false"], "nonexistent"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
        (["notakeyvalue"], "key=value"),
    ],
)
def test_cli_train_refuses_bad_input(tmp_path, capsys, args, needle):
    assert main(["train", "--model", "tiny-vilt", "pretrained=false", f"output_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_config_file_must_be_a_mapping(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("- a\n- b\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "not a mapping" in capsys.readouterr().err


def test_backbone_checkpoint_problems_are_refused(tmp_path, capsys):
    from apt_ray.models.presets import build_backbone

    vilt_dir = tmp_path / "vilt"
    build_backbone("tiny-vilt", vocab_size=64).save_pretrained(vilt_dir)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "does not exist"),
        (["--checkpoint", str(corrupt)], "config.json"),
        (["--model", "tiny-meter", "--checkpoint", str(vilt_dir)], "holds a 'vilt' model"),
    ]
    for extra, needle in cases:
        assert main(["train", "--model", "tiny-vilt", *extra, f"output_dir={tmp_path}", "pretrained=false"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_a_gpu_built_backbone_has_its_own_cache_entry(tmp_path):
    """Same seed, same weights holds per kind of device only, so a CUDA pretraining never lands in (or is read
    from) the CPU entry; the CPU entry keeps its name, so existing caches stay valid."""
    from apt_ray.train import pretrain as pt

    spec = build_train_config(overrides={**TINY, "data_path": str(tmp_path)}).data_spec()
    cpu = pt.pretrained_dir("tiny-vilt", spec, steps=5)
    assert pt.pretrained_dir("tiny-vilt", spec, steps=5, device="cpu") == cpu
    assert pt.pretrained_dir("tiny-vilt", spec, steps=5, device="cuda") == cpu.with_name(cpu.name + "-cuda")
    assert cpu.name.endswith("-steps5-seed0")


def test_interrupted_pretraining_leaves_no_cache_entry(tmp_path, monkeypatch):
    from apt_ray.models.vilt import ViltBackbone
    from apt_ray.train import pretrain as pt

    spec = build_train_config(overrides={**TINY, "data_path": str(tmp_path)}).data_spec()

    def boom(self, path):
        (Path(path) / "partial").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(ViltBackbone, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        pt.ensure_pretrained("tiny-vilt", spec, steps=1, progress=False)
    target = pt.pretrained_dir("tiny-vilt", spec, steps=1)
    assert not target.exists()
    monkeypatch.undo()
    built = pt.ensure_pretrained("tiny-vilt", spec, steps=1, progress=False)
    assert built == target and (target / "pretrain.json").is_file() and (target / "config.json").is_file()


def test_learning_rates_come_from_the_recipe():
    """The embedded recipe: what a method adds at 1e-3, the new MLP head at 3e-2, a lone linear classifier at 3.
    An lr the user gives always wins; the resolved values are what is recorded."""
    probe = build_train_config(overrides={"method": "linear_probe"})
    assert probe.head_lr == 3.0
    for method in ("apt", "full", "lora", "head_only"):
        cfg = build_train_config(overrides={"method": method})
        assert (cfg.lr, cfg.head_lr) == (1e-3, 3e-2)
        assert build_train_config(overrides={"method": method, "lr": 5e-4}).head_lr == 3e-2  # an absolute head rate
    assert build_train_config(overrides={"method": "apt", "head_lr": 1e-2}).lr == 1e-3
    # the authors' recipes scale the head (and METER's cross-modal parts) with the base rate
    vilt = build_train_config(overrides={"recipe": "apt-vilt-vqa", "lr": 1e-4})
    assert vilt.head_lr == pytest.approx(1e-3) and vilt.group_lrs()["method"] == 1e-4
    meter = build_train_config(overrides={"recipe": "apt-meter-vqa", "lr": 1e-5})
    assert meter.group_lrs() == pytest.approx({"method": 5e-5, "pooler": 5e-5, "token_type": 1e-5, "cls_token": 1e-5, "head": 5e-4})
    assert build_train_config(overrides={"recipe": "apt-meter-vqa", "epochs": 2}).epochs == 2  # explicit keys win
    assert type(probe).model_validate_json(probe.model_dump_json()) == probe


def test_unknown_recipe_gets_did_you_mean():
    with pytest.raises(UserError, match="unknown recipe 'apt-vilt-vq' \\(did you mean 'apt-vilt-vqa'\\?\\)"):
        build_train_config(overrides={"recipe": "apt-vilt-vq"})


def test_each_group_trains_at_its_rate(tmp_path):
    trainer = Trainer(build_train_config(overrides={**TINY, "lr": 2e-3, "head_lr": 5e-2, "warmup_ratio": 0.0,
                                                    "output_dir": str(tmp_path)}), LocalSession(tmp_path))
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"method", "head", "pooler", "token_type", "cls_token"}
    assert groups["head"]["lr"] == 5e-2 and all(groups[k]["lr"] == 2e-3 for k in ("method", "pooler", "token_type", "cls_token"))
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in trainer.model.head.parameters()}
    assert [id(p) for p in groups["cls_token"]["params"]] == [id(trainer.model.extras["cls_token"])]
    assert {id(p) for g in groups.values() for p in g["params"]} == {id(p) for p in trainer.model.parameters() if p.requires_grad}


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_schedule_is_transformers(shape):
    """The loop's schedules (torch's LambdaLR, to keep peft out of every trial's start-up) give the same rate at every
    step as transformers' get_cosine_schedule_with_warmup / get_linear_schedule_with_warmup, warm-up and end included."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from apt_ray.train.schedule import warmup_then_decay

    reference = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}[shape]
    for warmup, total in ((10, 100), (0, 7), (3, 3)):
        ours, theirs = (torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1) for _ in range(2))
        a, b = warmup_then_decay(ours, warmup, total, shape), reference(theirs, warmup, total)
        rates = []
        for _ in range(total + 2):
            assert a.get_last_lr() == pytest.approx(b.get_last_lr(), abs=1e-15)
            rates.append(a.get_last_lr()[0])
            ours.step(), theirs.step(), a.step(), b.step()
        if warmup < total:  # full rate right after warm-up, zero at the end
            assert rates[warmup] == pytest.approx(0.1) and rates[total] == pytest.approx(0.0, abs=1e-12)

