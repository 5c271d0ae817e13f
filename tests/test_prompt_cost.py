"""benchmarks/prompt_cost.py on tiny settings: GMACs grow with the prompt count, rows have their schema, bad input exits 2."""

from __future__ import annotations

from tests.helpers import load_script

import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench() -> ModuleType:
    return load_script("benchmarks/prompt_cost.py")


def test_rows_schema_and_gmacs_grow_with_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cost.json"
    code = bench().main(["--preset", "cpu-tiny", "--prompts", "32", "2", "8", "--batch-size", "2", "--repeats", "3", "--warmup", "1",
                         "--depth", "2", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 3
    for r in rows:
        assert {"method", "num_prompts", "additional_gmacs", "extra_step_ms", "peak_mem_mb"} <= set(r)
        assert r["peak_mem_mb"] > 0 and math_finite(r["extra_step_ms"])
    for method in ("apt", "deep_prompt"):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["num_prompts"])
        assert [r["num_prompts"] for r in mine] == [2, 8, 32]
        gmacs = [r["additional_gmacs"] for r in mine]
        assert all(a < b for a, b in zip(gmacs, gmacs[1:])), gmacs
    at = {(r["method"], r["num_prompts"]): r["additional_gmacs"] for r in rows}
    assert all(at[("apt", p)] < at[("deep_prompt", p)] for p in (2, 8, 32))
    assert "| apt | 32 |" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def math_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@pytest.mark.parametrize("argv, words", [
    (["--methods", "apt", "lora"], "unknown method 'lora'"),
    (["--prompts", "0", "8"], "--prompts 0"),
    (["--preset", "huge"], "unknown preset"),
    (["--image-size", "30x30"], "multiples of the patch size"),
])
def test_bad_input_is_one_message_and_exit_2(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench().main(["--preset", "cpu-tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
