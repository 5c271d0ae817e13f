"""Train every method on the same backbone and data, over seeds, and print the results table (mean ± sd).

    python studies/compare_methods.py [--model tiny-meter] [--methods apt linear_probe ...] [--seeds 0 1 2]
                                      [--parallel 2] [--json OUT] [key=value ...]

Each run is `apt-ray train` (standalone, no Ray) with `seed=<s>`; overrides apply to all. With `--parallel N`
N runs go side by side, one torch thread each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from apt_ray.config import build_train_config, parse_overrides
from apt_ray.errors import UserError
from apt_ray.io import write_json_atomic
from apt_ray.methods.spec import METHOD_NAMES

ROW_KEYS = ("val_vqa_score", "majority_baseline", "updated_params", "additional_gmacs", "trainable_groups", "recipe", "epochs")


def run_one(config: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """One training run; returns the table's fields and its wall time."""
    import torch

    from apt_ray.train.loop import train_loop_per_worker

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    result = train_loop_per_worker({**config, "_progress": threads is None})
    return {"method": config["method"], "seed": config["seed"], **{k: result[k] for k in ROW_KEYS}, "seconds": time.perf_counter() - t0}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean and sample sd of the score over seeds, in the order the methods first appear."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        scores = [r["val_vqa_score"] for r in mine]
        out.append({"method": method, "seeds": [r["seed"] for r in mine], "scores": scores, "mean": statistics.fmean(scores),
                    "sd": statistics.stdev(scores) if len(scores) > 1 else float("nan"),
                    "updated_params": mine[0]["updated_params"], "additional_gmacs": mine[0]["additional_gmacs"],
                    "seconds": statistics.fmean(r["seconds"] for r in mine)})
    return out


def table(summary: list[dict[str, Any]], majority: float) -> str:
    lines = ["| method | val VQA score (mean ± sd) | seeds | updated params | additional GMACs | time per run (s) |", "|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: -s["mean"]):
        lines.append(f"| {s['method']} | {s['mean']:.2f} ± {s['sd']:.2f} | {len(s['seeds'])} | {s['updated_params']:,} | "
                     f"{s['additional_gmacs']:.4f} | {s['seconds']:.0f} |")
    lines.append(f"| always the most frequent answer | {majority:.2f} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-meter")
    p.add_argument("--methods", nargs="+", default=list(METHOD_NAMES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--parallel", type=int, default=1, help="runs side by side (one torch thread each)")
    p.add_argument("--json", default=None, help="write every run and the summary here")
    p.add_argument("--output-dir", default="results/compare_methods")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        unknown = [m for m in args.methods if m not in METHOD_NAMES]
        if unknown or args.parallel < 1:
            raise UserError(f"unknown method(s) {unknown}: choose from {', '.join(METHOD_NAMES)}." if unknown
                            else f"--parallel {args.parallel}: give at least 1.")
        overrides = parse_overrides(args.overrides)
        configs = [build_train_config(None, {**overrides, "model": args.model, "method": m, "seed": s,
                                             "output_dir": str(Path(args.output_dir) / f"{m}-seed{s}")}).model_dump()
                   for m in args.methods for s in args.seeds]
        if args.parallel == 1:
            rows = [run_one(c, None) for c in configs]
        else:
            # the first run builds the shared caches (synthetic set, pretrained backbone) before the others start
            rows = [run_one(configs[0], 1)]
            with ProcessPoolExecutor(args.parallel, mp_context=get_context("spawn")) as pool:
                rows += list(pool.map(run_one, configs[1:], [1] * (len(configs) - 1)))
    except UserError as e:
        print(f"compare_methods: error: {e}", file=sys.stderr)
        return 2
    summary = summarise(rows)
    print("\n" + table(summary, rows[0]["majority_baseline"]))
    if args.json:
        write_json_atomic(args.json, {"runs": rows, "summary": summary, "overrides": overrides, "model": args.model})
    return 0


if __name__ == "__main__":
    sys.exit(main())
