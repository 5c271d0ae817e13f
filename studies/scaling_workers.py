"""Ray Train throughput against the number of workers, same model and global batch; logged to MLflow.

    python studies/scaling_workers.py --workers 1 2 [4 ...] [--json OUT] [--model tiny-meter] [--method apt]
        [--batch-size 64] [--epochs 3] [--repeats 3] [--cpus-per-worker 1] [--address A] [--tracking-uri U]
        [--experiment scaling-workers] [key=value ...]

Each worker count runs the same trial (apt_ray.train.distributed.run_distributed: a Ray Train
TorchTrainer, DDP over gloo) with the same global batch split over the workers. Throughput is the
steady state: samples/s over the epochs after the first (which overlaps Ray's start-up);
efficiency = samples_per_s(W) / (W * samples_per_s(1)). Prints a table, logs one MLflow run
(metrics at step W, the table as an artifact) and with --json writes rows {workers, samples_per_s,
efficiency}. key=value pairs are trial settings (num_train_images=256 ...).
The counts alternate between repeats and the medians are reported, because a machine's speed can drift over minutes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from apt_ray.errors import UserError, run_command
from apt_ray.io import write_json_atomic

# a data-light trial: throughput does not depend on the weights, so no pretraining is needed; 1024 images x 2
# questions make 32 steps of 64 per epoch, long enough that an epoch is not one hiccup of the machine
DEFAULTS = {"pretrained": False, "num_train_images": 1024, "num_val_images": 16, "questions_per_image": 2, "num_workers": 0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaling_workers.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", nargs="+", type=int, required=True, help="worker counts (must include 1)")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--model", default="tiny-meter")
    p.add_argument("--method", default="apt")
    # 32 samples per worker at 2 workers: at 16 the tiny model's step is mostly per-operation overhead, which
    # does not shrink with the batch, so even independent processes lose a sixth of linear scaling (README)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over the workers)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; all but the first (the warm-up) are measured")
    p.add_argument("--repeats", type=int, default=3, help="runs per worker count (medians)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--address", default=None)
    p.add_argument("--tracking-uri", default=None, help="MLflow (default sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="scaling-workers")
    p.add_argument("--storage-path", default=None, help="Ray Train run directories (default: a temporary folder)")
    p.add_argument("--ceiling", action="store_true",
                   help="also measure W independent single-thread processes (no Ray, no DDP): the machine's own limit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _config(args: argparse.Namespace) -> Any:
    from apt_ray.config import build_train_config, parse_overrides

    for flag, value in (("--repeats", args.repeats), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} {value} is not allowed: give a positive number.")
    if args.epochs < 2:
        raise UserError(f"--epochs {args.epochs} is not allowed: the first epoch warms up and is not measured, so give 2 or more.")
    if args.cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker {args.cpus_per_worker:g} is not allowed: give a positive number.")
    overrides = {**DEFAULTS, **parse_overrides(args.overrides), "model": args.model, "method": args.method,
                 "batch_size": args.batch_size, "epochs": args.epochs, "device": "cpu"}
    return build_train_config(None, overrides)


def log_to_mlflow(uri: str, experiment: str, cfg: Any, args: argparse.Namespace, rows: list[dict[str, Any]],
                  samples: dict[int, list[float]], spool: Path) -> str:
    """One run: settings as params, throughput and efficiency at step = workers, the rows as a table."""
    from apt_ray.tracking import mlflow as mt
    from apt_ray.tracking.writer import RunWriter

    writer = RunWriter.open(uri, experiment, spool)
    commit = mt.git_commit()
    key = "scaling"
    writer.create(key, f"scaling-{cfg.model}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}",
                  {mt.KIND_TAG: "scaling", mt.COMMIT_TAG: commit, "mlflow.source.git.commit": commit})
    writer.params(key, {"model": cfg.model, "method": cfg.method, "global_batch_size": cfg.batch_size, "epochs": cfg.epochs,
                        "num_train_images": cfg.num_train_images, "questions_per_image": cfg.questions_per_image,
                        "cpus_per_worker": args.cpus_per_worker, "repeats": args.repeats,
                        "worker_counts": [r["workers"] for r in rows]})
    for r in rows:
        writer.metrics(key, {"samples_per_s": r["samples_per_s"], "efficiency": r["efficiency"]}, step=r["workers"])
    writer.table(key, rows, "scaling.json")
    writer.json(key, {str(w): v for w, v in samples.items()}, "samples_per_s_all_repeats.json")
    writer.finish(key)
    writer.close(timeout=300)
    return writer.runs.get(key, "(not yet written: see the warning above)")


def run(args: argparse.Namespace) -> int:
    from apt_ray.tracking import mlflow as mt
    from apt_ray.train import distributed as dist
    from apt_ray.train.scaling import check_worker_counts, measure, medians, scaling_rows

    cfg = _config(args)
    counts = check_worker_counts(args.workers, cfg.batch_size)
    uri = mt.check_tracking_uri(args.tracking_uri or mt.DEFAULT_TRACKING_URI)  # before minutes of training
    if args.json:
        write_json_atomic(args.json, [])  # an unwritable path fails now, not after the runs
    print(f"scaling: {cfg.model} + {cfg.method}, global batch {cfg.batch_size}, {cfg.epochs} epoch(s) "
          f"({cfg.num_train_images * cfg.questions_per_image} samples each), workers {counts}, "
          f"{args.cpus_per_worker:g} CPU per worker", flush=True)
    started = dist.connect(args.address)
    try:
        dist.check_capacity(max(counts), dist.per_worker_resources(False, {"CPU": args.cpus_per_worker}))
        with tempfile.TemporaryDirectory(prefix="apt_scaling_") as tmp:
            samples = measure(cfg, counts, args.repeats, args.storage_path or tmp, args.cpus_per_worker)
    finally:
        if started:
            import ray

            ray.shutdown()
    rows = scaling_rows(medians(samples))
    if args.ceiling:
        from apt_ray.train.scaling import independent_ceiling

        for r, c in zip(rows, scaling_rows(independent_ceiling(cfg, counts))):
            r.update({"ceiling_samples_per_s": c["samples_per_s"], "ceiling_efficiency": c["efficiency"]})
    print("\n| workers | samples/s | efficiency |" + (" independent processes: samples/s | efficiency |" if args.ceiling else ""))
    print("|---|---|---|" + ("---|---|" if args.ceiling else ""))
    for r in rows:
        extra = f" {r['ceiling_samples_per_s']:.1f} | {r['ceiling_efficiency']:.2f} |" if args.ceiling else ""
        print(f"| {r['workers']} | {r['samples_per_s']:.1f} | {r['efficiency']:.2f} |{extra}")
    run_id = log_to_mlflow(uri, args.experiment, cfg, args, rows, samples,
                           Path(args.storage_path or "ray_results") / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"\nMLflow: experiment '{args.experiment}', run {run_id} ({mt.redact(uri)})")
    if args.json:
        write_json_atomic(args.json, rows)
        print(f"rows written to {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_command("scaling_workers.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
