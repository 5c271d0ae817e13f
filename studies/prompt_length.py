"""Prompt-length grid: apt, deep_prompt and kv_prompt at every prompt count, one rank and depth, tracked in MLflow.

    python studies/prompt_length.py [--methods apt deep_prompt kv_prompt] [--prompts 4 16 64 256] [--rank 4] [--depth D]
        [--seeds 0 1] [--model tiny-meter] [--epochs E] [--concurrency C] [--workers-per-trial W] [--address A]
        [--tracking-uri U] [--experiment NAME] [--storage-path DIR] [--report OUT.ipynb] [key=value ...]

A grid, not a search: every (method, prompt count[, seed]) point trains once, through the
same sweep path as studies/sweep_meter.py (Ray Tune trials of Ray Train runs, one MLflow
parent run with the Pareto front and score-vs-prompts figures, one child run per point).
key=value pairs are trial settings shared by every point (lr=3e-3 num_train_images=500).
--report executes notebooks/prompt_length_tradeoffs.ipynb against the finished grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from apt_ray.errors import UserError, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prompt_length.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["apt", "deep_prompt", "kv_prompt"])
    p.add_argument("--prompts", nargs="+", type=int, default=[4, 16, 64, 256], help="prompt counts per site")
    p.add_argument("--rank", type=int, default=4, help="APT approximation rank (fixed)")
    p.add_argument("--depth", type=int, default=None, help="layers carrying prompts (fixed; default all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="several seeds repeat every point")
    p.add_argument("--model", default="tiny-meter")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: TrainConfig's)")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--name", default="prompt-length", help="study name (Optuna study; default MLflow experiment)")
    p.add_argument("--address", default=None)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default=None)
    p.add_argument("--storage-path", default=None)
    p.add_argument("--report", default=None, metavar="OUT.ipynb", help="then execute the analysis notebook into this file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} {value} is not allowed: give a positive number.")


def print_summary(tracking_uri: str, experiment: str, parent_run_id: str) -> None:
    """The grid's points (mean ± std over seeds, cost in GMACs and % of the base model when logged) and the trends it
    supports, each with its n (none where too few prompt counts ran), as the analysis notebook states them."""
    from apt_ray.analysis import load_study_runs, reading, tables

    trained = load_study_runs(tracking_uri, experiment, parent_run_id).trained
    if trained.empty:
        return
    table = tables.means_over_seeds(trained)
    keys = tables.config_keys(trained)
    pct = table[tables.COST_PCT].notna().any()
    print("\n| configuration | prompts | seeds | val score (%) | additional GMACs |" + (" % of base |" if pct else "") +
          "\n|---|---|---|---|---|" + ("---|" if pct else ""))
    for _, r in table.iterrows():
        spread = "" if r["trials"] < 2 else f" ± {r['score_std']:.2f}"
        print(f"| {tables.describe({k: r[k] for k in keys})} | {int(r['num_prompts'])} | {int(r['trials'])} | "
              f"{r['score_mean']:.2f}{spread} | {r['gmacs']:.5f} |" + (f" {r[tables.COST_PCT]:.3g} |" if pct else ""))
    print("\n" + "\n".join(reading.score_lines(trained) + reading.cost_lines(trained)))


def run(args: argparse.Namespace) -> int:
    from apt_ray.config import parse_overrides
    from apt_ray.sweep.cli import print_result
    from apt_ray.sweep.grid import prompt_length_spec
    from apt_ray.sweep.run import run_study
    from apt_ray.sweep.store import SweepDir

    for value, flag in ((args.epochs, "--epochs"), (args.concurrency, "--concurrency"), (args.workers_per_trial, "--workers-per-trial")):
        _positive(value, flag)
    fixed = parse_overrides(args.overrides)
    if args.epochs is not None:
        fixed["epochs"] = args.epochs
    for key in ("rank", "depth", "seed", "method", "num_prompts", "model"):
        if key in fixed:
            raise UserError(f"'{key}={fixed[key]}' is set by the grid's own flags: use --{key.replace('_', '-')}"
                            f"{'s' if key in ('seed', 'method') else ''} instead.")
    spec = prompt_length_spec(args.methods, args.prompts, rank=args.rank, depth=args.depth, seeds=args.seeds, model=args.model,
                              name=args.name, fixed=fixed, concurrency=args.concurrency, workers=args.workers_per_trial)
    storage = args.storage_path or str(SweepDir.default(spec.name).root)
    print(f"prompt-length grid: {spec.num_trials} trials ({', '.join(args.methods)} x p in {sorted(args.prompts)}"
          f"{' x seeds ' + str(args.seeds) if len(args.seeds) > 1 else ''}), rank {args.rank}, depth {args.depth or 'all'}; "
          f"sweep directory {Path(storage).resolve()}", flush=True)
    result = run_study(spec, address=args.address, tracking_uri=args.tracking_uri, experiment=args.experiment, storage_path=storage)
    print_result(result)
    print_summary(result.tracking_uri, result.experiment, result.parent_run_id)
    if args.report and result.interrupted:
        print("\nthe grid was interrupted: the analysis notebook was not run (resume the sweep, then run it).")
    elif args.report:
        from apt_ray.analysis.notebook import run_notebook

        out = run_notebook(result.tracking_uri, result.experiment, args.report)
        print(f"\nanalysis notebook executed: {out}")
    return 130 if result.interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from apt_ray.sweep.console import configure_console

    configure_console()
    return run_command("prompt_length.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
