"""Orchestrated recovery: the flow's stage task retries a crashed training stage, which resumes from
its last checkpoint and continues its one MLflow run; each step is logged once; nothing registered
is overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from omnilong.train.faults import CRASH_ENV
from tests.conftest import REPO, project_env
from tests.test_train_stage import _client, stage1_setup  # noqa: F401  (the fixture, reused)

# A flow holding the pipeline's stage task alone, its command a 2-rank stage 1 under torchrun.
ONE_STAGE_FLOW = """
import sys
from pathlib import Path

from prefect import flow

from flows.pipeline import stage_task
from omnilong.config import load_params
from omnilong.tracking.runs import create_run


@flow
def one_stage(params_file: str) -> None:
    parent = create_run(load_params(Path(params_file), check_paths=False), "recovery", {})
    command = [sys.executable, "-m", "omnilong.cli", "train", "--stage", "stage1", "--params", params_file,
               "--out", "runs/recovery", "--checkpoints", "checkpoints/recovery"]
    stage_task.with_options(retry_delay_seconds=0)("train stage1", command, Path("."), parent)


one_stage(sys.argv[1])
"""


@pytest.mark.slow
def test_a_crashed_stage_is_retried_by_its_task_and_continues_its_run(stage1_setup):  # noqa: F811
    """Rank 1 exits after step 2 of 2, before its checkpoint (step 1's committed): the task marks the
    run FAILED, Prefect retries, the stage resumes at step 2 in the same run, and the run holds each
    step once: step 1 flushed at its checkpoint, step 2 of the crashed attempt never."""
    raw, root = stage1_setup
    raw = json.loads(json.dumps(raw))
    raw["stages"]["stage1"]["train"].update(max_steps=2, checkpoint_every=1)
    params_file = root / "recovery.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    env = {**project_env(root), CRASH_ENV: "1:1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # flows/
    result = subprocess.run(
        [sys.executable, "-c", ONE_STAGE_FLOW, params_file.name],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert f"[rank 1] {CRASH_ENV}: crashing after step 1" in output
    assert output.count("step 1/2") == 1 and "step 2/2" in output  # the retry did not redo step 1

    run_id = json.loads((root / "runs/recovery/registration.json").read_text())["run_id"]
    # The failed attempt's task marked the run FAILED, with its attempt, before the retry reopened it.
    assert f"MLflow run {run_id} marked FAILED (try 1)" in output
    assert (f"resuming at step 1; MLflow run {run_id} reopened: attempt 2; it was FAILED after attempt 1 "
            "(attempt 1: `omnilong.cli train --stage stage1") in output
    client = _client(root)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["omnilong.attempts"] == "2"
    assert run.data.tags["omnilong.failure"].startswith("attempt 1: `omnilong.cli train --stage stage1")
    siblings = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run.data.tags['mlflow.parentRunId']}'")
    assert [other.info.run_id for other in siblings] == [run_id]  # one run for the stage
    for metric in ("train/loss", "train/lr", "memory/peak_mb_rank1"):
        assert sorted(m.step for m in client.get_metric_history(run_id, metric)) == [0, 1], metric


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
