"""``apt-ray sweep``: the run and the printed result (its flags are defined with the other commands' in
:mod:`apt_ray.cli`, which must stay light; the study scripts in ``studies/`` call it through ``apt_ray.cli.main``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from apt_ray.errors import UserError


def _positive(value: float | None, flag: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        need = "0 or more" if allow_zero else "a positive number"
        raise UserError(f"{flag} {value:g} is not allowed: give {need}.")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """Flags and ``key=value`` pairs as dotted study overrides."""
    from apt_ray.config import MAX_EPOCHS, parse_overrides

    _positive(args.num_samples, "--num-samples")
    _positive(args.max_epochs, "--max-epochs")
    if args.max_epochs is not None and args.max_epochs > MAX_EPOCHS:
        raise UserError(f"--max-epochs {args.max_epochs} is not allowed: the limit is {MAX_EPOCHS} epochs per trial.")
    _positive(args.workers_per_trial, "--workers-per-trial")
    _positive(args.gpus_per_worker, "--gpus-per-worker", allow_zero=True)
    out = parse_overrides(args.overrides)
    flags = {"num_trials": args.num_samples, "fixed.epochs": args.max_epochs, "resources.workers": args.workers_per_trial,
             "resources.gpus_per_worker": args.gpus_per_worker}
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def resume_command(sweep_dir: str | Path) -> str:
    """The command that continues the sweep at ``sweep_dir``."""
    return f"apt-ray sweep --storage-path {shlex.quote(str(sweep_dir))} --resume"


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
    print(f"open the Optuna study: optuna-dashboard {result.optuna_storage}  (pip install optuna-dashboard)", file=out)
    if result.interrupted:
        print(f"\nthe sweep was interrupted; continue it with: {resume_command(result.sweep_dir)}", file=out)


def run(args: argparse.Namespace) -> int:
    """Validate, run the study and print the front; a ``UserError`` goes to the caller (one message, exit 2)."""
    from apt_ray.sweep.console import configure_console

    configure_console(verbose=args.verbose)
    return _main(args, args.config or args.study_default)


def _main(args: argparse.Namespace, config: str | None) -> int:
    from apt_ray.sweep.run import run_study
    from apt_ray.sweep.spec import check_data, load_study_spec
    from apt_ray.sweep.store import SweepDir, latest_sweep
    from apt_ray.tracking import mlflow as mt

    overrides = overrides_from(args)
    spec = load_study_spec(config, overrides)
    storage = args.storage_path
    if args.resume:
        explicit = bool(args.config or overrides)
        storage = storage or str(latest_sweep(spec.name).root)
        result = run_study(spec if explicit else None, address=args.address, tracking_uri=args.tracking_uri,
                           experiment=args.experiment, storage_path=storage, resume=True, verbose=args.verbose)
    else:
        sweep = SweepDir(storage or spec.storage_path or SweepDir.default(spec.name).root)
        # what needs no Ray is checked before the sweep directory is named (run_study checks it again): the data,
        # an earlier sweep in the directory, the tracking URI
        if args.address is None:
            check_data(spec)
        if sweep.exists():
            sweep.ensure_new()  # refuses, naming --resume
        mt.check_tracking_uri(args.tracking_uri or spec.tracking_uri or mt.DEFAULT_TRACKING_URI)
        print(f"sweep directory: {sweep.root}  (if interrupted, continue with: {resume_command(sweep.root)})", flush=True)
        result = run_study(spec, address=args.address, tracking_uri=args.tracking_uri, experiment=args.experiment,
                           storage_path=str(sweep.root), verbose=args.verbose)
    print_result(result)
    return 130 if result.interrupted else 0
