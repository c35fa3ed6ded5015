"""Where runs are tracked: the project's SQLite store by default, or `tracking.uri`."""

from __future__ import annotations

from pathlib import Path

from omnilong.config import TrackingParams


def tracking_uri(tracking: TrackingParams, root: Path) -> str:
    if tracking.uri:
        return tracking.uri
    return f"sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}"


def artifact_root(root: Path) -> str:
    """Artifacts of the local store live beside it, under the project."""
    return str((root / "mlflow" / "artifacts").resolve())


def use_experiment(tracking: TrackingParams, root: Path) -> str:
    """Point MLflow at the store and return the experiment id, creating it on first use."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(tracking, root))
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None if tracking.uri else artifact_root(root)
    return mlflow.create_experiment(tracking.experiment, artifact_location=location)
