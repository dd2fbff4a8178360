"""Experiment tracking (MLflow on global rank 0)."""

from tcscale.tracking.mlflow_tracker import NullTracker, Tracker, build_tracker

__all__ = ["NullTracker", "Tracker", "build_tracker"]
