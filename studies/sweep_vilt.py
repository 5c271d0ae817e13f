"""APT on ViLT: a Ray Tune + Optuna sweep over prompts, rank, depth, placement and learning rate, tracked in MLflow.

`apt-ray sweep` with this study's default config (`configs/default_vilt.yaml`, the embedded default: tiny ViLT,
synthetic VQA, local Ray, ./mlflow.db); every flag of `apt-ray sweep --help` works here too.
"""

import sys
from pathlib import Path

from apt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "--study-default", str(Path(__file__).resolve().parent / "configs" / "default_vilt.yaml"), *sys.argv[1:]]))
