"""Execute the analysis notebook against a study in MLflow (papermill), after checking the study is there."""

from __future__ import annotations

import os
from pathlib import Path

from apt_ray.errors import UserError

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "prompt_length_tradeoffs.ipynb"


def run_notebook(tracking_uri: str, experiment: str, output: str | Path, notebook: str | Path = NOTEBOOK,
                 timeout_s: int = 600, kernel: str = "python3") -> Path:
    """Run ``notebook`` with ``tracking_uri``/``experiment`` injected into its ``parameters`` cell; returns the
    executed copy. Bad input (no such store or experiment, no sweep in it) is a ``UserError`` before any kernel starts."""
    import papermill as pm

    from apt_ray.analysis.runs import load_study_runs

    if not Path(notebook).is_file():
        raise UserError(f"notebook {notebook} does not exist: pass the path of prompt_length_tradeoffs.ipynb.")
    runs = load_study_runs(tracking_uri, experiment)  # fails here, with one message, rather than inside the kernel
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}.ipynb")
    pm.execute_notebook(str(notebook), str(tmp), parameters={"tracking_uri": runs.tracking_uri, "experiment": experiment},
                        kernel_name=kernel, execution_timeout=timeout_s, progress_bar=False, cwd=str(Path(notebook).parent))
    tmp.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    """``python -m apt_ray.analysis.notebook --experiment NAME [--tracking-uri U] [--output OUT.ipynb]``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m apt_ray.analysis.notebook", description="Execute the prompt-length analysis notebook on a study.")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="prompt-length")
    p.add_argument("--output", default="prompt_length_tradeoffs.executed.ipynb")
    args = p.parse_args(argv)
    try:
        out = run_notebook(args.tracking_uri, args.experiment, args.output)
    except UserError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return UserError.exit_code
    print(f"executed: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
