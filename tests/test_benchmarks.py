"""The overhead benchmark's summary: medians per mode, the start-up difference, the throughput ratio."""

from __future__ import annotations

from tests.helpers import load_script

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    return load_script(f"benchmarks/{name}.py")


def test_trial_overhead_summary_uses_medians_side_by_side() -> None:
    bench = _load("trial_overhead")
    rows = [{"mode": m, "startup_s": s, "samples_per_s": t}
            for m, s, t in [("cold", 6.0, 95.0),
                            ("standalone", 2.0, 100.0), ("sweep_trial", 2.5, 96.0),
                            ("standalone", 3.0, 90.0), ("sweep_trial", 3.4, 99.0),
                            ("standalone", 50.0, 110.0), ("sweep_trial", 3.2, 10.0)]]
    s = bench.summarise(rows)
    assert s["median"]["standalone"] == {"startup_s": 3.0, "samples_per_s": 100.0}
    assert s["median"]["sweep_trial"] == {"startup_s": 3.2, "samples_per_s": 96.0}
    assert s["startup_overhead_s"] == pytest.approx(0.2)  # one outlier per mode does not move a median
    assert s["throughput_ratio"] == pytest.approx(0.96)
    assert s["process_start_s"] == pytest.approx(6.0 - 3.2)  # the cold trial's extra, over a warm sweep trial


def test_trial_overhead_measures_from_what_trials_report() -> None:
    """Standalone: its own start-up figure; a sweep trial: from the driver's start to its first step, throughput
    averaged over its epochs."""
    bench = _load("trial_overhead")
    standalone = {"mode": "standalone", "started": 0.0, "results": [{"startup_s": 0.4, "samples_per_s": 80.0, "val_score": 9.0,
                                                                    "global_step": 10, "threads": 2}]}
    sweep = {"mode": "sweep_trial", "started": 100.0, "results": [
        {"epoch": 1, "val_score": 5.0, "samples_per_s": 70.0, "first_step_unix": 100.75, "global_step": 5},
        {"epoch": 1, "global_step": 7, "partial_epoch": True},  # a mid-epoch checkpoint: not an epoch
        {"epoch": 2, "val_score": 9.0, "samples_per_s": 90.0, "first_step_unix": 100.75, "global_step": 10}]}
    assert bench.measured(standalone)["startup_s"] == 0.4
    m = bench.measured(sweep)
    assert m["startup_s"] == pytest.approx(0.75) and m["samples_per_s"] == pytest.approx(80.0) and m["val_score"] == 9.0


def test_trial_overhead_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("trial_overhead")
    assert bench.main(["--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert "must be positive" in err and "Traceback" not in err


def test_cli_startup_summary_uses_medians_against_the_goal() -> None:
    bench = _load("cli_startup")
    s = bench.summarise({"apt-ray --help": [0.30, 0.20, 9.0], "apt-ray sweep --help": [1.4, 1.2, 0.5, 1.1]}, goal_s=1.0)
    assert s["apt-ray --help"] == {"median_s": 0.30, "min_s": 0.20, "max_s": 9.0, "runs": 3, "under_goal": True}  # one slow start does not count
    assert s["apt-ray sweep --help"]["median_s"] == pytest.approx(1.15) and s["apt-ray sweep --help"]["under_goal"] is False
    with pytest.raises(ValueError, match="no timings"):
        bench.summarise({"apt-ray --help": []})


def test_cli_startup_finds_heavy_packages_by_their_top_level_name() -> None:
    bench = _load("cli_startup")
    names = ["argparse", "torch.nn.functional", "torch", "ray._private.worker", "raylet_helper", "pydantic", "mlflowx"]
    assert bench.heavy_modules(names) == ["ray", "torch"]  # not packages that merely start with the same letters
    assert bench.heavy_modules(["apt_ray.cli", "pydantic"]) == []
    table = bench.format_table(bench.summarise({"apt-ray --help": [0.2]}), {"build_parser()": [], "every --help text": ["torch"]})
    assert "heavy modules after build_parser(): none" in table and "heavy modules after every --help text: torch" in table
    assert "apt-ray --help" in table and "0.200" in table and "ok" in table


def test_cli_startup_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("cli_startup")
    assert bench.main(["--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert "must be positive" in err and "Traceback" not in err
