"""APT on ViLT: a Ray Tune + Optuna sweep over prompts, rank, depth, placement and learning rate, tracked in MLflow.

With no flags it runs the embedded default (tiny ViLT, synthetic VQA) on a local Ray
instance and logs to ./mlflow.db. `--help` lists the flags.
"""

import sys
from pathlib import Path

from apt_ray.sweep.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default_vilt.yaml"

if __name__ == "__main__":
    sys.exit(main(default_config=DEFAULT_CONFIG, prog="sweep_vilt.py", description=__doc__.splitlines()[0]))
