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
    rows = [{"mode": m, "startup_s": s, "wall_s": w, "samples_per_s": t}
            for m, s, w, t in [("standalone", 2.0, 10.0, 100.0), ("ray_train", 9.0, 20.0, 96.0),
                               ("standalone", 3.0, 11.0, 90.0), ("ray_train", 7.0, 18.0, 99.0),
                               ("standalone", 50.0, 60.0, 110.0), ("ray_train", 8.0, 19.0, 10.0)]]
    s = bench.summarise(rows)
    assert s["median"]["standalone"] == {"startup_s": 3.0, "wall_s": 11.0, "samples_per_s": 100.0}
    assert s["median"]["ray_train"] == {"startup_s": 8.0, "wall_s": 19.0, "samples_per_s": 96.0}
    assert s["startup_overhead_s"] == pytest.approx(5.0)  # one outlier per mode does not move a median
    assert s["throughput_ratio"] == pytest.approx(0.96)


def test_trial_overhead_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("trial_overhead")
    assert bench.main(["--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert "must be positive" in err and "Traceback" not in err
