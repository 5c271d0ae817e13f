"""The ``apt-ray`` command line: profile, pretrain, train, sweep.

Building the parser imports argparse and the method registry's declarations only (pydantic; no torch, transformers,
Ray or MLflow), so ``apt-ray --help`` answers at once. The lists of ``key=value`` settings in the help need the
config models and are built when the help is shown; each command imports what it runs.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import textwrap
import types
import typing
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn, Sequence

from apt_ray.errors import UserError, for_command, validation_message

if typing.TYPE_CHECKING:
    from apt_ray.methods.spec import MethodSpec
    from apt_ray.models.registry import Preset
    from apt_ray.profile import Profile

# Presets register with their backbone modules, which import torch: --model is checked after parsing (an unknown
# name is refused with the registered ones), and its help names the built-in ones.
BUILTIN_MODELS = "tiny-meter, tiny-vilt, meter-clip16-roberta, vilt-b32"


# -- the parser -------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help (switches as on/off; an option whose unset value means something is
    described in its own text, "default: ..."), and descriptions and epilogs printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "default" in text or default is None or default is argparse.SUPPRESS:
            return text
        shown = ("on" if default else "off") if isinstance(default, bool) else "%(default)s"
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line pointing at the command's help (as the commands' own errors
    are), whose epilog may be built when the help is shown (``epilog_fn``), and which knows its subcommands."""

    def __init__(self, *args: Any, epilog_fn: Callable[[], str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.epilog_fn = epilog_fn
        self.commands: dict[str, Parser] = {}

    def format_help(self) -> str:
        if self.epilog_fn is not None:
            self.epilog = self.epilog_fn()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')} (see `{self.prog} --help`)\n")


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


def _one_of(name: str, values: Sequence[Any]) -> Callable[[str], str]:
    """An argparse ``type`` for a closed set: the value, or an error naming it, the allowed values and a did-you-mean
    (argparse's own ``choices`` check would only say "invalid choice")."""
    allowed = [str(v) for v in values]

    def check(text: str) -> str:
        if text in allowed:
            return text
        close = difflib.get_close_matches(text, allowed, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise argparse.ArgumentTypeError(f"{name}={text!r} is not allowed{hint}: choose one of {', '.join(allowed)}")

    check.__name__ = name
    return check


def _method_choice(text: str) -> str:
    """``--method``: a registered method name (its error lists them, with a did-you-mean)."""
    from apt_ray.methods import registry

    if text not in registry.method_names():
        raise argparse.ArgumentTypeError(registry.unknown_method_message(text))
    return text


def _knob_flag(p: argparse._ActionsContainer, knob: str, info: Any, users: list[str]) -> None:
    """One ``apt-ray profile`` flag for a registered knob, typed from its declaration (values are validated by
    ``MethodSpec``, i.e. by the method's config, so a bad value gives the usual one-paragraph message)."""
    ann = info.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)] if typing.get_origin(ann) in (typing.Union, types.UnionType) else [ann]
    kind = args[0] if len(args) == 1 else str
    flag = "--" + knob.replace("_", "-")
    help_text = (info.description or knob).replace("%", "%%")
    if users and not any(help_text.startswith(f"{u}:") for u in users):
        help_text = f"{'/'.join(users)}: {help_text}"  # which methods read it, unless the description says so
    origin = typing.get_origin(kind)
    item = (typing.get_args(kind) or (str,))[0] if origin is list else None
    if origin is list:
        help_text += " (comma-separated" + (")" if item is int else ", '' for none)")
    # the flag's own default stays None (unset: the method's default, which may depend on the backbone)
    if info.default is not None:
        shown = ("on" if info.default else "off") if isinstance(info.default, bool) else info.default
        help_text += f" (default: {shown})"
    elif "default" not in help_text:
        help_text += " (default: unset)"
    if kind is bool:
        p.add_argument(flag, dest=knob, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif origin is list:
        p.add_argument(flag, dest=knob, type=_layers if item is int else _names, default=None, metavar="LIST", help=help_text)
    elif origin is typing.Literal:
        values = typing.get_args(kind)
        p.add_argument(flag, dest=knob, type=_one_of(knob, values), choices=[str(v) for v in values], default=None, help=help_text)
    else:
        p.add_argument(flag, dest=knob, type=kind if kind in (int, float) else str, default=None, metavar=knob.upper(), help=help_text)


def _add_method_args(p: argparse.ArgumentParser, group: argparse._ArgumentGroup) -> None:
    """``--method`` and one flag per knob of the registered methods (see :mod:`apt_ray.methods.registry`)."""
    from apt_ray.methods import registry

    names = registry.method_names()
    group.add_argument("--method", default="apt", type=_method_choice, choices=names, help="the registered method to apply")
    g = p.add_argument_group("method knobs", "each method's knobs (declared in its config; unset: the method's default)")
    for knob, info in registry.knob_fields().items():
        users = registry.knob_users(knob)
        _knob_flag(g, knob, info, users if len(users) < len(names) else [])


def _add_profile_arguments(p: Parser) -> None:
    g = p.add_argument_group("model and method")
    g.add_argument("--model", default="tiny-meter", help=f"backbone preset (built in: {BUILTIN_MODELS})")
    _add_method_args(p, g)
    from apt_ray.tasks.registry import task_names

    tasks = task_names()
    g.add_argument("--task", default="vqa", type=_one_of("task", tasks), choices=tasks,
                   help="the registered task whose head and backbone passes are counted (default: vqa)")
    g = p.add_argument_group("input")
    g.add_argument("--text-len", type=int, default=None, help="text tokens, at most what the backbone takes (default: the preset's)")
    g.add_argument("--image-size", type=_image_hw, default=None, metavar="HxW",
                   help="image height x width, or one number for a square; each a multiple of the preset's patch size "
                        "(default: the preset's)")
    g = p.add_argument_group("output")
    g.add_argument("--per-site", action="store_true", help="also print the per-site breakdown")
    g.add_argument("--json", action="store_true", help="print the JSON object instead of a table")


def _add_train_arguments(p: Parser) -> None:
    from apt_ray.data.spec import DataSpec
    from apt_ray.methods import registry

    g = p.add_argument_group("model and method")
    g.add_argument("--config", default=None, help="flat YAML mapping of trial settings, the keys listed below (default: none)")
    g.add_argument("--model", default=None, help=f"backbone preset, built in: {BUILTIN_MODELS} (default: the config's, else tiny-meter)")
    names = registry.method_names()
    g.add_argument("--method", default=None, type=_method_choice, choices=names,
                   help="the registered method to train (default: the config's, else apt)")
    g.add_argument("--epochs", type=int, default=None, help="passes over the training set (default: the config's, else the recipe's)")
    g.add_argument("--checkpoint", default=None,
                   help="backbone weights: transformers dir / hub id / METER .ckpt (default: the tiny presets' self-pretrained "
                        "backbone; random weights for the others)")
    g = p.add_argument_group("data")
    kinds = typing.get_args(DataSpec.model_fields["kind"].annotation)
    g.add_argument("--data", default=None, type=_one_of("data", kinds), choices=kinds,
                   help="which data: the task's synthetic set, the task's ViLT/METER arrow files (arrow; vqav2_arrow is VQA's "
                        "older name) or a Hugging Face dataset (data_path=...) "
                        "(default: the config's, else synthetic)")
    g = p.add_argument_group("Ray", "run the trial on Ray Train (without --workers: in this process, no Ray)")
    g.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: no Ray, train in this process)")
    g.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    g.add_argument("--max-failures", type=int, default=0, help="worker failures Ray Train may recover from")
    g.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per Ray Train worker")
    g = p.add_argument_group("output")
    g.add_argument("--json-out", default=None, help="write the final metrics here as JSON (default: print them only)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="trial settings, before or after the options, e.g. lr=1e-3 num_prompts=32 (keys below)")


def _add_sweep_arguments(p: Parser) -> None:
    """The flags of ``apt-ray sweep`` (run by :mod:`apt_ray.sweep.cli`, which imports Ray and MLflow)."""
    g = p.add_argument_group("study")
    g.add_argument("--config", default=None, help="study YAML, the keys listed below (default: the embedded default study)")
    g.add_argument("--study-default", default=None, help=argparse.SUPPRESS)  # a study script's own default config
    g.add_argument("--num-samples", type=int, default=None, help="number of trials (default: the study's num_trials)")
    g.add_argument("--max-epochs", type=int, default=None, help="epochs per trial (default: the study's fixed.epochs, else the recipe's)")
    g = p.add_argument_group("Ray")
    g.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    g.add_argument("--workers-per-trial", type=int, default=None, help="Ray Train workers per trial (default: the study's resources.workers)")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray Train worker (default: the study's resources.gpus_per_worker)")
    g = p.add_argument_group("MLflow")
    g.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI: sqlite:///file.db, file:/dir or a directory, http(s):// server, databricks "
                        "(default: sqlite:///mlflow.db; an http:// server on clusters)")
    g.add_argument("--experiment", default=None, help="MLflow experiment (default: the study name)")
    g = p.add_argument_group("output")
    g.add_argument("--storage-path", default=None, help="the sweep's directory (default: ./ray_results/<study>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted sweep at --storage-path (or the study's latest one)")
    g.add_argument("--verbose", action="store_true", help="show the third-party tools' own log lines (Ray, Tune, MLflow, Optuna)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more study settings, dotted: concurrency=1 fixed.lr=1e-3 (keys below)")


def _add_pretrain_arguments(p: Parser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny-meter", help="the tiny preset to pretrain: tiny-meter or tiny-vilt")
    g.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the cached default backbone's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the masks and the mismatched pairs (one cached backbone per seed)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train (fp32; a GPU takes ~1 min, 2 CPU cores ~5)")
    g = p.add_argument_group("data and output")
    g.add_argument("--data-path", default=None, help="cache root (default: $APT_RAY_CACHE or ~/.cache/apt_ray)")
    g.add_argument("--force", action="store_true", help="rebuild even if cached")


def _wrapped(title: str, items: Sequence[str], indent: str = "  ") -> str:
    """``title`` and below it the wrapped, comma-separated ``items``, indented."""
    body = textwrap.fill(", ".join(items), width=100, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)
    return f"{title}\n{body}"


def train_keys() -> list[str]:
    """The ``key=value`` settings of ``apt-ray train``: the fields of :class:`~apt_ray.config.TrainConfig`."""
    from apt_ray.config import TrainConfig

    return list(TrainConfig.model_fields)


def sweep_keys() -> dict[str, list[str]]:
    """The ``key=value`` settings of ``apt-ray sweep``, by where they go: top level, ``fixed.``, ``resources.``,
    ``scheduler.``, and the knobs each method searches by default (any trial setting may be searched)."""
    from apt_ray.methods import registry
    from apt_ray.sweep.spec import TOP_LEVEL, Resources, SchedulerSpec, StudySpec

    nested = ("fixed", "search_space", "resources", "scheduler")
    return {
        "top level": [k for k in StudySpec.model_fields if k not in nested],
        "fixed.<key>": [k for k in train_keys() if k not in TOP_LEVEL],
        "resources.<key>": list(Resources.model_fields),
        "scheduler.<key>": list(SchedulerSpec.model_fields),
        "search_space.<key>": sorted({k for name in registry.method_names() for k in registry.get_method(name).searchable}),
    }


PROFILE_EXAMPLES = """\
examples:
  apt-ray profile --model tiny-vilt --method apt --num-prompts 16 --rank 4
  apt-ray profile --model meter-clip16-roberta --method deep_prompt --num-prompts 200 --per-site
  apt-ray profile --model vilt-b32 --method lora --rank 8 --image-size 384x640 --json
  apt-ray profile --model tiny-meter --method kv_prompt --num-prompts 32 --prune-keep 0.25"""

TRAIN_EXAMPLES = """\
examples:
  apt-ray train --model tiny-vilt --method apt --epochs 2 num_prompts=32 lr=1e-3
  apt-ray train --config trial.yaml --json-out result.json seed=1
  apt-ray train --workers 2 --address auto batch_size=64 max_steps=200"""

SWEEP_EXAMPLES = """\
examples:
  apt-ray sweep --num-samples 8 --max-epochs 2
  apt-ray sweep --config studies/configs/default_meter.yaml fixed.lr=1e-3 'search_space.num_prompts={type: int, low: 4, high: 64}'
  apt-ray sweep --address auto --tracking-uri http://head-node:5000 --workers-per-trial 2
  apt-ray sweep --storage-path ray_results/apt-study-20250101-120000 --resume"""

PRETRAIN_EXAMPLES = """\
examples:
  apt-ray pretrain --model tiny-vilt
  apt-ray pretrain --model tiny-meter --steps 2000 --device cuda --force"""


def _train_epilog() -> str:
    return TRAIN_EXAMPLES + "\n\n" + _wrapped("key=value settings (and --config keys):", train_keys())


def _sweep_epilog() -> str:
    titles = {"top level": "top level:",
              "fixed.<key>": "fixed.<key>: a setting every trial shares (the `apt-ray train` keys but model, method, data):",
              "resources.<key>": "resources.<key>: what one trial reserves:",
              "scheduler.<key>": "scheduler.<key>: ASHA or FIFO:",
              "search_space.<key>": "search_space.<key>={type, low, high, log, choices}: any trial setting; by default:"}
    parts = [_wrapped(f"  {titles[where]}", names, indent="    ") for where, names in sweep_keys().items()]
    return SWEEP_EXAMPLES + "\n\nkey=value settings (dotted; nested the same way in --config):\n" + "\n".join(parts)


def build_parser() -> Parser:
    """The ``apt-ray`` parser (light: see the module's docstring)."""
    parser = Parser(prog="apt-ray", description="APT and its peers on vision-language backbones.",
                    epilog="Run `apt-ray <command> --help` for a command's options, settings and examples.")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def command(name: str, help: str, description: str, func: Callable[[argparse.Namespace], int],
                add: Callable[[Parser], None], epilog: str | None = None, epilog_fn: Callable[[], str] | None = None) -> None:
        p = sub.add_parser(name, help=help, description=textwrap.fill(description, 100), epilog=epilog, epilog_fn=epilog_fn)
        add(p)
        p.set_defaults(func=func)
        parser.commands[name] = p

    command("profile", "FLOPs and parameter profile of a model + method",
            "Count the GMACs and parameters a method adds to a backbone (measured and in closed form), at the preset's "
            "input shapes or given ones.", _profile, _add_profile_arguments, epilog=PROFILE_EXAMPLES)
    command("train", "run one trial (standalone, or on Ray Train with --workers)",
            "Train one method on one backbone and print the final metrics; settings come from --config, the options "
            "and key=value pairs (later wins).", _train, _add_train_arguments, epilog_fn=_train_epilog)
    command("sweep", "a Ray Tune + Optuna study (prompts, rank, depth, placement, lr) tracked in MLflow",
            "Run (or --resume) a study: Ray Tune trials proposed by Optuna within the FLOPs budget, each one logged as "
            "a nested MLflow run.", _sweep, _add_sweep_arguments, epilog_fn=_sweep_epilog)
    command("pretrain", "pretrain a tiny backbone on synthetic captions (MLM + ITM, and ITC for METER), cached",
            "Pretrain a tiny preset on the synthetic captions and cache it (trials of tiny presets load it).",
            _pretrain, _add_pretrain_arguments, epilog=PRETRAIN_EXAMPLES)
    return parser


# -- checks that need no model ---------------------------------------------------------------------------------

def check_profile_input(preset: Preset, text_len: int | None, image_hw: tuple[int, int] | None) -> None:
    """Refuse text lengths and image sizes the preset's backbone cannot take, before it is built."""
    if text_len is not None:
        limit = preset.text_limit()
        if text_len < 1:
            raise UserError(f"--text-len {text_len} is not allowed: give a positive number of text tokens.")
        if limit is not None and text_len > limit:
            raise UserError(f"--text-len {text_len} is not allowed: {preset.name} takes at most {limit} text tokens; "
                            f"give 1 to {limit} (the preset's default is {preset.text_len}).")
    if image_hw is not None:
        h, w = image_hw
        p = preset.patch_size
        if h < 1 or w < 1 or h % p or w % p:
            dh, dw = preset.image_hw
            raise UserError(f"--image-size {h}x{w} is not allowed: give a height and width that are positive multiples of "
                            f"{preset.name}'s patch size {p}, e.g. {dh}x{dw} (the preset's default).")


# -- commands -----------------------------------------------------------------------------------------------------

def method_spec_from_args(args: argparse.Namespace) -> MethodSpec:
    from pydantic import ValidationError

    from apt_ray.methods import registry
    from apt_ray.methods.spec import MethodSpec

    registry.get_method(args.method)  # UserError with the registered names (and a did-you-mean)
    fields = {k: getattr(args, k, None) for k in registry.knob_fields()}
    try:
        return MethodSpec(name=args.method, **{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise UserError(validation_message(e, list(MethodSpec.model_fields))) from None


@contextmanager
def status(text: str, stream: typing.TextIO | None = None) -> Iterator[None]:
    """``text`` on stderr while the block runs, on a terminal only, erased afterwards (the result or an error then
    stands alone; a pipe or a log gets no progress lines)."""
    stream = stream or sys.stderr
    live = stream.isatty()
    if live:
        stream.write(text)
        stream.flush()
    try:
        yield
    finally:
        if live:
            stream.write("\r\x1b[K")
            stream.flush()


def _profile(args: argparse.Namespace) -> int:
    from apt_ray.models.presets import get_preset

    preset = get_preset(args.model)
    spec = method_spec_from_args(args)
    check_profile_input(preset, args.text_len, args.image_size)
    from apt_ray.profile import profile

    with status(f"measuring {args.model} with {spec.name} (building the model, counting FLOPs) ..."):
        prof = profile(args.model, spec, text_len=args.text_len, image_hw=args.image_size, task=args.task)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=2))
    else:
        print(format_profile(prof, per_site=args.per_site))
    return 0


def format_profile(prof: Profile, per_site: bool = False) -> str:
    """A readable table of a :class:`~apt_ray.profile.Profile`."""
    pct = prof.additional_pct_of_base
    rows = [
        ("model", prof.model), ("method", prof.method),
        ("task", f"{prof.task} ({prof.backbone_passes} backbone pass{'es' if prof.backbone_passes > 1 else ''} per example)"),
        ("prompts / rank", f"{prof.num_prompts} / {prof.rank}"),
        ("layers", f"{prof.depth} ({prof.placement}: {prof.layers})"), ("sites", prof.sites),
        ("input", f"{prof.text_len} text tokens, image {prof.image_hw[0]}x{prof.image_hw[1]}; stream lengths {prof.stream_lengths}"),
        ("base GMACs", f"{prof.base_gmacs:.3f}"), ("total GMACs", f"{prof.total_gmacs:.3f}"),
        ("additional GMACs (measured)", f"{prof.measured_additional_gmacs:.3f}"),
        ("additional GMACs (analytic)", f"{prof.analytic_additional_gmacs:.3f}"),
        ("additional % of base", "n/a" if pct is None else f"{pct:.2f}%"),
        ("layout", ", ".join(f"{k}={v}" for k, v in prof.layout.items())),
        ("updated params", f"{prof.updated_params:,} ({prof.updated_params / 1e6:.2f}M)"),
        ("trainable params", f"{prof.trainable_params:,} ({prof.trainable_params / 1e6:.2f}M): "
                             + ", ".join(f"{k} {v:,}" for k, v in prof.trainable_groups.items())),
    ]
    if prof.pruning:
        cut = prof.pruning
        rows.insert(3, ("pruning", f"{cut['trained_prompts']} trained, {cut['kept_prompts']} kept per site "
                                   f"(prune_keep={cut['keep']:g}, {cut['mode']}-wise: {cut['rule']}); counted with the kept"))
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
    cfg.check_text_len()
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
    from apt_ray.train.pretrain import default_steps, ensure_pretrained, pretrain, pretrained_dir

    overrides = {"model": args.model}
    if args.data_path:
        overrides["data_path"] = args.data_path
    cfg = build_train_config(None, overrides)
    if not get_preset(cfg.model).self_pretrained:
        raise UserError(f"apt-ray pretrain builds the tiny presets only; {cfg.model} loads real weights with checkpoint=...")
    steps = default_steps(cfg.model) if args.steps is None else args.steps
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``apt-ray`` with ``argv``; returns the exit code (``--help`` exits, as argparse does)."""
    parser = build_parser()
    try:
        # key=value overrides may come before or after options (argparse alone takes one run of them)
        args, extra = parser.parse_known_args(argv)
        stray = [x for x in extra if x.startswith("-") or not hasattr(args, "overrides")]
        if stray:
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(stray)}")
    except SystemExit as e:
        if not e.code:
            raise  # --help, printed
        return int(e.code)  # a usage error, printed as one line like the commands' own errors
    if extra:
        args.overrides = [*args.overrides, *extra]
    command = f"apt-ray {args.command}"
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"{command}: error: {for_command(str(e), command)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
