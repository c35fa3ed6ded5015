"""The team's stack (docker-compose.yml's services, started natively: tests/services.py) with the
pipeline run through it as a deployment on a Prefect process worker."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import copy_project, project_env
from tests.services import BUCKET, http_status, basic_auth, native_stack

pytestmark = pytest.mark.slow

WORK_POOL = "omnilong-team"
FAMILY = "qwen2_5_vl"


@pytest.fixture(scope="module")
def team_stack(tmp_path_factory):
    with native_stack(tmp_path_factory.mktemp("team_stack_logs")) as stack:
        print("service start (s):", {service.name: round(service.start_s, 1) for service in stack.services})
        yield stack


def _run(command: list[str], project: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def point_at_stack(project: Path, stack, env: dict[str, str]) -> None:
    """What a team changes in its clone, by configuration only: the tracking server in params.yaml,
    the S3 remote in DVC's config (credentials stay in the environment), committed."""
    params = project / "params.yaml"
    text = params.read_text()
    assert text.count("\n  uri: null") == 1
    params.write_text(text.replace("\n  uri: null", f"\n  uri: {stack.mlflow_uri}"))
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc"], project, env)
    _run([*dvc, "remote", "modify", "storage", "endpointurl", stack.s3_endpoint], project, env)
    _run(["git", "commit", "-q", "-am", "track to the team's servers"], project, env)


DEPLOY = """
import sys
from flows.pipeline import omnilong_pipeline
pool, project = sys.argv[1:]
source = omnilong_pipeline.from_source(source=project, entrypoint="flows/pipeline.py:omnilong_pipeline")
source.deploy(name="full", work_pool_name=pool, parameters={"variant": "full"})
source.deploy(name="ablation-no-stage2", work_pool_name=pool, parameters={"variant": "no-stage2"})
"""


@pytest.fixture(scope="module")
def team_pipeline(team_stack, tmp_path_factory):
    """A clone of the project after `omnilong/full` ran as a deployment on a process worker."""
    project = copy_project(tmp_path_factory.mktemp("team") / "project")
    env = {**project_env(project), **team_stack.client_env(), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    point_at_stack(project, team_stack, env)
    prefect = [sys.executable, "-m", "prefect"]
    _run([*prefect, "work-pool", "create", WORK_POOL, "--type", "process"], project, env)
    _run([sys.executable, "-c", DEPLOY, WORK_POOL, str(project)], project, env)
    started = time.monotonic()
    worker = team_stack.spawn("worker", [*prefect, "worker", "start", "--pool", WORK_POOL, "--type", "process"],
                              env=env, cwd=project)
    run = subprocess.run([*prefect, "deployment", "run", "omnilong/full", "--watch", "--watch-timeout", "1500"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=1600)
    print(f"deployment run: {time.monotonic() - started:.0f} s")
    assert run.returncode == 0 and "Completed" in run.stdout, (
        f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\nworker:\n{worker.log.read_text(errors='replace')[-6000:]}")
    return project, env


def test_unauthenticated_requests_are_refused(team_stack):
    search = f"{team_stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search, timeout_s=30) == 401
    assert http_status(search, basic_auth(*team_stack.mlflow_admin), timeout_s=30) == 200
    assert http_status(search, basic_auth(team_stack.mlflow_admin[0], "wrong"), timeout_s=30) == 401

    flows = f"{team_stack.prefect_api}/flows/filter"
    user, _, password = team_stack.prefect_auth_string.partition(":")
    assert http_status(flows, timeout_s=30, json_body=b"{}") == 401
    assert http_status(flows, basic_auth(user, password), timeout_s=30, json_body=b"{}") == 200
    assert http_status(flows, basic_auth(user, "wrong"), timeout_s=30, json_body=b"{}") == 401


def test_deployment_run_registers_models_and_stores_artifacts_in_the_bucket(team_stack, team_pipeline):
    from mlflow import MlflowClient

    project, env = team_pipeline
    client = MlflowClient(tracking_uri=team_stack.mlflow_uri)  # credentials: MLFLOW_TRACKING_* below
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", team_stack.mlflow_admin[0])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", team_stack.mlflow_admin[1])
        for stage in ("stage1", "stage2", "stage3"):
            record = json.loads((project / f"runs/{stage}/registration.json").read_text())
            version = client.get_model_version_by_alias(f"omnilong-{FAMILY}", stage)
            assert str(version.version) == str(record["version"])
            assert version.source.startswith(("models:/", "mlflow-artifacts:/", "s3://"))
        parent = client.search_runs(
            [client.get_experiment_by_name("omnilong").experiment_id], "tags.`omnilong.variant` = 'full'")
        assert [run.info.status for run in parent] == ["FINISHED"]
    # The registry lives in PostgreSQL, the artifacts in the bucket; no local store was made.
    assert not (project / "mlflow" / "mlflow.db").exists()
    keys = [item["Key"] for page in team_stack.s3().get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="mlflow/") for item in page.get("Contents", [])]
    assert any(key.endswith("model.safetensors") for key in keys), keys[:20]
    assert any(key.endswith("loss_curve.png") for key in keys), keys[:20]


def test_dvc_push_and_pull_round_trip_through_the_bucket(team_stack, team_pipeline, tmp_path):
    project, env = team_pipeline
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "push"], project, env)
    _run(["git", "commit", "-q", "-m", "pipeline run"], project, env)
    assert team_stack.s3().list_objects_v2(Bucket=BUCKET, Prefix="dvc/")["KeyCount"] > 0
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    # The outputs of the stages `omnilong/full` ran; the ablation's were never made.
    _run([*dvc, "pull", "--with-deps", "evaluate"], clone, env)
    for path in ["data/packed/stage1/index.json", "runs/stage3/model/model.safetensors",
                 "runs/eval-full/metrics.json"]:
        assert hashlib.sha256((clone / path).read_bytes()).digest() == \
            hashlib.sha256((project / path).read_bytes()).digest(), path
    assert json.loads(_run([*dvc, "status", "--json", "--with-deps", "evaluate"], clone, env)) == {}
