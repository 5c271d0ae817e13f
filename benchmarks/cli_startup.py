"""How fast ``apt-ray --help`` answers, and what building its parser imports.

Each help command runs ``--repeats`` times, each time in a fresh process (the ``apt-ray`` console script next to
this Python, else ``python -m apt_ray.cli``), timed from start to exit; the table shows the median (and the
fastest and slowest run) against the goal of under a second. A fresh process then builds the parser, and formats
every command's help, and the heavy packages (torch, transformers, Ray, MLflow, ...) found in ``sys.modules`` at
each stage are listed: there should be none.

    python benchmarks/cli_startup.py --repeats 10 --json startup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

COMMANDS: tuple[tuple[str, ...], ...] = (("--help",), ("sweep", "--help"), ("train", "--help"), ("profile", "--help"),
                                         ("pretrain", "--help"))
HEAVY = ("torch", "transformers", "ray", "mlflow", "optuna", "datasets", "numpy", "pandas", "PIL", "sklearn")
GOAL_S = 1.0

# Run in a fresh process: the modules loaded after building the parser, and after formatting every command's help.
_PROBE = """\
import json, sys
from apt_ray.cli import build_parser
parser = build_parser()
built = sorted(sys.modules)
for command in parser.commands.values():
    command.format_help()
print(json.dumps({"build_parser()": built, "every --help text": sorted(sys.modules)}))
"""


def apt_ray_command() -> list[str]:
    """How to start ``apt-ray``: the console script installed with this Python, else the module."""
    script = Path(sys.executable).with_name("apt-ray")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "apt_ray.cli"]


def time_command(argv: Sequence[str]) -> float:
    """Wall time of one fresh ``apt-ray`` process (its output discarded); it must exit 0."""
    t0 = time.perf_counter()
    proc = subprocess.run([*apt_ray_command(), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"apt-ray {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return elapsed


def heavy_modules(names: Iterable[str], heavy: Sequence[str] = HEAVY) -> list[str]:
    """The heavy top-level packages among module ``names`` (``torch.nn`` counts as ``torch``), sorted."""
    return sorted({n.split(".", 1)[0] for n in names} & set(heavy))


def loaded_modules() -> dict[str, list[str]]:
    """Per stage (building the parser, formatting every help), the modules a fresh process has loaded."""
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def summarise(samples: dict[str, list[float]], goal_s: float = GOAL_S) -> dict[str, dict[str, float | int | bool]]:
    """Per command: the median, fastest and slowest of its wall times, their count, and whether the median meets
    ``goal_s``."""
    out: dict[str, dict[str, float | int | bool]] = {}
    for command, times in samples.items():
        if not times:
            raise ValueError(f"no timings for '{command}'")
        median = statistics.median(times)
        out[command] = {"median_s": median, "min_s": min(times), "max_s": max(times), "runs": len(times),
                        "under_goal": median < goal_s}
    return out


def format_table(summary: dict[str, dict[str, float | int | bool]], heavy: dict[str, list[str]], goal_s: float = GOAL_S) -> str:
    """The timings as a table, then the heavy packages loaded at each stage."""
    width = max([len("command"), *(len(c) for c in summary)])
    lines = [f"{'command':<{width}}  {'median s':>9}  {'min s':>7}  {'max s':>7}  {'runs':>4}  goal < {goal_s:g} s"]
    for command, s in summary.items():
        lines.append(f"{command:<{width}}  {s['median_s']:>9.3f}  {s['min_s']:>7.3f}  {s['max_s']:>7.3f}  {s['runs']:>4}  "
                     f"{'ok' if s['under_goal'] else 'SLOW'}")
    lines.append("")
    for stage, found in heavy.items():
        lines.append(f"heavy modules after {stage}: {', '.join(found) if found else 'none'}")
    lines.append(f"(checked: {', '.join(HEAVY)})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per command (default: 7)")
    parser.add_argument("--json", default=None, help="also write the summary here as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        print(f"cli_startup.py: error: --repeats {args.repeats}: must be positive.", file=sys.stderr)
        return 2
    time_command(COMMANDS[0])  # warm the file cache once, uncounted
    samples = {"apt-ray " + " ".join(c): [time_command(c) for _ in range(args.repeats)] for c in COMMANDS}
    summary = summarise(samples)
    heavy = {stage: heavy_modules(names) for stage, names in loaded_modules().items()}
    print(format_table(summary, heavy))
    if args.json:
        Path(args.json).write_text(json.dumps({"timings": summary, "heavy_modules": heavy}, indent=2))
    return 0 if all(s["under_goal"] for s in summary.values()) and not any(heavy.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
