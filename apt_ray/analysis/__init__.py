"""Analysis of studies logged to MLflow: trials as a DataFrame, summaries, importance, figures, a written reading.

Trends with the prompt count are read only within configurations (trials equal in every other knob) run at enough
prompt counts; see docs/architecture.md, "Reading a study". Used by ``notebooks/prompt_length_tradeoffs.ipynb``;
imports MLflow and Optuna, never Ray.
"""

from apt_ray.analysis.importance import Importance, parameter_importance
from apt_ray.analysis.runs import StudyRuns, load_study_runs

__all__ = ["Importance", "StudyRuns", "load_study_runs", "parameter_importance"]
