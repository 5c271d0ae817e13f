"""The platform's own overhead per trial: a sweep's one-worker trial against the standalone loop, same model and data.

One Tune experiment runs, one at a time in one reused trial process (as a sweep's
trials run in each of its slots), pairs of trials in turn: the standalone loop
(``train_loop_per_worker`` called directly, no Tune session) and a sweep trial
(``apt_ray.sweep.trial.run_trial``: the loop in the trial's process, reporting
each epoch to Tune and checkpointing through it). Both use the same CPU threads.
Medians over the pairs are reported, so a load change on the machine hits both.

- start-up: for the standalone loop, wall time from its call to its first
  training step; for a sweep trial, from the driver's ``on_trial_start`` to the
  trial's first step (Tune's scheduling, the function's dispatch, the loop's
  set-up). The overhead is the difference.
- process start: the first trial of a slot also starts its process (Python,
  torch, transformers, apt_ray imports); measured on a first, unpaired sweep
  trial and reported on its own: a sweep pays it once per slot.
- throughput ratio: the sweep trial's training samples/s over the standalone
  loop's (each over the training steps only; goal >= 0.97).

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

from apt_ray.errors import UserError

DEFAULTS = {"model": "tiny-meter", "method": "apt", "num_prompts": 16, "rank": 4, "epochs": 2, "batch_size": 32,
            "max_train_questions": 1024, "max_val_questions": 128, "seed": 0}
MODES = ("standalone", "sweep_trial")


def bench_trial(config: dict[str, Any], plan: Any) -> None:
    """A trial of the benchmark: the standalone loop (reporting its own figures once) or a sweep trial."""
    from ray import tune

    from apt_ray.sweep.trial import run_trial
    from apt_ray.train.loop import train_loop_per_worker  # imported before timing: the process is warm in both modes

    mode = config["_bench"]
    settings = {k: v for k, v in config.items() if k != "_bench"}
    if mode == "standalone":
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            res = train_loop_per_worker({**settings, "output_dir": out})
        tune.report({"startup_s": res["started_unix"] - t0 + res["setup_s"], "samples_per_s": res["samples_per_s"],
                     "val_score": res["val_score"], "global_step": res["global_step"], "threads": res["torch_threads"]})
    else:
        run_trial(settings, plan)


def make_recorder() -> Any:
    from ray.tune import Callback

    class Recorder(Callback):
        """Per trial: its mode, the driver's start time, and what it reported."""

        def __init__(self) -> None:
            self.rows: dict[str, dict[str, Any]] = {}

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.rows[trial.trial_id] = {"mode": trial.config["_bench"], "started": time.time(), "results": []}

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
            self.rows[trial.trial_id]["results"].append(dict(result))

    return Recorder()


def measured(row: dict[str, Any]) -> dict[str, Any]:
    """One trial's start-up, throughput and score, from what it reported."""
    results = row["results"]
    if row["mode"] == "standalone":
        r = results[-1]
        return {"mode": "standalone", "startup_s": r["startup_s"], "samples_per_s": r["samples_per_s"], "val_score": r["val_score"],
                "global_step": r["global_step"], "threads": r["threads"]}
    epochs = [r for r in results if "val_score" in r]
    return {"mode": "cold" if row["mode"] == "cold" else "sweep_trial", "startup_s": epochs[0]["first_step_unix"] - row["started"],
            "samples_per_s": statistics.fmean(r["samples_per_s"] for r in epochs), "val_score": epochs[-1]["val_score"],
            "global_step": epochs[-1]["global_step"]}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per mode and the figures the results doc reports."""
    med = {mode: {k: statistics.median(r[k] for r in rows if r["mode"] == mode) for k in ("startup_s", "samples_per_s")}
           for mode in MODES}
    out = {"median": med,
           "startup_overhead_s": med["sweep_trial"]["startup_s"] - med["standalone"]["startup_s"],
           "throughput_ratio": med["sweep_trial"]["samples_per_s"] / med["standalone"]["samples_per_s"]}
    cold = [r["startup_s"] for r in rows if r["mode"] == "cold"]
    if cold:
        out["process_start_s"] = cold[0] - med["sweep_trial"]["startup_s"]
    return out


def run(config: dict[str, Any], repeats: int, threads: int) -> list[dict[str, Any]]:
    from ray import tune

    from apt_ray.sweep.trial import TrialPlan
    from apt_ray.train.distributed import worker_env

    plan = TrialPlan(cpus_per_worker=threads, env=worker_env())
    order = ["cold", *[m for _ in range(repeats) for m in MODES]]
    recorder = make_recorder()
    with tempfile.TemporaryDirectory() as storage:
        tune.Tuner(
            tune.with_resources(tune.with_parameters(bench_trial, plan=plan), plan.trial_resources()),
            param_space={**config, "_bench": tune.grid_search(order)},
            tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=storage, name="overhead", verbose=0, callbacks=[recorder]),
        ).fit()
    return [measured(row) for row in recorder.rows.values()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="interleaved pairs of trials (medians reported)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads of every trial")
    p.add_argument("--json", default=None, help="write the rows and the summary here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="trial settings (apt-ray train keys)")
    args = p.parse_args(argv)
    try:
        if args.repeats < 1 or args.threads < 1:
            raise UserError("--repeats and --threads must be positive numbers.")
        from apt_ray.config import build_train_config, parse_overrides

        cfg = build_train_config(overrides={**DEFAULTS, "pretrained": True, **parse_overrides(args.overrides)})
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
    config = {k: v for k, v in cfg.model_dump().items() if v is not None}
    rows = run(config, args.repeats, args.threads)
    for r in rows:
        print(f"{r['mode']:12s}: start-up {r['startup_s']:6.2f} s, {r['samples_per_s']:6.1f} samples/s, val {r['val_score']:.2f}")
    s = summarise(rows)
    print(f"\n{cfg.model} / {cfg.method}, {rows[-1]['global_step']} steps, {args.threads} threads, medians of {args.repeats} pairs:")
    print("| | start-up to first step (s) | training samples/s |\n|---|---|---|")
    for mode in MODES:
        m = s["median"][mode]
        print(f"| {mode} | {m['startup_s']:.2f} | {m['samples_per_s']:.1f} |")
    print(f"\nstart-up overhead per sweep trial: {s['startup_overhead_s']:.2f} s; throughput ratio sweep trial / standalone: "
          f"{s['throughput_ratio']:.3f} (goal >= 0.97); a slot's first trial also starts its process: "
          f"{s.get('process_start_s', float('nan')):.2f} s once")
    if args.json:
        from apt_ray.io import write_json_atomic

        write_json_atomic(args.json, {"config": config, "threads": args.threads, "rows": rows, **s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
