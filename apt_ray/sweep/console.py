"""What a sweep's console shows: apt_ray's own lines; the third-party tools' only with ``--verbose``.

Light on purpose (no Ray, no MLflow import): it runs before the study is checked.
"""

from __future__ import annotations

import logging
import os

# Loggers of the tools a sweep drives whose INFO lines (banners, "view run" links, database migrations, new-study
# notices) are not about the sweep; --verbose keeps them.
# (Ray's own start-up notices are kept off by ``apt_ray.train.distributed.connect(quiet=True)``.)
THIRD_PARTY_LOGGERS = ("ray", "ray.tune", "ray.train", "mlflow", "optuna", "matplotlib", "urllib3", "alembic",
                       "ray.tune.execution.tune_controller")
# a failed trial's traceback: in its error.txt, and its reason on the sweep's line and MLflow run
QUIET = {"ray.tune.execution.tune_controller": logging.CRITICAL}


def configure_console(verbose: bool = False) -> None:
    """The sweep's console: apt_ray's own lines at INFO; the third-party tools' at WARNING unless ``verbose``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("apt_ray").setLevel(logging.INFO)
    if verbose:
        return
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(QUIET.get(name, logging.WARNING))
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported (its database set-up lines)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's experiment banner and result-path hints
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # the data cache's progress bars in trials
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:  # pragma: no cover - optuna is a dependency
        pass
