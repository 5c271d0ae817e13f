"""Measured cost of one training step (forward + loss + backward) of a backbone with a method: time and peak memory.

Times are taken interleaved: every repetition runs one step of each model under
test in a rotating order, so drifts in machine load hit all of them alike; the
median over repetitions is reported. Peak memory is the most tensor memory
alive at once during one step, above what was alive before it: on CUDA from
``torch.cuda.max_memory_allocated``, on CPU from the allocation and free events
of torch's profiler (the caching allocator's rounding and Python objects are not
counted, and neither are the parameters, which exist before the step).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from apt_ray import methods
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.heads import vqa_loss
from apt_ray.models.presets import build_backbone
from apt_ray.models.vqa import VQAModel
from apt_ray.tasks.base import text_image_inputs

Step = Callable[[], None]


@dataclass(frozen=True)
class Shapes:
    """Input shapes of a timed step."""

    batch_size: int
    text_len: int
    image_hw: tuple[int, int]
    num_answers: int


def build_model(model: str, spec: MethodSpec, num_answers: int, device: torch.device, seed: int = 0) -> VQAModel:
    """Backbone (random weights: cost does not depend on them) + VQA head + method, in training mode."""
    torch.manual_seed(seed)
    vqa = VQAModel(build_backbone(model), num_answers)
    methods.apply(vqa, spec)
    return vqa.to(device).train()


def make_batch(vocab_size: int, shapes: Shapes, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of random token ids, full masks, random pixels and sparse 0/1 answer targets."""
    one = text_image_inputs(vocab_size, shapes.text_len, shapes.image_hw, seed)
    g = torch.Generator().manual_seed(seed)
    batch = {k: v.expand(shapes.batch_size, *v.shape[1:]).contiguous() for k, v in one.items()}
    batch["pixel_values"] = torch.randn(shapes.batch_size, 3, *shapes.image_hw, generator=g)
    batch["labels"] = (torch.rand(shapes.batch_size, shapes.num_answers, generator=g) > 0.995).float()
    return {k: v.to(device) for k, v in batch.items()}


def training_step(vqa: VQAModel, batch: dict[str, torch.Tensor]) -> Step:
    """A closure running one step: zero grads, forward, VQA loss, backward (no optimiser: its cost is the same
    elementwise update for every method and would blur the difference being measured). On CUDA the forward
    runs under bf16 autocast, as in the training loop."""
    params = [p for p in vqa.parameters() if p.requires_grad]
    device_type = batch["input_ids"].device.type

    def step() -> None:
        for p in params:
            p.grad = None
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
            logits = vqa(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        vqa_loss(logits, batch["labels"]).backward()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(steps: dict[str, Step], repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each closure: ``warmup`` untimed rounds, then ``repeats`` rounds in rotating order."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median_ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


def peak_step_memory(step: Step, device: torch.device) -> int:
    """Peak bytes of tensors alive during one step, above those alive before it (see the module docstring)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return _cpu_peak(step)


def _cpu_peak(step: Step) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
    live = peak = 0
    sizes: dict[int, int] = {}  # blocks allocated inside the step; frees of older blocks are not counted
    for _, size, ptr in sorted(events):
        if size > 0:
            sizes[ptr] = size
            live += size
        elif ptr in sizes:
            live -= sizes.pop(ptr)
        peak = max(peak, live)
    return int(peak)
