"""Orchestrated recovery, its parts: each committed step reaches the stage's one MLflow run once,
whatever the crash; a retry overwrites nothing registered. The flow retrying real crashes end to
end is tests/test_train_stage.py::test_the_flow_retries_a_killed_rank_and_a_killed_job_into_a_bit_identical_run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.conftest import REPO


@pytest.fixture
def tracked_params(tmp_path, monkeypatch):
    """params.yaml's parameters tracking into a store of their own, in a 1-rank process group."""
    import mlflow

    from omnilong.config import TrackingParams, load_params

    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", check_paths=False)
    params = params.model_copy(update={"tracking": TrackingParams(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield params
    dist.destroy_process_group()
    mlflow.set_tracking_uri(None)


def test_committed_steps_reach_mlflow_once_whatever_the_crash(tracked_params, tmp_path):
    """A checkpoint carries the steps it commits: a crash between its commit and the flush loses
    none of them; and a step already in the run is not logged again, even by a resume from an
    older checkpoint than the one that flushed it."""
    from mlflow import MlflowClient

    from omnilong.train.runner import StageRun
    from omnilong.train.step_log import StepLogger

    run = StageRun("stage1", tmp_path / "init", tmp_path / "out", tmp_path / "ckpt")
    (tmp_path / "params.yaml").write_text("{}\n")

    def attempt(start_step: int, resumed_run_id=None, committed=None, losses=None) -> StepLogger:
        logger = StepLogger(tracked_params, run, ds_config={}, params_file=tmp_path / "params.yaml",
                            resumed_run_id=resumed_run_id, committed=committed)
        logger.start(start_step)
        for step, loss in (losses or {}).items():
            logger.step(step, seq_len=64, loss=loss, lr=1e-3, tokens=64, seconds=1.0, grad_norm=0.5)
        return logger

    def logged(run_id: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, "train/loss"))

    first = attempt(0, losses={0: 1.0, 1: 2.0})
    assert logged(first.run_id) == []  # buffered until a checkpoint commits
    at_step_2 = list(first.pending)  # what the checkpoint of step 2 holds; the crash came before the flush
    second = attempt(2, first.run_id, at_step_2, losses={2: 3.0})  # crashes before the next checkpoint
    assert logged(first.run_id) == [(0, 1.0), (1, 2.0)]
    third = attempt(2, first.run_id, at_step_2, losses={2: 3.0, 3: 4.0})
    third.flush()  # the checkpoint of step 4 committed
    # Had that checkpoint been lost, a resume from step 2's would redo steps already logged.
    fourth = attempt(2, first.run_id, at_step_2, losses={2: 30.0, 3: 40.0})
    fourth.flush()
    assert second.run_id == third.run_id == fourth.run_id == first.run_id
    assert logged(first.run_id) == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]
    assert MlflowClient().get_run(first.run_id).data.tags["omnilong.attempts"] == "4"


def test_a_retry_keeps_the_version_its_run_registered(tmp_path):
    """A stage that registered its model and crashed before finishing: the retry (same run) gets the
    same version, and the files that version points at are not logged over."""
    import mlflow
    from mlflow import MlflowClient

    from omnilong.tracking.registry import register_stage_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        experiment = client.create_experiment("retry", artifact_location=str(tmp_path / "artifacts"))
        run_id = client.create_run(experiment).info.run_id
        model_dir = tmp_path / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text('{"attempt": 1}')
        first = register_stage_model(run_id, model_dir, "omnilong-retry", "stage1")
        (model_dir / "config.json").write_text('{"attempt": 2}')
        again = register_stage_model(run_id, model_dir, "omnilong-retry", "stage1")
        assert again == first
        assert len(client.search_model_versions("name = 'omnilong-retry'")) == 1
        downloaded = Path(mlflow.artifacts.download_artifacts("models:/omnilong-retry@stage1",
                                                              dst_path=str(tmp_path / "download")))
        assert json.loads((downloaded / "config.json").read_text()) == {"attempt": 1}
    finally:
        mlflow.set_tracking_uri(None)
