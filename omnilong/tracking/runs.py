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


def create_run(params: Params, name: str, tags: dict[str, str], *, parent: str | None = None) -> str:
    """A new run in the configured store, nested under `parent` or under the pipeline's parent run."""
    from mlflow import MlflowClient

    experiment_id = use_experiment(params.tracking, Path("."))
    parent = parent or os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags = {**tags, "mlflow.parentRunId": parent}
    return MlflowClient().create_run(experiment_id, tags=tags, run_name=name).info.run_id
