"""``apt-ray sweep``: its flags, the run, and the printed result (the study scripts in ``studies/`` call it)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from apt_ray.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``apt-ray sweep``."""
    p.add_argument("--config", default=None, help="study YAML (default: the embedded default study)")
    p.add_argument("--study-default", default=None, help=argparse.SUPPRESS)  # a study script's own default config
    p.add_argument("--num-samples", type=int, default=None, help="number of trials")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db; an http:// server on clusters)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the study name)")
    p.add_argument("--storage-path", default=None, help="the sweep's directory (default ./ray_results/<study>-<time>)")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per trial")
    p.add_argument("--workers-per-trial", type=int, default=None, help="Ray Train workers per trial")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per Ray Train worker")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep at --storage-path (or the latest one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more study settings, dotted: concurrency=1 fixed.lr=1e-3")


def _positive(value: float | None, flag: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        need = "0 or more" if allow_zero else "a positive number"
        raise UserError(f"{flag} {value:g} is not allowed: give {need}.")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """Flags and ``key=value`` pairs as dotted study overrides."""
    from apt_ray.config import parse_overrides

    _positive(args.num_samples, "--num-samples")
    _positive(args.max_epochs, "--max-epochs")
    _positive(args.workers_per_trial, "--workers-per-trial")
    _positive(args.gpus_per_worker, "--gpus-per-worker", allow_zero=True)
    out = parse_overrides(args.overrides)
    flags = {"num_trials": args.num_samples, "fixed.epochs": args.max_epochs, "resources.workers": args.workers_per_trial,
             "resources.gpus_per_worker": args.gpus_per_worker}
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def print_result(result: Any, out: Any = sys.stdout) -> None:
    """The Pareto front, the tallies, where everything is, and how to open the MLflow UI."""
    from apt_ray.sweep.summary import counts, format_table

    spec = result.spec
    objectives = ", ".join(f"{o.mode} {o.metric}" for o in spec.objectives)
    tally = ", ".join(f"{v} {k}" for k, v in sorted(counts(result.rows).items())) or "none"
    print(f"\nstudy {spec.name}: {len(result.rows)} trials ({tally})", file=out)
    print(f"Pareto front ({objectives}):", file=out)
    print(format_table(result.front) if result.front else "  (no trial finished)", file=out)
    print(f"\nsweep directory:  {result.sweep_dir}", file=out)
    print(f"Optuna study:     optuna.load_study(study_name='{spec.name}', storage='{result.optuna_storage}')", file=out)
    print(f"MLflow:           experiment '{result.experiment}', parent run {result.parent_run_id}", file=out)
    print(f"open the MLflow UI: {result.ui_command}", file=out)
    if result.interrupted:
        print(f"\nthe sweep was interrupted; continue it with: --storage-path {result.sweep_dir} --resume", file=out)


def run(args: argparse.Namespace) -> int:
    """Validate, run the study and print the front; a ``UserError`` goes to the caller (one message, exit 2)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("apt_ray").setLevel(logging.INFO)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # its INFO lines point at Ray's temp dirs, not the sweep's
    return _main(args, args.config or args.study_default)


def _main(args: argparse.Namespace, config: str | None) -> int:
    from apt_ray.sweep.run import run_study
    from apt_ray.sweep.spec import load_study_spec
    from apt_ray.sweep.store import SweepDir, latest_sweep

    overrides = overrides_from(args)
    spec = load_study_spec(config, overrides)
    storage = args.storage_path
    if args.resume:
        explicit = bool(args.config or overrides)
        storage = storage or str(latest_sweep(spec.name).root)
        result = run_study(spec if explicit else None, address=args.address, tracking_uri=args.tracking_uri,
                           experiment=args.experiment, storage_path=storage, resume=True)
    else:
        storage = storage or spec.storage_path or str(SweepDir.default(spec.name).root)
        print(f"sweep directory: {Path(storage).resolve()}  (if interrupted, continue with --storage-path {Path(storage).resolve()} --resume)",
              flush=True)
        result = run_study(spec, address=args.address, tracking_uri=args.tracking_uri, experiment=args.experiment,
                           storage_path=storage)
    print_result(result)
    return 130 if result.interrupted else 0
