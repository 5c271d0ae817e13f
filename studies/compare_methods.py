"""Train every method on the same backbone, task and data, over seeds, and print the results table (mean ± sd).

    python studies/compare_methods.py [--model tiny-meter] [--methods apt linear_probe ...] [--seeds 0 1 2]
                                      [--parallel 2] [--json OUT] [key=value ...]

Each run is the standalone training loop (`apt-ray train`, no Ray) with `seed=<s>`; overrides apply to all
(`task=nlvr2`, `epochs=2`, ...). With `--parallel N` N runs go side by side, one torch thread each. The table
shows the task's score and its other metrics (retrieval: every recall), best first, and the chance levels the
task reports (the most frequent answer or label; a random ranking).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from apt_ray.analysis import seeds
from apt_ray.config import parse_overrides
from apt_ray.errors import UserError
from apt_ray.io import write_json_atomic
from apt_ray.methods.spec import METHOD_NAMES
from apt_ray.tasks import get_task


def shown_metrics(row: dict[str, Any], score_name: str) -> list[str]:
    """The score first, then the task's other ``val_*`` metrics (``score_name``, the score under the task's own
    name, left out)."""
    return [seeds.SCORE, *(k for k in row if k.startswith("val_") and k not in (seeds.SCORE, score_name))]


def table(summary: list[dict[str, Any]], metrics: Sequence[str], score_name: str = seeds.SCORE) -> str:
    """One row per method, best score first: each metric as mean ± sd (the score under the task's own name,
    ``score_name``), the score per seed, the cost, the time; then the chance rows the runs reported
    (``majority_baseline``; ``chance_<metric>`` under ``val_<metric>``)."""
    names = [(score_name if m == seeds.SCORE else m).removeprefix("val_") for m in metrics]
    head = ["method", *names, "per seed", "updated params", "additional GMACs",
            "time per run (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for s in sorted(summary, key=lambda s: -s[seeds.SCORE]["mean"]):
        per_seed = " / ".join(f"{v:.2f}" for v in s[seeds.SCORE]["values"])
        lines.append(f"| {s['arm']} | " + " | ".join(seeds.mean_sd(s, m) for m in metrics)
                     + f" | {per_seed} | {s['updated_params']:,} | {s['additional_gmacs']:.4f} | {s['seconds']:.0f} |")
    first, blank = summary[0], " |" * (len(head) - 1 - len(metrics))
    if first.get("majority_baseline") is not None:
        lines.append(f"| always the most frequent answer | {first['majority_baseline']:.2f} |" + " |" * (len(metrics) - 1) + blank)
    chance = [first.get("chance_" + n) for n in names]
    if any(c is not None for c in chance):
        lines.append("| chance | " + " | ".join("" if c is None else f"{c:.2f}" for c in chance) + " |" + blank)
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
        if unknown:
            raise UserError(f"unknown method(s) {unknown}: choose from {', '.join(METHOD_NAMES)}.")
        common = {**parse_overrides(args.overrides), "model": args.model}
        runs = seeds.configs({m: {"method": m} for m in args.methods}, args.seeds, common, args.output_dir)
        rows = seeds.run_all(runs, args.parallel)
    except UserError as e:
        print(f"compare_methods: error: {e}", file=sys.stderr)
        return 2
    metrics = shown_metrics(rows[0], get_task(runs[0]["task"]).score)
    summary = seeds.summarise(rows, metrics)
    print("\n" + table(summary, metrics, get_task(runs[0]["task"]).score))
    if args.json:
        write_json_atomic(args.json, {"runs": rows, "summary": summary, "common": common})
    return 0


if __name__ == "__main__":
    sys.exit(main())
