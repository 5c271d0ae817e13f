"""`apt-ray sweep` and the study scripts: bad input is one ``error:`` line and exit code 2, before any trial."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from apt_ray.cli import build_parser, main
from apt_ray.sweep.cli import overrides_from

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "studies" / "configs" / "default_meter.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(args: list[str], capsys: pytest.CaptureFixture, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    code = main(["sweep", "--study-default", str(DEFAULT), *args])
    captured = capsys.readouterr()
    return code, captured.err


def test_flags_become_overrides() -> None:
    args = build_parser().parse_args(["sweep", "--num-samples", "3", "--max-epochs", "2", "--workers-per-trial", "2",
                                              "--gpus-per-worker", "0", "concurrency=1", "fixed.lr=0.001"])
    assert overrides_from(args) == {"num_trials": 3, "fixed.epochs": 2, "resources.workers": 2, "resources.gpus_per_worker": 0.0,
                                    "concurrency": 1, "fixed.lr": 0.001}


@pytest.mark.parametrize("args,needle", [
    (["--num-samples", "0"], "--num-samples 0 is not allowed"),
    (["--max-epochs", "-1"], "--max-epochs -1 is not allowed"),
    (["search_space.depth={type: int, low: 1, high: 12}"], "depth 12 is above the 4 layers"),
    (["search_space.rank={type: int, low: 1, high: 100}", "search_space.num_prompts={type: int, low: 1, high: 4}"], "rank 100 is above the hidden size 64"),
    (["num_trails=3"], "did you mean 'num_trials'"),
])
def test_bad_study_settings(args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = run_main(args, capsys, tmp_path, monkeypatch)
    assert code == 2 and err.startswith("apt-ray sweep: error: ") and needle in err and "Traceback" not in err
    assert not (tmp_path / "ray_results").exists()  # refused before anything was created


def test_unreachable_mlflow_uri(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused at the start, within 30 s, naming the URI."""
    import time

    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    code, err = run_main(["--tracking-uri", uri, "--storage-path", str(tmp_path / "s")], capsys, tmp_path, monkeypatch)
    assert time.monotonic() - t0 < 30
    assert code == 2 and "MLflow tracking server" in err and "cannot be reached" in err and uri in err


def test_unreachable_ray_address(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = run_main(["--address", f"127.0.0.1:{free_port()}", "--storage-path", str(tmp_path / "s")], capsys, tmp_path, monkeypatch)
    assert code == 2 and "cannot reach a Ray cluster" in err


def test_resume_without_an_earlier_sweep(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = run_main(["--resume", "--storage-path", str(tmp_path / "nothing")], capsys, tmp_path, monkeypatch)
    assert code == 2 and "no earlier sweep at" in err
    code, err = run_main(["--resume"], capsys, tmp_path, monkeypatch)
    assert code == 2 and "no earlier sweep of study 'default_meter'" in err


def test_script_exit_code_and_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "studies" / "sweep_vilt.py"), "--num-samples", "0"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("apt-ray sweep: error: --num-samples 0") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("uri,needle", [
    ("ftp://x", "unsupported scheme 'ftp'"),
    ("http://127.0.0.1:{port}", "cannot be reached"),
])
def test_tracking_uri_checked_before_the_sweep_directory_is_named(uri: str, needle: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "--study-default", str(DEFAULT), "--tracking-uri", uri.format(port=free_port())])
    out, err = capsys.readouterr()
    assert code == 2 and needle in err and "Traceback" not in err
    assert "sweep directory" not in out
    assert list(tmp_path.iterdir()) == []  # no sweep directory, no MLflow database


def test_verbose_reaches_the_console_set_up(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from apt_ray.sweep import console

    seen: list[bool] = []
    monkeypatch.setattr(console, "configure_console", lambda verbose=False: seen.append(verbose))
    for flags in (["--verbose"], []):
        code, _ = run_main([*flags, "num_trails=3"], capsys, tmp_path, monkeypatch)
        assert code == 2
    assert seen == [True, False]


def test_interrupted_sweep_prints_the_command_that_resumes_it(tmp_path: Path) -> None:
    import io
    from types import SimpleNamespace

    from apt_ray.sweep.cli import print_result
    from apt_ray.sweep.spec import load_study_spec

    sweep_dir = tmp_path / "my sweep"
    result = SimpleNamespace(spec=load_study_spec(str(DEFAULT)), rows=[], front=[], sweep_dir=sweep_dir, optuna_storage="sqlite:///o.db",
                             experiment="e", parent_run_id="r", ui_command="mlflow ui", interrupted=True)
    out = io.StringIO()
    print_result(result, out)
    assert f"continue it with: apt-ray sweep --storage-path '{sweep_dir}' --resume" in out.getvalue()
