"""APT on METER: a Ray Tune + Optuna sweep over prompts, rank, depth, placement and learning rate, tracked in MLflow.

With no flags it runs the embedded default (tiny METER, synthetic VQA) on a local Ray
instance and logs to ./mlflow.db; --config studies/configs/paper_meter_vqav2.yaml is the
paper-scale study for a GPU cluster. `--help` lists the flags.
"""

import sys
from pathlib import Path

from apt_ray.sweep.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default_meter.yaml"

if __name__ == "__main__":
    sys.exit(main(default_config=DEFAULT_CONFIG, prog="sweep_meter.py", description=__doc__.splitlines()[0]))
