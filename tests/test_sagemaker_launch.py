"""`omnilong launch sagemaker` against moto's server mode on loopback (an emulator: no real job runs).

The real CLI creates the job through the SageMaker SDK's ModelTrainer; the test reads the stored
request back with DescribeTrainingJob and the files the SDK staged in S3. Two things moto does
not do, and how the test copes: it keeps no `Environment` of a job, so that field is read from
moto's own recording of the CreateTrainingJob request; and it marks every job Completed at once,
so following the status (`--wait`) is trivial here: one DescribeTrainingJob call. moto lacks
iam:SimulatePrincipalPolicy too, with which the SDK checks the role's permissions client-side:
SAGEMAKER_VALIDATE_ROLE=false skips that check in these tests only.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import pytest
import yaml
from sagemaker.train.container_drivers.common.utils import hyperparameters_to_cli_args
from typer.testing import CliRunner

from omnilong.cli import app
from omnilong.config import load_params
from omnilong.sagemaker import entry
from omnilong.sagemaker.job import fetch_model, wait_for_job
from tests.conftest import REPO, project_env
from tests.services import Stack

BUCKET = "omnilong-jobs"
ROLE = "arn:aws:iam::123456789012:role/omnilong-train"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/omnilong-train:0.1"
MLFLOW = "https://mlflow.team.internal:5000"
SAGEMAKER = {
    "role_arn": ROLE, "image_uri": IMAGE, "instance_type": "ml.p4d.24xlarge", "instance_count": 2,
    "output_path": f"s3://{BUCKET}/omnilong", "region": "us-east-1", "volume_size_gb": 300,
    "max_runtime_s": 7200, "dvc_remote": "team", "mlflow_credentials_secret": "omnilong/mlflow",
}


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """moto's server on a free loopback port, recording requests; stopped by its process group."""
    root = tmp_path_factory.mktemp("moto")
    recording = root / "recording.jsonl"
    stack = Stack(root)
    try:
        stack.start_s3({"MOTO_ENABLE_RECORDING": "1", "MOTO_RECORDER_FILEPATH": str(recording)})
        yield stack.s3_endpoint, recording
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def aws_env(moto):
    url, _ = moto
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", SAGEMAKER_VALIDATE_ROLE="false")
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git checkout of the project's files (what `git ls-files` lists), without run state."""
    root = tmp_path_factory.mktemp("project")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def write_params(project: Path, **changes) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["parallel"]["nnodes"] = 2
    params["tracking"]["uri"] = MLFLOW
    params.update(changes)
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def omnilong(project: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnilong.cli", *args], cwd=project, capture_output=True,
                          text=True, env={**project_env(project), **env, "PYTHONPATH": str(project)}, timeout=300)


def staged(s3, uri: str) -> dict[str, bytes]:
    """The files a channel's S3 URI names (a prefix, or one object), by their path below it."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    return {key.removeprefix(prefix).lstrip("/") or key.rpartition("/")[2]:
            s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def recorded_request(recording: Path, target: str) -> dict:
    """The body of the last request moto recorded for the JSON API action `target`."""
    bodies = [entry["body"] for entry in map(json.loads, recording.read_text().splitlines())
              if entry["headers"].get("X-Amz-Target") == target]
    body = bodies[-1]
    return json.loads(base64.b64decode(body) if isinstance(body, str) and not body.startswith("{") else body)


@pytest.mark.slow  # 10-20 s here: the CLI imports the SageMaker SDK and DVC, on shared CPUs
def test_launch_creates_the_stage_job(project, aws_env, moto):
    """The job moto stored is the stage's: image, instances, torchrun, dvc pull + the stage, outputs, MLflow."""
    _, recording = moto
    write_params(project, sagemaker=SAGEMAKER)
    s3 = boto3.client("s3", endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)

    result = omnilong(project, {**aws_env, "OMNILONG_PARENT_RUN_ID": "parent-run-1"},
                      "launch", "sagemaker", "--stage", "2")
    assert result.returncode == 0, result.stderr
    [name] = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("training job ")]

    sagemaker = boto3.client("sagemaker", endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                             aws_access_key_id="testing", aws_secret_access_key="testing")
    job = sagemaker.describe_training_job(TrainingJobName=name)
    assert name.startswith("omnilong-stage2-")
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert job["RoleArn"] == ROLE
    assert job["ResourceConfig"] == {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 2, "VolumeSizeInGB": 300}
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200}
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/omnilong"
    assert job["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/omnilong/checkpoints/stage2",
                                       "LocalPath": "/opt/ml/checkpoints"}
    # The job's entry point: the stage's DVC-tracked inputs pulled, then its dvc.yaml command.
    hyper = {key: json.loads(value) if value.startswith("[") else value
             for key, value in job["HyperParameters"].items()}
    assert hyper == {
        "pull": ["runs/stage1/model", "data/packed/stage2"],
        "train": ["--stage", "stage2", "--init", "runs/stage1/model", "--out", "/opt/ml/model",
                  "--checkpoints", "/opt/ml/checkpoints"],
        "remote": "team",
    }
    # What the entry script gets from the SDK's driver in the container.
    args = entry.parse_args(hyperparameters_to_cli_args(job["HyperParameters"]))
    assert (args.pull, args.train, args.remote) == (hyper["pull"], hyper["train"], "team")
    assert entry.pull_command(args.pull, args.remote)[-5:] == [
        "pull", "--remote", "team", "runs/stage1/model", "data/packed/stage2"]
    # The torchrun distribution: the container runs the SDK's sm_train.sh, which starts its
    # torchrun driver around the entry script, with the process count from parallel.nproc_per_node.
    assert job["AlgorithmSpecification"]["ContainerEntrypoint"] == ["/bin/bash"]
    assert "sm_train.sh" in " ".join(job["AlgorithmSpecification"]["ContainerArguments"])
    channels = {channel["ChannelName"]: channel["DataSource"]["S3DataSource"]["S3Uri"]
                for channel in job["InputDataConfig"]}
    assert set(channels) == {"code", "sm_drivers"}
    drivers = staged(s3, channels["sm_drivers"])
    assert json.loads(drivers["distributed.json"])["process_count_per_node"] == 2
    assert json.loads(drivers["sourcecode.json"])["entry_script"] == "omnilong/sagemaker/entry.py"
    assert "distributed_drivers/torchrun_driver.py" in drivers["sm_train.sh"].decode()
    assert "tar -xzf project.tar.gz" in drivers["sm_train.sh"].decode()
    [(archive_name, archive)] = staged(s3, channels["code"]).items()
    assert archive_name == "project.tar.gz"  # sm_train.sh unpacks it in the code channel's folder
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        code = {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}
    assert code["params.yaml"] == (project / "params.yaml").read_bytes()
    assert "omnilong/sagemaker/entry.py" in code and "dvc.yaml" in code
    assert code[".dvc/config.local"] == b"[core]\n    no_scm = true\n"  # the user's own is never staged
    assert not [path for path in code if path.startswith((".git/", "runs/", "checkpoints/"))]
    # moto keeps no Environment: its recording of the request shows what was sent.
    request = recorded_request(recording, "SageMaker.CreateTrainingJob")
    assert request["TrainingJobName"] == name
    assert request["Environment"] == {"MLFLOW_TRACKING_URI": MLFLOW, "OMNILONG_PARENT_RUN_ID": "parent-run-1",
                                      "OMNILONG_MLFLOW_SECRET": "omnilong/mlflow"}
    assert job["TrainingJobStatus"] == "Completed"  # moto's, at once


@pytest.mark.slow  # as above
def test_wait_follows_the_job_and_fetches_its_model(project, aws_env, monkeypatch):
    """--wait on moto: the job is Completed at the first look, so the model is fetched at once; with no
    model.tar.gz where SageMaker would put it, the command says so and fails."""
    write_params(project, sagemaker=SAGEMAKER)
    result = omnilong(project, aws_env, "launch", "sagemaker", "--stage", "3", "--variant", "no-stage2", "--wait")
    assert result.returncode == 1
    [name] = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("training job ")]
    assert f"{name}: Completed" in result.stdout
    assert f"s3://{BUCKET}/omnilong/{name}/output/model.tar.gz: the job's model could not be read" in result.stderr

    for name_, value in aws_env.items():
        monkeypatch.setenv(name_, value)
    settings = load_params(project / "params.yaml").sagemaker
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        data = b'{"alias": "stage3"}'
        member = tarfile.TarInfo("registration.json")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"omnilong/{name}/output/model.tar.gz", Body=archive.getvalue())
    job = wait_for_job(settings, name, log=lambda line: None)
    out = project / "runs" / "stage3-no-stage2"
    fetch_model(settings, job, out)
    assert json.loads((out / "registration.json").read_text()) == {"alias": "stage3"}


def test_launch_refuses_bad_settings(project, monkeypatch):
    """Each bad setting fails before anything reaches AWS, naming the field; no password is printed."""
    monkeypatch.chdir(project)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: no request may be needed
    without_role = {key: value for key, value in SAGEMAKER.items() if key != "role_arn"}
    cases = [
        ({"sagemaker": without_role}, 2, "sagemaker.role_arn: required key is missing"),
        ({"sagemaker": {**SAGEMAKER, "image_uri": "omnilong-train"}}, 2, "sagemaker.image_uri: expected an image URI"),
        ({"sagemaker": {**SAGEMAKER, "instance_count": 3}}, 2,
         "sagemaker.instance_count: expected parallel.nnodes (2)"),
        ({}, 2, "sagemaker: expected a sagemaker block"),
        ({"sagemaker": SAGEMAKER, "tracking": {"uri": "https://bot:hunter2@mlflow.team.internal"}}, 1,
         "tracking.uri: expected a URI without credentials"),
    ]
    for changes, code, message in cases:
        write_params(project, **changes)
        result = CliRunner().invoke(app, ["launch", "sagemaker", "--stage", "1"])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert (result.exit_code, message) == (code, message) and message in " ".join(result.output.split()), \
            result.output
        assert "hunter2" not in result.output


@pytest.mark.slow  # DVC and the CLI in several processes
def test_entry_pulls_the_inputs_once_then_runs_the_stage_command(project, aws_env, tmp_path):
    """In a copy of the code as the job gets it (no .git, no data), the entry's first rank pulls the
    inputs from an S3 DVC remote (moto's) and every rank then runs `omnilong train` with the job's
    arguments: here a stage that does not exist, so each rank ends with the CLI's exit 2."""
    from omnilong.sagemaker.job import stage_project

    env = {**project_env(project), **aws_env}
    s3 = boto3.client("s3", endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="omnilong-dvc")
    corpus = project / "data" / "raw" / "user" / "probe"
    corpus.mkdir(parents=True)
    (corpus / "text.jsonl").write_text('{"text": "a document"}\n')
    dvc = [sys.executable, "-m", "dvc"]
    for command in (["remote", "add", "team", "s3://omnilong-dvc/cache"],
                    ["remote", "modify", "team", "endpointurl", aws_env["AWS_ENDPOINT_URL"]],
                    ["add", "data/raw/user/probe"], ["push", "--remote", "team", "data/raw/user/probe"]):
        done = subprocess.run([*dvc, *command], cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    code = tmp_path / "code"
    stage_project(project, project / "params.yaml", code)
    assert not (code / "data" / "raw" / "user" / "probe").exists()

    args = ["--pull", '["data/raw/user/probe"]', "--remote", "team", "--train", '["--stage", "9"]']
    ranks = [subprocess.Popen([sys.executable, "omnilong/sagemaker/entry.py", *args], cwd=code,
                              env={**env, "LOCAL_RANK": str(rank), "PYTHONPATH": ""},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (1, 0)]  # the waiting rank first
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert (code / "data" / "raw" / "user" / "probe" / "text.jsonl").read_text() == '{"text": "a document"}\n'
    assert (code / ".omnilong-inputs-pulled").exists()
    for rank, (_, stderr) in zip(ranks, outputs):
        assert rank.returncode == 2, stderr
        assert "--stage: expected one of 1, 2, 3" in stderr
    pulled = ["1 file added" in stdout + stderr for stdout, stderr in outputs]
    assert pulled == [False, True], outputs  # rank 1 waited for rank 0's pull
