"""The flow's SageMaker path (`launcher=sagemaker`: push the inputs, launch and follow the job,
`dvc commit`, push the output) on a copy of the session's pipeline project, against moto.

moto stores a training job and marks it Completed at once; no job runs, so nothing writes the
model.tar.gz SageMaker would upload. The test stands in for the job: a loopback proxy in front
of moto's SageMaker API, at the first DescribeTrainingJob of a job, uploads to the job's
S3ModelArtifacts the stage's output as the shared pipeline run trained it (runs/stage1 packed as
the job's /opt/ml/model would be). What this shows: the flow's tasks, their order, the DVC
remote and the job request round-trip into the same dvc.lock. What it cannot: that the job's
container pulls those inputs and trains (tests/test_sagemaker_launch.py runs the entry script
locally), or that SageMaker itself accepts the request.
"""

from __future__ import annotations

import http.client
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
import yaml

from tests.conftest import project_env
from tests.services import BUCKET, HOST

pytestmark = pytest.mark.slow

STAGE = "train@stage1"
OUTPUT = f"s3://{BUCKET}/sagemaker"
JOB_REMOTE = "jobs"  # the remote the flow pushes to and the job pulls from: only this test's


def _model_archive(out_dir: Path) -> bytes:
    """What SageMaker uploads from /opt/ml/model: the stage's --out folder's contents."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for path in sorted(out_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return archive.getvalue()


class _JobStandIn(ThreadingHTTPServer):
    """Forwards SageMaker's API to moto; before moto first describes a job, writes its model."""

    def __init__(self, moto_endpoint: str, s3, model_archive: bytes):
        self.moto = urlsplit(moto_endpoint).netloc
        self.s3, self.model_archive, self.ran = s3, model_archive, []
        super().__init__((HOST, 0), _Forward)


class _Forward(BaseHTTPRequestHandler):
    server: _JobStandIn

    def do_POST(self):  # noqa: N802 (http.server's name): SageMaker's JSON API is POST only
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("X-Amz-Target") == "SageMaker.DescribeTrainingJob":
            name = json.loads(body)["TrainingJobName"]
            if name not in self.server.ran:
                self.server.ran.append(name)
                key = f"{OUTPUT.removeprefix(f's3://{BUCKET}/')}/{name}/output/model.tar.gz"
                self.server.s3.put_object(Bucket=BUCKET, Key=key, Body=self.server.model_archive)
        connection = http.client.HTTPConnection(self.server.moto, timeout=60)
        connection.request("POST", self.path, body, dict(self.headers))
        answer = connection.getresponse()
        payload = answer.read()
        self.send_response(answer.status)
        for header, value in answer.getheaders():
            if header.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(header, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True, timeout=300)


def test_flow_trains_a_stage_as_a_sagemaker_job_through_the_dvc_remote(tiny_pipeline, team_stack, tmp_path,
                                                                       monkeypatch):
    from mlflow import MlflowClient
    from prefect import flow
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flows.pipeline import sagemaker_stage, up_to_date
    from omnilong.config import load_params

    # A copy of the pipeline's project (its git repo, DVC cache and outputs; not the checkpoints),
    # whose stage 1 output is gone: DVC finds train@stage1 not up to date, its inputs are.
    project = tmp_path / "project"
    shutil.copytree(tiny_pipeline, project, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    monkeypatch.chdir(project)  # as the flow does: DVC resolves a stage's paths against the cwd
    trained = tmp_path / "trained-stage1"
    shutil.move(project / "runs" / "stage1", trained)
    lock = (project / "dvc.lock").read_bytes()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sagemaker"] = {
        "role_arn": "arn:aws:iam::123456789012:role/omnilong-train",
        "image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/omnilong-train:0.1",
        "instance_type": "ml.g5.xlarge", "instance_count": params["parallel"].get("nnodes", 1),
        "output_path": OUTPUT, "region": "us-east-1", "dvc_remote": JOB_REMOTE, "poll_s": 1,
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _dvc(project, "remote", "add", JOB_REMOTE, f"s3://{BUCKET}/sagemaker-dvc").returncode == 0
    assert not up_to_date(STAGE, project)

    stand_in = _JobStandIn(team_stack.s3_endpoint, team_stack.s3(), _model_archive(trained))
    threading.Thread(target=stand_in.serve_forever, daemon=True).start()
    # The flow's processes (dvc, `omnilong launch sagemaker`) read AWS's and MLflow's settings here.
    for name, value in {**team_stack.client_env(), "AWS_ENDPOINT_URL": team_stack.s3_endpoint,
                        "AWS_ENDPOINT_URL_SAGEMAKER": f"http://{HOST}:{stand_in.server_port}",
                        # moto lacks iam:SimulatePrincipalPolicy, with which the SDK checks the role
                        "SAGEMAKER_VALIDATE_ROLE": "false", "MLFLOW_TRACKING_URI": team_stack.mlflow_uri}.items():
        monkeypatch.setenv(name, value)

    @flow(name="omnilong-sagemaker-stage")
    def one_stage(parent_run_id: str) -> None:
        sagemaker_stage(STAGE, load_params(project / "params.yaml"), project, parent_run_id)

    mlflow = MlflowClient(team_stack.mlflow_uri)
    experiment = mlflow.get_experiment_by_name(params["tracking"]["experiment"])
    parent = mlflow.create_run(experiment.experiment_id, run_name="sagemaker-flow-test")
    try:
        with temporary_settings(updates={PREFECT_API_URL: team_stack.prefect_api,
                                         PREFECT_API_AUTH_STRING: team_stack.prefect_auth_string}):
            one_stage(parent.info.run_id)
    finally:
        stand_in.shutdown()
        stand_in.server_close()
        mlflow.delete_run(parent.info.run_id)

    # One job ran (stand-in), the one the flow launched for stage 1, pulling the stage's inputs.
    [job_name] = stand_in.ran
    sagemaker = boto3.client("sagemaker", endpoint_url=team_stack.s3_endpoint, region_name="us-east-1")
    described = sagemaker.describe_training_job(TrainingJobName=job_name)
    assert job_name.startswith("omnilong-stage1-")
    assert json.loads(described["HyperParameters"]["pull"]) == ["models/tiny", "data/packed/stage1"]
    assert described["HyperParameters"]["remote"] == JOB_REMOTE
    # Its model came back where the stage puts it, DVC committed it to the same lock entry as the
    # torchrun run's, and the inputs and the output are in the job's remote.
    assert sorted(p.relative_to(project / "runs" / "stage1") for p in (project / "runs" / "stage1").rglob("*")) == \
        sorted(p.relative_to(trained) for p in trained.rglob("*"))
    assert (project / "dvc.lock").read_bytes() == lock
    assert up_to_date(STAGE, project), _dvc(project, "status", STAGE).stdout
    in_remote = _dvc(project, "status", "--cloud", "--remote", JOB_REMOTE, "--json",
                     "runs/stage1", "data/packed/stage1", "models/tiny")
    assert in_remote.returncode == 0 and json.loads(in_remote.stdout) == {}, in_remote.stdout + in_remote.stderr
