"""The CUDA path: bf16 autocast in the loop, the paper-size presets on a GPU, NCCL with one GPU.

Skipped without a CUDA GPU (CI has none); run them on a GPU machine with
``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from apt_ray import methods
from apt_ray.config import build_train_config
from apt_ray.methods.spec import MethodSpec
from apt_ray.profile.step_cost import Shapes, build_model, make_batch, peak_step_memory, training_step
from apt_ray.train.loop import Trainer, _all_sum
from apt_ray.train.session import LocalSession
from tests.helpers import tiny_batch, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL_DATA = {"model": "tiny-vilt", "pretrained": False, "num_train_images": 96, "num_val_images": 16, "questions_per_image": 2,
              "batch_size": 16, "epochs": 3, "lr": 3e-3, "device": "cuda", "seed": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loop_runs_in_bf16_on_cuda_and_learns(tmp_path):
    cfg = build_train_config(overrides={**SMALL_DATA, "method": "apt", "output_dir": str(tmp_path)})
    trainer = Trainer(cfg, LocalSession(tmp_path))
    dtypes: list[torch.dtype] = []
    trainer.model.head.net[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    result = trainer.fit()
    assert trainer.device.type == "cuda"
    assert set(dtypes) == {torch.bfloat16}, "the forward must run under bf16 autocast on CUDA"
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters()), "weights stay fp32 (autocast, not casting)"
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    assert 0.0 <= result["val_vqa_score"] <= 100.0


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_recipe_precision_on_cuda(tmp_path, precision, dtype):
    """The authors' ViLT recipe trains in fp16 with loss scaling, their METER recipe in fp32."""
    cfg = build_train_config(overrides={**SMALL_DATA, "method": "apt", "precision": precision, "output_dir": str(tmp_path)})
    trainer = Trainer(cfg, LocalSession(tmp_path))
    dtypes: list[torch.dtype] = []
    trainer.model.head.net[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    result = trainer.fit()
    assert set(dtypes) == {dtype}
    assert (trainer.scaler is not None) == (precision == "fp16")
    losses = [h["train_loss"] for h in result["history"]]
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("preset", ["vilt-b32", "meter-clip16-roberta"])
@pytest.mark.parametrize("method", ["apt", "deep_prompt"])
def test_paper_presets_train_on_cuda(preset, method):
    from apt_ray.models.presets import get_preset

    device = torch.device("cuda")
    p = get_preset(preset)
    spec = MethodSpec(name=method, num_prompts=32, rank=4)
    vqa = build_model(preset, spec, num_answers=3129, device=device)
    batch = make_batch(vqa.backbone.vocab_size, Shapes(4, p.text_len, p.image_hw, 3129), device)
    step = training_step(vqa, batch)
    peak = peak_step_memory(step, device)
    trainable = [n for n, q in vqa.named_parameters() if q.requires_grad]
    frozen = [q for q in vqa.backbone.parameters() if not q.requires_grad]
    assert frozen and all(q.grad is None for q in frozen), "the frozen backbone gets no gradients"
    grads = [q.grad for n, q in vqa.named_parameters() if q.requires_grad and not n.startswith("head.")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), trainable
    assert any(g.abs().sum() > 0 for g in grads)
    assert peak > 0


def test_nccl_with_one_gpu(tmp_path):
    """A one-rank NCCL group: the loop's all-reduces and DDP run over NCCL and change nothing."""
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        assert _all_sum([1.5, 2.0], device) == [1.5, 2.0]

        plain, wrapped = tiny_model(), tiny_model()
        for model in (plain, wrapped):
            methods.apply(model, MethodSpec(name="apt", num_prompts=8, rank=2))
            model.to(device)
        wrapped.load_state_dict(plain.state_dict())
        ddp = nn.parallel.DistributedDataParallel(wrapped, device_ids=[0])
        batch = {k: v.to(device) for k, v in tiny_batch().items()}
        for model in (plain, ddp):
            model(*(batch[k] for k in ("input_ids", "attention_mask", "pixel_values"))).square().mean().backward()
        for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
            if a.requires_grad:
                torch.testing.assert_close(a.grad, b.grad, msg=name)

        cfg = build_train_config(overrides={**SMALL_DATA, "method": "apt", "epochs": 1, "output_dir": str(tmp_path)})
        result = Trainer(cfg, LocalSession(tmp_path)).fit()  # evaluate() and the loss totals all-reduce over NCCL
        assert result["global_step"] == result["history"][-1]["global_step"] > 0
    finally:
        torch.distributed.destroy_process_group()


def test_pretraining_on_cuda_saves_a_trained_cpu_loadable_backbone(tmp_path):
    import json

    from apt_ray.models.presets import build_backbone
    from apt_ray.train.pretrain import pretrain

    spec = build_train_config(overrides={"model": "tiny-meter", "data_path": str(tmp_path), "num_train_images": 64,
                                         "num_val_images": 8}).data_spec()
    out = pretrain("tiny-meter", spec, tmp_path / "pt", steps=3, batch_size=16, progress=False, device="cuda")
    info = json.loads((out / "pretrain.json").read_text())
    assert info["device"] == "cuda" and info["steps"] == 3
    trained = build_backbone("tiny-meter", out)
    torch.manual_seed(0)
    fresh = build_backbone("tiny-meter", None, trained.vocab_size)  # what pretrain() starts from (same seed)
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in trained.parameters())
    moved = [n for (n, a), b in zip(trained.named_parameters(), fresh.parameters()) if not torch.equal(a, b)]
    assert len(moved) > len(list(fresh.parameters())) // 2, "pretraining on the GPU changed the weights"
