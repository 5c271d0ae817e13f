"""`apt-ray ... --help`: every flag explained with its default, closed sets as choices, the key=value settings
listed, internal knobs hidden, and a parser that imports no torch, Ray or MLflow. Also what `apt-ray profile` prints
about the overhead, and its progress line."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from apt_ray.cli import HelpFormatter, build_parser, format_profile, main, status

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("profile", "train", "sweep", "pretrain")
HEAVY = ("torch", "transformers", "ray", "mlflow", "optuna", "datasets")


def _user_actions(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions a user sees in the help (not -h, not the hidden ones)."""
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction) and a.help is not argparse.SUPPRESS]


def _help(command: str) -> str:
    return build_parser().commands[command].format_help()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_shows_its_default(command: str) -> None:
    p = build_parser().commands[command]
    formatter = HelpFormatter(prog=p.prog)
    actions = _user_actions(p)
    assert actions
    for action in actions:
        assert action.help and action.help.strip(), f"{command} {action.option_strings or action.dest} has no help"
        if action.option_strings:  # an option: its default (or what unset means) is in its help line
            assert "default" in formatter._get_help_string(action), f"{command} {action.option_strings} shows no default"


def test_defaults_are_rendered() -> None:
    profile, train, sweep = (" ".join(_help(c).split()) for c in ("profile", "train", "sweep"))  # unwrapped
    assert "the registered method to apply (default: apt)" in profile
    assert "(default: tiny-meter)" in profile and "(default: off)" in profile  # a value; a switch as on/off
    assert "rank of the low-rank factors" in profile and "(default: 4)" in profile  # a knob: its method's default
    assert "(default: 0)" in train  # --max-failures
    assert "(default: sqlite:///mlflow.db" in sweep


def test_formatter_adds_defaults_only_where_the_help_does_not_say() -> None:
    p = argparse.ArgumentParser()
    f = HelpFormatter(prog="x")
    explained = p.add_argument("--a", default=None, help="a (default: the preset's)")
    number = p.add_argument("--b", type=int, default=3, help="b")
    switch = p.add_argument("--c", action="store_true", help="c")
    assert f._get_help_string(explained) == "a (default: the preset's)"
    assert f._get_help_string(number) == "b (default: %(default)s)"
    assert f._get_help_string(switch) == "c (default: off)"


def test_internal_knobs_are_hidden_but_work() -> None:
    assert "--study-default" not in _help("sweep")
    args = build_parser().parse_args(["sweep", "--study-default", "studies/configs/default_meter.yaml"])
    assert args.study_default == "studies/configs/default_meter.yaml"
    for command in COMMANDS:
        hidden = [a for a in build_parser().commands[command]._actions if a.help is argparse.SUPPRESS]
        assert all(a.option_strings[0] not in _help(command) for a in hidden)


def test_closed_sets_are_choices() -> None:
    from apt_ray.data.spec import DataSpec
    from apt_ray.methods import registry

    commands = build_parser().commands
    by_flag = {c: {a.option_strings[0]: a for a in commands[c]._actions if a.option_strings} for c in COMMANDS}
    names = list(registry.method_names())
    assert list(by_flag["profile"]["--method"].choices) == names and list(by_flag["train"]["--method"].choices) == names
    assert list(by_flag["profile"]["--placement"].choices) == ["bottom", "top"]
    assert list(by_flag["profile"]["--sites"].choices) == ["all", "self", "cross"]
    assert list(by_flag["train"]["--data"].choices) == list(DataSpec.model_fields["kind"].annotation.__args__)
    assert list(by_flag["pretrain"]["--device"].choices) == ["auto", "cpu", "cuda"]
    assert "{" + ",".join(names) + "}" in _help("profile")


def test_closed_set_values_still_parse() -> None:
    args = build_parser().parse_args(["profile", "--method", "lora", "--placement", "top", "--sites", "self"])
    assert (args.method, args.placement, args.sites) == ("lora", "top", "self")
    assert build_parser().parse_args(["train", "--data", "hf"]).data == "hf"


def test_epilogs_list_the_settings_and_examples() -> None:
    from apt_ray.config import TrainConfig
    from apt_ray.sweep.spec import Resources, SchedulerSpec, StudySpec

    train, sweep = _help("train"), _help("sweep")
    listed = train.split("key=value settings (and --config keys):", 1)[1]
    assert set(re.split(r"[,\s]+", listed.strip())) == set(TrainConfig.model_fields)
    keys = sweep.split("key=value settings", 1)[1]
    for key in [*StudySpec.model_fields.keys() - {"fixed", "search_space", "resources", "scheduler"},
                *Resources.model_fields, *SchedulerSpec.model_fields, "num_prompts", "lr"]:
        assert key in keys, key
    assert "fixed.<key>" in keys and "resources.<key>" in keys and "search_space.<key>" in keys
    for command in COMMANDS:
        examples = _help(command).split("examples:", 1)[1]
        assert examples.count(f"apt-ray {command} ") >= 2


def test_parser_imports_nothing_heavy() -> None:
    """In a fresh process: building the parser, and showing every command's help, import no torch, Ray or MLflow."""
    code = (
        "import json, sys\n"
        "from apt_ray.cli import build_parser\n"
        "p = build_parser()\n"
        "built = sorted(sys.modules)\n"
        "[p.commands[c].format_help() for c in p.commands]\n"
        "print(json.dumps({'built': built, 'help': sorted(sys.modules)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stdout)
    for stage in ("built", "help"):
        heavy = sorted({m.split(".")[0] for m in modules[stage]} & set(HEAVY))
        assert heavy == [], f"{stage}: {heavy}"
    assert "apt_ray.config" not in modules["built"] and "apt_ray.sweep" not in modules["built"]  # key lists: at help time


def test_help_pointer_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "(see `apt-ray train --help`)" in err and "<command>" not in err


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--num-samples", "many"]) == 2  # refused while parsing: the same exit code as the commands' errors
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["apt-ray sweep: error: argument --num-samples: invalid int value: 'many' (see `apt-ray sweep --help`)"]


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["sweep", "--help"])
    assert done.value.code == 0 and "--verbose" in capsys.readouterr().out


def test_sweep_verbose_flag() -> None:
    assert build_parser().parse_args(["sweep"]).verbose is False
    assert build_parser().parse_args(["sweep", "--verbose"]).verbose is True


# -- what `apt-ray profile` prints -------------------------------------------------------------------------------

def test_profile_reports_the_overhead_as_a_percentage_of_the_base(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "tiny-vilt", "--method", "apt", "--num-prompts", "8", "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["additional_gmacs"] > 0
    assert prof["additional_pct_of_base"] == pytest.approx(100 * prof["additional_gmacs"] / prof["base_gmacs"])
    assert main(["profile", "--model", "tiny-vilt", "--method", "apt", "--num-prompts", "8"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("additional % of base"))
    assert row.split()[-1] == f"{prof['additional_pct_of_base']:.2f}%"


def test_profile_percentage_of_a_known_profile() -> None:
    from apt_ray.profile import Profile

    prof = Profile(model="m", method="apt", num_prompts=1, rank=1, depth=1, placement="bottom", layers=[0], sites=1,
                   text_len=4, image_hw=[8, 8], stream_lengths={"joint": 5}, base_gmacs=8.0, total_gmacs=8.5,
                   additional_gmacs=0.5, measured_additional_gmacs=0.5, analytic_additional_gmacs=0.5,
                   updated_params=10, analytic_updated_params=10, trainable_params=20, head_params=10)
    assert prof.to_dict()["additional_pct_of_base"] == pytest.approx(6.25)
    row = next(line for line in format_profile(prof).splitlines() if line.startswith("additional % of base"))
    assert row.split()[-1] == "6.25%"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_on_a_terminal_only() -> None:
    term, pipe = _Terminal(), io.StringIO()
    with status("measuring tiny-vilt with apt ...", term):
        assert term.getvalue() == "measuring tiny-vilt with apt ..."
    assert term.getvalue().endswith("\r\x1b[K")  # erased: the table (or an error) stands alone
    with pytest.raises(RuntimeError):
        with status("measuring ...", term):
            raise RuntimeError("boom")
    assert term.getvalue().endswith("\r\x1b[K")
    with status("measuring ...", pipe):
        pass
    assert pipe.getvalue() == ""


def test_profile_shows_progress_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["profile", "--model", "tiny-vilt", "--method", "lora", "--json"]) == 0
    assert term.getvalue().startswith("measuring tiny-vilt with lora")
    assert json.loads(capsys.readouterr().out)["method"] == "lora"
