"""MLflow runs of a pipeline: one parent per pipeline run, a nested run per stage and evaluation.

The flow creates the parent and hands its id to the stages it launches (through `dvc repro`)
in OMNILONG_PARENT_RUN_ID; a stage started by hand gets a run of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from omnilong.config import Params
from omnilong.tracking.store import use_experiment

PARENT_RUN_ENV = "OMNILONG_PARENT_RUN_ID"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


def create_run(params: Params, name: str, tags: dict[str, str], *, parent: str | None = None) -> str:
    """A new run in the configured store, nested under `parent` or under the pipeline's parent run."""
    from mlflow import MlflowClient

    experiment_id = use_experiment(params.tracking, Path("."))
    parent = parent or os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags = {**tags, "mlflow.parentRunId": parent}
    return MlflowClient().create_run(experiment_id, tags=tags, run_name=name).info.run_id


def log_metrics(client, run_id: str, metrics, step: int = 0) -> None:
    """Log `metrics` (a {name: value} mapping, or mlflow Metric entities) in as few requests as
    MLflow allows: against a tracking server, one request per metric made an evaluation's ~600
    metrics take minutes."""
    import time

    from mlflow.entities import Metric

    if isinstance(metrics, dict):
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
