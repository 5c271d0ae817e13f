"""Experiment tracking (MLflow): parent run per sweep, nested child run per trial."""
