"""Sweeps: a ``StudySpec`` run as a Ray Tune study (Optuna search, ASHA, FLOPs budget), tracked in MLflow."""

from apt_ray.sweep.spec import StudySpec, load_study_spec

__all__ = ["StudySpec", "load_study_spec", "run_study", "StudyResult"]


def __getattr__(name: str):  # Ray and MLflow are imported only when a sweep actually runs
    if name in ("run_study", "StudyResult"):
        from apt_ray.sweep import run

        return getattr(run, name)
    raise AttributeError(name)
