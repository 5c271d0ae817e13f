"""The platform's own overhead per trial: Ray Train (1 worker) against the standalone loop, same model and data.

Both run ``train_loop_per_worker`` on the same config with the same number of
CPU threads (the Ray worker reserves that many CPUs; Ray sets its thread count
from them). Runs are interleaved (standalone, Ray, standalone, Ray, ...) and
medians reported, so a load change on the machine hits both alike.

- start-up: wall time from the call (``trainer.fit()`` for Ray) to the loop's
  first training step. For Ray this includes the Train controller, the worker
  process and its imports, the process group, then the loop's own set-up.
- start-up overhead: Ray's start-up minus the standalone one.
- throughput ratio: Ray's training samples/s over the standalone loop's
  (each measured over the training steps only; the goal is at least 0.95).

    python benchmarks/trial_overhead.py --json overhead.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from apt_ray.config import build_train_config
from apt_ray.errors import UserError

DEFAULTS = {"model": "tiny-meter", "method": "apt", "num_prompts": 16, "rank": 4, "epochs": 2, "batch_size": 32,
            "max_train_questions": 1024, "max_val_questions": 128, "seed": 0}


def run_standalone(config: dict[str, Any], threads: int) -> dict[str, Any]:
    import torch

    from apt_ray.train.loop import train_loop_per_worker

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        res = train_loop_per_worker({**config, "output_dir": out})
        return measured(res, t0, time.time())


def run_ray(config: dict[str, Any], threads: int) -> dict[str, Any]:
    from apt_ray.train.distributed import final_metrics, make_trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(config, workers=1, use_gpu=False, storage_path=out, name="overhead",
                               resources_per_worker={"CPU": threads})
        t0 = time.time()
        res = final_metrics(trainer.fit(), 1)
        return measured(res, t0, time.time())


def measured(res: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    startup = res["started_unix"] - t0 + res["setup_s"]
    return {"startup_s": startup, "wall_s": t1 - t0, "samples_per_s": res["samples_per_s"], "threads": res["torch_threads"],
            "val_score": res["val_score"], "global_step": res["global_step"]}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per mode and the two figures the README reports."""
    med = {mode: {k: statistics.median(r[k] for r in rows if r["mode"] == mode) for k in ("startup_s", "wall_s", "samples_per_s")}
           for mode in ("standalone", "ray_train")}
    return {"median": med,
            "startup_overhead_s": med["ray_train"]["startup_s"] - med["standalone"]["startup_s"],
            "throughput_ratio": med["ray_train"]["samples_per_s"] / med["standalone"]["samples_per_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="interleaved pairs of runs (medians reported)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads of both runs")
    p.add_argument("--json", default=None, help="write the rows and the summary here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="trial settings (apt-ray train keys)")
    args = p.parse_args(argv)
    try:
        if args.repeats < 1 or args.threads < 1:
            raise UserError("--repeats and --threads must be positive numbers.")
        from apt_ray.config import parse_overrides

        cfg = build_train_config(overrides={**DEFAULTS, "pretrained": True, **parse_overrides(args.overrides)})
        config = cfg.model_dump()
        import ray

        from apt_ray.train.distributed import connect
        from apt_ray.train.loop import self_pretrained_backbone

        self_pretrained_backbone(cfg)  # pretrained (cached) before timing anything
        connect(None)
        if ray.cluster_resources().get("CPU", 0) < args.threads:
            raise UserError(f"--threads {args.threads} is more than the {ray.cluster_resources().get('CPU', 0):g} CPUs Ray sees.")
    except UserError as e:
        print(f"trial_overhead.py: error: {e}", file=sys.stderr)
        return 2
    rows = []
    for i in range(args.repeats):
        for mode, fn in (("standalone", run_standalone), ("ray_train", run_ray)):
            r = {"mode": mode, "repeat": i, **fn(config, args.threads)}
            rows.append(r)
            print(f"{mode:10s} #{i}: start-up {r['startup_s']:6.2f} s, wall {r['wall_s']:6.1f} s, "
                  f"{r['samples_per_s']:6.1f} samples/s ({r['threads']} threads), val {r['val_score']:.2f}", flush=True)
    s = summarise(rows)
    print(f"\n{cfg.model} / {cfg.method}, {rows[0]['global_step']} steps, {args.threads} threads, medians of {args.repeats}:")
    print("| | start-up to first step (s) | trial wall time (s) | training samples/s |\n|---|---|---|---|")
    for mode in ("standalone", "ray_train"):
        m = s["median"][mode]
        print(f"| {mode} | {m['startup_s']:.2f} | {m['wall_s']:.1f} | {m['samples_per_s']:.1f} |")
    print(f"\nRay Train start-up overhead per trial: {s['startup_overhead_s']:.2f} s; "
          f"throughput ratio Ray Train / standalone: {s['throughput_ratio']:.3f} (goal >= 0.95)")
    if args.json:
        from apt_ray.io import write_json_atomic

        write_json_atomic(args.json, {"config": config, "threads": args.threads, "rows": rows, **s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
