"""Ray Train throughput against the number of workers, at one model and one global batch.

Efficiency is ``samples_per_s(W) / (W * samples_per_s(1))``: 1.0 is perfect linear
scaling, 0.5 means half of every added worker is lost (communication, stragglers,
a machine too busy to give each worker its core). Throughput is the steady state:
all ranks' training samples over rank 0's training wall time, summed over the
epochs after the first. The first epoch is left out because it overlaps Ray's own
start-up (the Train controller's helper actors and prestarted worker processes
import their libraries for the first seconds of a run); on a machine whose cores
the workers fill, that work would otherwise be charged to the many-worker runs only.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from apt_ray.config import TrainConfig
from apt_ray.errors import UserError


def check_worker_counts(counts: Sequence[int], batch_size: int) -> list[int]:
    """Sorted distinct worker counts; 1 must be among them (the baseline) and each must split the global batch."""
    bad = [w for w in counts if isinstance(w, bool) or not isinstance(w, int) or w < 1]
    if bad:
        raise UserError(f"--workers {' '.join(map(str, counts))}: worker counts must be positive whole numbers ({', '.join(map(str, bad))} is not).")
    out = sorted(set(counts))
    if out[0] != 1:
        raise UserError(f"--workers {' '.join(map(str, counts))}: include 1, the single-worker throughput every efficiency is measured against.")
    uneven = [w for w in out if batch_size % w]
    if uneven:
        raise UserError(f"the global batch {batch_size} cannot be split evenly over {', '.join(map(str, uneven))} workers: "
                        "use a batch size that every worker count divides.")
    return out


def scaling_rows(throughput: dict[int, float]) -> list[dict[str, Any]]:
    """Rows ``{workers, samples_per_s, efficiency}`` (efficiency against the 1-worker throughput), by worker count."""
    if 1 not in throughput or throughput[1] <= 0:
        raise ValueError("the 1-worker throughput is needed (and must be positive) to compute efficiencies")
    base = throughput[1]
    return [{"workers": w, "samples_per_s": sps, "efficiency": sps / (w * base)} for w, sps in sorted(throughput.items())]


def steady_throughput(result: dict[str, Any], warmup_epochs: int = 1) -> float:
    """Samples/s of a finished run (``run_distributed``'s result) over its epochs after ``warmup_epochs``:
    total samples over total training time, so a longer epoch weighs more."""
    measured = (result.get("history") or [])[warmup_epochs:]
    if not measured:
        raise RuntimeError(f"the run finished {len(result.get('history') or [])} epoch(s); throughput is measured after "
                           f"{warmup_epochs} warm-up epoch(s), so it needs at least {warmup_epochs + 1}")
    seconds = sum(float(h["train_time_s"]) for h in measured)
    return sum(float(h["samples_per_s"]) * float(h["train_time_s"]) for h in measured) / seconds


def measure(cfg: TrainConfig, counts: Sequence[int], repeats: int = 1, storage_path: str | None = None,
            cpus_per_worker: float = 1.0) -> dict[int, list[float]]:
    """Throughput of each worker count, ``repeats`` times (the order of the counts alternates between repeats)."""
    import uuid

    from apt_ray.train.distributed import run_distributed

    tag = uuid.uuid4().hex[:6]  # fresh run names: a run never resumes an earlier invocation's checkpoints
    samples: dict[int, list[float]] = {w: [] for w in counts}
    for r in range(repeats):
        for w in (counts if r % 2 == 0 else list(reversed(counts))):
            result = run_distributed(cfg, workers=w, storage_path=storage_path, name=f"scaling-{tag}-w{w}-r{r}",
                                     resources_per_worker={"CPU": cpus_per_worker})
            samples[w].append(steady_throughput(result))
    return samples


def medians(samples: dict[int, list[float]]) -> dict[int, float]:
    return {w: statistics.median(v) for w, v in samples.items()}


# -- the machine's own ceiling ----------------------------------------------------------------------

def loop_like_step(cfg: TrainConfig, batch: int) -> tuple[Any, Any]:
    """``(model, step)``: one CPU training step on a fixed synthetic batch as the loop takes it (forward, backward,
    clipping, AdamW update), less data loading and communication."""
    import torch

    from apt_ray.profile.step_cost import Shapes, build_model, make_batch, training_step
    from apt_ray.train.recipes import get_recipe
    from apt_ray.train.schedule import build_optimizer

    ds = cfg.data_spec()
    device = torch.device("cpu")
    model = build_model(cfg.model, cfg.method_spec(), 32, device, cfg.seed)
    backward = training_step(model, make_batch(model.backbone.vocab_size, Shapes(batch, ds.max_text_len, (ds.image_size, ds.image_size), 32), device))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = model.trainable_groups(model.trained_extras)
    optimizer = build_optimizer(model, groups, cfg.group_lrs(), cfg.weight_decay, cfg.adam_betas,
                                get_recipe(cfg.recipe).decay_norm_and_bias)

    def step() -> None:
        backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()

    return model, step


def _independent_worker(args: tuple[Any, int, int, int, Any]) -> float:
    """One process of the ceiling measurement: ``steps`` timed training steps (no Ray, no DDP), after the barrier."""
    cfg_json, batch, steps, warmup, barrier = args
    import time

    import torch

    torch.set_num_threads(1)
    _, step = loop_like_step(TrainConfig.model_validate_json(cfg_json), batch)
    for _ in range(warmup):
        step()
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def independent_ceiling(cfg: TrainConfig, counts: Sequence[int], steps: int = 30, warmup: int = 3) -> dict[int, float]:
    """Samples/s of W independent single-thread processes, each stepping its share of the global batch at once
    (forward, backward, clipping and the AdamW update; no communication, no Ray): the most any data-parallel run
    could reach on the same machine."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out: dict[int, float] = {}
    for w in counts:
        with ctx.Manager() as manager:
            barrier = manager.Barrier(w)
            with ctx.Pool(w) as pool:
                times = pool.map(_independent_worker, [(cfg.model_dump_json(), cfg.batch_size // w, steps, warmup, barrier)] * w)
        out[w] = cfg.batch_size * steps / max(times)
    return out
