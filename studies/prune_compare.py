"""Train p prompts and prune to k, against training k prompts directly, at equal inference cost, over seeds.

    python studies/prune_compare.py [--methods kv_prompt apt] [--trained 32] [--kept 8] [--seeds 0 1 2]
                                    [--arms pruned direct direct-equal-epochs] [--parallel 2] [--json OUT] [key=value ...]

Per method up to three arms: ``pruned`` (``num_prompts=<trained> prune_keep=<kept/trained>``: train, score, cut,
rewind; see apt_ray.train.rewind), ``direct`` (``num_prompts=<kept>`` for the same ``epochs``) and
``direct-equal-epochs`` (``num_prompts=<kept>`` for ``epochs + rewind_epochs``, as many training epochs as the
pruned arm). Each run is the standalone training loop with ``seed=<s>``; overrides apply to every run.
Prints the table (mean ± sd over seeds).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from apt_ray.analysis import seeds
from apt_ray.config import build_train_config, parse_overrides
from apt_ray.errors import UserError
from apt_ray.io import write_json_atomic
from apt_ray.methods.configs.pruning import kept_prompts

ARMS = ("pruned", "direct", "direct-equal-epochs")


def arms_of(method: str, trained: int, kept: int, which: tuple[str, ...], common: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The named arms of one method (their trial settings), in ``which`` order."""
    pruned = {"method": method, "num_prompts": trained, "prune_keep": kept / trained}
    cfg = build_train_config(None, {**common, **pruned})
    k = kept_prompts(trained, cfg.prune_keep, cfg.prune_mode, cfg.prune_segments)
    rewind = cfg.rewind_epochs if cfg.rewind_epochs is not None else cfg.epochs
    settings = {"pruned": (f"{method}, p={trained} pruned to {k}", pruned),
                "direct": (f"{method}, p={kept}", {"method": method, "num_prompts": kept}),
                "direct-equal-epochs": (f"{method}, p={kept}, {cfg.epochs + rewind} epochs",
                                        {"method": method, "num_prompts": kept, "epochs": cfg.epochs + rewind})}
    return dict(settings[a] for a in which)


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["| arm | val score (mean ± sd) | per seed | epochs | updated params | additional GMACs | time per run (s) |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        per_seed = " / ".join(f"{v:.2f}" for v in s[seeds.SCORE]["values"])
        lines.append(f"| {s['arm']} | {seeds.mean_sd(s)} | {per_seed} | {s['epochs']} | {s['updated_params']:,} | "
                     f"{s['additional_gmacs']:.4f} | {s['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-meter")
    p.add_argument("--methods", nargs="+", default=["kv_prompt", "apt"])
    p.add_argument("--trained", type=int, default=32, help="prompts per site trained before pruning")
    p.add_argument("--kept", type=int, default=8, help="prompts per site kept (and trained directly in the other arms)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=1, help="runs side by side (one torch thread each)")
    p.add_argument("--json", default=None, help="write every run and the summary here")
    p.add_argument("--output-dir", default="results/prune_compare")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        if not 1 <= args.kept <= args.trained:
            raise UserError(f"--kept {args.kept} must be between 1 and --trained {args.trained}.")
        common = {**parse_overrides(args.overrides), "model": args.model}
        arms = {name: settings for m in args.methods
                for name, settings in arms_of(m, args.trained, args.kept, tuple(args.arms), common).items()}
        rows = seeds.run_all(seeds.configs(arms, args.seeds, common, args.output_dir), args.parallel)
    except UserError as e:
        print(f"prune_compare: error: {e}", file=sys.stderr)
        return 2
    summary = seeds.summarise(rows)
    print("\n" + table(summary))
    if args.json:
        write_json_atomic(args.json, {"runs": rows, "summary": summary, "common": common})
    return 0


if __name__ == "__main__":
    sys.exit(main())
