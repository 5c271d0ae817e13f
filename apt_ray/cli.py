"""The ``apt-ray`` command line: profile, pretrain, train, sweep."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from pydantic import ValidationError

from apt_ray.errors import UserError, validation_message


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of layer indices, e.g. 0,1,5") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _image_hw(text: str) -> tuple[int, int]:
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an image size: use HxW (e.g. 384x384) or one number") from None


def _knob_flag(p: argparse.ArgumentParser, knob: str, info, users: list[str]) -> None:
    """One ``apt-ray profile`` flag for a registered knob, typed from its declaration (values are validated by
    ``MethodSpec``, i.e. by the method's config, so a bad value gives the usual one-paragraph message)."""
    import types
    import typing

    ann = info.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)] if typing.get_origin(ann) in (typing.Union, types.UnionType) else [ann]
    kind = args[0] if len(args) == 1 else str
    flag = "--" + knob.replace("_", "-")
    help_text = (info.description or knob).replace("%", "%%")
    if users and not any(help_text.startswith(f"{u}:") for u in users):
        help_text = f"{'/'.join(users)}: {help_text}"  # which methods read it, unless the description says so
    if kind is bool:
        default = "" if info.default is None else f" (default: {'on' if info.default else 'off'})"
        p.add_argument(flag, dest=knob, action=argparse.BooleanOptionalAction, default=None, help=help_text + default)
        return
    origin = typing.get_origin(kind)
    if origin is list:
        item = (typing.get_args(kind) or (str,))[0]
        p.add_argument(flag, dest=knob, type=_layers if item is int else _names, default=None,
                       help=help_text + " (comma-separated" + (", '' for none)" if item is not int else ")"))
        return
    if origin is typing.Literal:
        p.add_argument(flag, dest=knob, default=None, metavar="{" + ",".join(map(str, typing.get_args(kind))) + "}", help=help_text)
        return
    p.add_argument(flag, dest=knob, type=kind if kind in (int, float) else str, default=None,
                   metavar=knob.upper(), help=help_text + ("" if info.default is None else f" (default: {info.default})"))


def _add_method_args(p: argparse.ArgumentParser) -> None:
    """``--method`` and one flag per knob of the registered methods (see :mod:`apt_ray.methods.registry`)."""
    from apt_ray.methods import registry

    names = registry.method_names()
    p.add_argument("--method", default="apt", help=f"one of: {', '.join(names)} (default apt)")
    g = p.add_argument_group("method knobs", "each method's knobs (declared in its config; unset: the method's default)")
    for knob, info in registry.knob_fields().items():
        users = registry.knob_users(knob)
        _knob_flag(g, knob, info, users if len(users) < len(names) else [])


def method_spec_from_args(args: argparse.Namespace):
    from apt_ray.methods import registry
    from apt_ray.methods.spec import MethodSpec

    registry.get_method(args.method)  # UserError with the registered names (and a did-you-mean)
    fields = {k: getattr(args, k, None) for k in registry.knob_fields()}
    try:
        return MethodSpec(name=args.method, **{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise UserError(validation_message(e, list(MethodSpec.model_fields))) from None


def _profile(args: argparse.Namespace) -> int:
    from apt_ray.models.presets import get_preset
    from apt_ray.profile import profile

    get_preset(args.model)
    spec = method_spec_from_args(args)
    if args.text_len is not None and args.text_len < 1:
        raise UserError(f"--text-len {args.text_len} is not allowed: give a positive number of text tokens.")
    prof = profile(args.model, spec, text_len=args.text_len, image_hw=args.image_size)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=2))
    else:
        print(format_profile(prof, per_site=args.per_site))
    return 0


def format_profile(prof, per_site: bool = False) -> str:
    """A readable table of a :class:`~apt_ray.profile.Profile`."""
    rows = [
        ("model", prof.model), ("method", prof.method),
        ("prompts / rank", f"{prof.num_prompts} / {prof.rank}"),
        ("layers", f"{prof.depth} ({prof.placement}: {prof.layers})"), ("sites", prof.sites),
        ("input", f"{prof.text_len} text tokens, image {prof.image_hw[0]}x{prof.image_hw[1]}; stream lengths {prof.stream_lengths}"),
        ("base GMACs", f"{prof.base_gmacs:.3f}"), ("total GMACs", f"{prof.total_gmacs:.3f}"),
        ("additional GMACs (measured)", f"{prof.measured_additional_gmacs:.3f}"),
        ("additional GMACs (analytic)", f"{prof.analytic_additional_gmacs:.3f}"),
        ("layout", ", ".join(f"{k}={v}" for k, v in prof.layout.items())),
        ("updated params", f"{prof.updated_params:,} ({prof.updated_params / 1e6:.2f}M)"),
        ("trainable params", f"{prof.trainable_params:,} ({prof.trainable_params / 1e6:.2f}M): "
                             + ", ".join(f"{k} {v:,}" for k, v in prof.trainable_groups.items())),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows] + [f"({prof.convention})"]
    if per_site and prof.per_site:
        lines.append("")
        lines.append(f"{'site':<22}{'Nq':>6}{'Nk':>6}{'analytic G':>12}{'measured G':>12}{'params':>10}")
        for s in prof.per_site:
            lines.append(f"{s['site']:<22}{s['query_tokens']:>6}{s['key_tokens']:>6}{s['analytic_gmacs']:>12.4f}{s['measured_gmacs']:>12.4f}{s['updated_params']:>10,}")
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from apt_ray.config import build_train_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    for key in ("model", "method", "data", "epochs", "checkpoint"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    cfg = build_train_config(args.config, overrides)
    from apt_ray.train.loop import Diverged, train_loop_per_worker

    try:
        if args.workers is not None:
            from apt_ray.train.distributed import run_distributed

            resources = {"CPU": 1, "GPU": args.gpus_per_worker} if args.gpus_per_worker > 0 else None
            result = run_distributed(cfg, workers=args.workers, address=args.address, max_failures=args.max_failures,
                                     use_gpu=args.gpus_per_worker > 0, resources_per_worker=resources)
        else:
            result = train_loop_per_worker({**cfg.model_dump(), "_progress": True})
    except Diverged as e:
        _write_json(args.json_out, {"status": "diverged", "message": str(e), "global_step": e.step})
        print(f"apt-ray train: {e}", file=sys.stderr)
        return 1
    print(format_result(result))
    _write_json(args.json_out, result)
    return 0


def _write_json(path: str | None, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (never a half-written file over a good one)."""
    if path:
        from apt_ray.io import write_json_atomic

        write_json_atomic(path, data)


def format_result(result: dict) -> str:
    """The final metrics of a training run as a small table."""
    keys = [("val score", "val_score", "{:.2f}"), ("majority baseline", "majority_baseline", "{:.2f}"),
            ("additional GMACs", "additional_gmacs", "{:.4f}"), ("updated params", "updated_params", "{:,}"),
            ("trainable params", "trainable_params", "{:,}"), ("epochs", "epochs", "{}"), ("global step", "global_step", "{}"),
            ("samples/s", "samples_per_s", "{:.1f}"), ("restarts", "restarts", "{}")]
    rows = [(label, fmt.format(result[k])) for label, k, fmt in keys if k in result]
    # the task's own metrics (the VQA task: its VQA accuracy), after the score
    rows[1:1] = [(k, f"{v:.2f}") for k, v in result.items() if k.startswith("val_") and k != "val_score" and isinstance(v, float)]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def _pretrain(args: argparse.Namespace) -> int:
    from apt_ray.config import build_train_config
    from apt_ray.models.presets import get_preset
    from apt_ray.train.pretrain import DEFAULT_STEPS, ensure_pretrained, pretrain, pretrained_dir

    overrides = {"model": args.model}
    if args.data_path:
        overrides["data_path"] = args.data_path
    cfg = build_train_config(None, overrides)
    if not get_preset(cfg.model).self_pretrained:
        raise UserError(f"apt-ray pretrain builds the tiny presets only; {cfg.model} loads real weights with checkpoint=...")
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise UserError(f"--steps {steps} is not allowed: give a positive number of steps.")
    spec = cfg.data_spec()
    from apt_ray.train.loop import pick_device

    device = pick_device(args.device)
    if args.force:
        path = pretrain(cfg.model, spec, pretrained_dir(cfg.model, spec, steps, args.seed, device), steps=steps, seed=args.seed, device=device)
    else:
        path = ensure_pretrained(cfg.model, spec, steps=steps, seed=args.seed, device=device)
    print(f"pretrained {cfg.model}: {path}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from apt_ray.sweep.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apt-ray", description="APT and its peers on vision-language backbones.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="FLOPs and parameter profile of a model + method")
    p.add_argument("--model", default="tiny-meter", help="vilt-b32, meter-clip16-roberta, tiny-vilt, tiny-meter")
    _add_method_args(p)
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default: the preset's)")
    p.add_argument("--image-size", type=_image_hw, default=None, help="HxW (default: the preset's)")
    p.add_argument("--per-site", action="store_true", help="also print the per-site breakdown")
    p.add_argument("--json", action="store_true", help="print the JSON object instead of a table")
    p.set_defaults(func=_profile)

    t = sub.add_parser("train", help="run one trial (standalone, or on Ray Train with --workers)")
    t.add_argument("--config", default=None, help="flat YAML mapping of trial settings")
    t.add_argument("--model", default=None)
    t.add_argument("--method", default=None)
    t.add_argument("--data", default=None, help="synthetic | vqav2_arrow | hf")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--checkpoint", default=None, help="backbone weights: transformers dir / hub id / METER .ckpt")
    t.add_argument("--json-out", default=None, help="write the final metrics here as JSON")
    t.add_argument("--workers", type=int, default=None, help="run on Ray Train with this many workers")
    t.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    t.add_argument("--max-failures", type=int, default=0, help="worker failures Ray Train may recover from")
    t.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per Ray Train worker")
    t.add_argument("overrides", nargs="*", help="key=value settings, e.g. lr=1e-3 num_prompts=32")
    t.set_defaults(func=_train)

    sw = sub.add_parser("sweep", help="a Ray Tune + Optuna study (prompts, rank, depth, placement, lr) tracked in MLflow",
                        description="Run (or --resume) a study: Ray Tune trials proposed by Optuna within the FLOPs budget, "
                                    "each one logged as a nested MLflow run.")
    from apt_ray.sweep.cli import add_arguments  # argparse only: the sweep's Ray and MLflow load when it runs

    add_arguments(sw)
    sw.set_defaults(func=_sweep)

    pt = sub.add_parser("pretrain", help="pretrain a tiny backbone on synthetic captions (MLM + ITM, and ITC for METER), cached")
    pt.add_argument("--model", default="tiny-meter", help="tiny-meter or tiny-vilt")
    pt.add_argument("--data-path", default=None, help="cache root (default $APT_RAY_CACHE or ~/.cache/apt_ray)")
    pt.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the cached default backbone's)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--force", action="store_true", help="rebuild even if cached")
    pt.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train (fp32; a GPU takes ~1 min, 2 CPU cores ~5)")
    pt.set_defaults(func=_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options (argparse alone takes one run of them)
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"apt-ray {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"apt-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
