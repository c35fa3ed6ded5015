"""`omnilong launch sagemaker`: a training stage of dvc.yaml as a SageMaker training job.

The job is built with the SageMaker SDK's `ModelTrainer` and its `Torchrun` distribution: the
SDK stages the project's files (those git does not ignore) and its own container drivers to S3,
and in the container its torchrun driver starts `parallel.nproc_per_node` ranks of
omnilong/sagemaker/entry.py on each of the `instance_count` instances. The entry pulls the stage's
inputs from the DVC remote and runs the stage's own dvc.yaml command, its model going to
/opt/ml/model (uploaded to `<output_path>/<job>/output/model.tar.gz`) and its checkpoints to
/opt/ml/checkpoints (kept in S3 per stage, so a job launched again resumes the stage).

AWS endpoints come from boto3's own settings: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_SAGEMAKER,
AWS_ENDPOINT_URL_S3) points the client at an emulator, which is how the tests run it against moto.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omnilong.config import Params, SageMakerParams, StageName
from omnilong.sagemaker.entry import MLFLOW_SECRET_ENV
from omnilong.tracking import attempts
from omnilong.tracking.runs import PARENT_RUN_ENV
from omnilong.tracking.secrets import redact_uri

ENTRY_SCRIPT = "omnilong/sagemaker/entry.py"
MODEL_DIR = "/opt/ml/model"
CHECKPOINT_DIR = "/opt/ml/checkpoints"
# The environment a job gets from the process that launches it: the flow's MLflow parent run and
# Prefect task run, so the stage's run nests under the flow's and a relaunch continues it.
FORWARDED_ENV = (PARENT_RUN_ENV, attempts.TASK_RUN_ENV)
TERMINAL = {"Completed", "Failed", "Stopped"}


class LaunchError(RuntimeError):
    """The job cannot be launched as configured, or it ended other than Completed."""


@dataclass(frozen=True)
class StageJob:
    """What the job runs: `dvc pull <pull>` and then `omnilong train <train_args>`."""

    dvc_stage: str
    pull: list[str]
    train_args: list[str]


def dvc_stage_name(stage: StageName, variant: str | None) -> str:
    return f"train@{stage}-{variant}" if variant else f"train@{stage}"


def stage_job(project: Path, dvc_stage: str) -> StageJob:
    """The stage's inputs that DVC tracks (outputs of other stages, or added data: code deps are
    in the staged files already), and its command with the outputs moved to SageMaker's folders."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(project)) as repo:
            [stage] = repo.stage.collect(dvc_stage)
            # Paths below the project, as dvc.yaml writes them (DVC resolves deps against the cwd).
            tracked = [os.path.relpath(out.fs_path, repo.root_dir) for out in repo.index.outs]
            pull = [dep.def_path for dep in stage.deps if any(
                os.path.normpath(dep.def_path) == out or dep.def_path.startswith(out + "/") for out in tracked)]
            command = shlex.split(stage.cmd)
    except DvcException as exc:
        raise LaunchError(f"dvc.yaml: no stage {dvc_stage!r} to launch ({exc})") from None
    if command[:2] != ["omnilong", "train"]:
        raise LaunchError(f"dvc.yaml: stage {dvc_stage} runs {stage.cmd!r}, expected `omnilong train ...`")
    args = command[2:]
    for option, value in (("--out", MODEL_DIR), ("--checkpoints", CHECKPOINT_DIR)):
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    return StageJob(dvc_stage, pull, args)


def stage_project(root: Path, params_file: Path, into: Path) -> None:
    """Copy the project's files that git does not ignore into the new folder `into`, `params_file`
    as its params.yaml.

    Ignored files stay behind: data and models (the job pulls them with DVC), run state, and
    .dvc/config.local, where a user keeps the remote's credentials. Without .git in the copy, DVC
    is told it has no SCM there.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True, text=True)
    if listed.returncode != 0:
        raise LaunchError(f"{root}: expected a git checkout of the project ({listed.stderr.strip()})")
    for name in filter(None, listed.stdout.split("\0")):
        source = root / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)  # makes `into` too
            shutil.copy2(source, into / name)
    shutil.copy2(params_file, into / "params.yaml")
    (into / ".dvc" / "config.local").write_text("[core]\n    no_scm = true\n")


def job_environment(params: Params) -> dict[str, str]:
    """MLflow's URI (and where its credentials are, never the credentials), and the flow's ids."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if not params.tracking.enabled:
        return env
    uri = params.tracking.uri or ""
    if not uri.startswith(("http://", "https://")):
        raise LaunchError(
            f"tracking.uri: expected the http(s) URI of an MLflow server the job can reach, given {uri or None!r} "
            "(the default local store is on this machine); or set tracking.enabled: false"
        )
    if redact_uri(uri) != uri:
        raise LaunchError(
            f"tracking.uri: expected a URI without credentials for a SageMaker job, given {redact_uri(uri)!r}: "
            "the job's request (and the staged params.yaml) would show them; put them in a Secrets Manager "
            "secret ({\"username\": ..., \"password\": ...}) and name it in sagemaker.mlflow_credentials_secret"
        )
    env["MLFLOW_TRACKING_URI"] = uri
    if params.sagemaker and params.sagemaker.mlflow_credentials_secret:
        env[MLFLOW_SECRET_ENV] = params.sagemaker.mlflow_credentials_secret
    return env


def _boto_session(settings: SageMakerParams):
    import boto3

    return boto3.Session(region_name=settings.region)


def launch_stage(params: Params, params_file: Path, root: Path, stage: StageName, variant: str | None,
                 log: Callable[[str], None] = print) -> str:
    """Start the stage's training job; its name."""
    from botocore.exceptions import BotoCoreError, ClientError
    from sagemaker.core.helper.iam_role_resolver import RoleValidationError
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.training.configs import (
        CheckpointConfig, Compute, OutputDataConfig, SourceCode, StoppingCondition,
    )
    from sagemaker.train import ModelTrainer
    from sagemaker.train.distributed import Torchrun

    settings = params.sagemaker
    assert settings is not None, "the CLI checks that params.sagemaker is set"
    environment = job_environment(params)
    dvc_stage = dvc_stage_name(stage, variant)
    key = dvc_stage.removeprefix("train@")
    bucket, _, prefix = settings.output_path.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="omnilong-sagemaker-") as staged:
        project, archive = Path(staged) / "project", Path(staged) / "project.tar.gz"
        stage_project(root, params_file, project)
        job = stage_job(project, dvc_stage)
        # One object to upload rather than one per file; the SDK's sm_train.sh unpacks it in the container.
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(project.iterdir()):
                tar.add(path, arcname=path.name)
        hyperparameters = {"pull": job.pull, "train": job.train_args}
        if settings.dvc_remote:
            hyperparameters["remote"] = settings.dvc_remote
        try:
            # The code is staged under the output prefix, in a bucket the role can already write to.
            session = Session(boto_session=_boto_session(settings), default_bucket=bucket,
                              default_bucket_prefix=_key(prefix, "code"))
            trainer = ModelTrainer(
                sagemaker_session=session,
                role=settings.role_arn,
                training_image=settings.image_uri,
                base_job_name=f"omnilong-{key}",
                source_code=SourceCode(source_dir=str(archive), entry_script=ENTRY_SCRIPT),
                distributed=Torchrun(process_count_per_node=params.parallel.nproc_per_node),
                compute=Compute(instance_type=settings.instance_type, instance_count=settings.instance_count,
                                volume_size_in_gb=settings.volume_size_gb),
                stopping_condition=StoppingCondition(max_runtime_in_seconds=settings.max_runtime_s),
                output_data_config=OutputDataConfig(s3_output_path=settings.output_path),
                checkpoint_config=CheckpointConfig(
                    s3_uri=f"s3://{bucket}/{_key(prefix, 'checkpoints', key)}", local_path=CHECKPOINT_DIR),
                environment=environment,
                hyperparameters=hyperparameters,
            )
            trainer.train(wait=False, logs=False)
        except (BotoCoreError, ClientError, RoleValidationError) as exc:
            raise LaunchError(f"SageMaker refused the job for {dvc_stage}: {exc}") from None
    name = trainer._latest_training_job.training_job_name  # the SDK's only handle on the job it created
    log(f"training job {name} started: {settings.instance_count} x {settings.instance_type}, "
        f"`dvc pull {' '.join(job.pull)}` then `omnilong train {' '.join(job.train_args)}`")
    return name


def wait_for_job(settings: SageMakerParams, name: str, log: Callable[[str], None] = print) -> dict:
    """Follow the job's status until it ends; its description. Raises LaunchError unless Completed."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _boto_session(settings).client("sagemaker")
    last = None
    while True:
        try:
            job = client.describe_training_job(TrainingJobName=name)
        except (BotoCoreError, ClientError) as exc:
            raise LaunchError(f"training job {name}: its status could not be read ({exc})") from None
        status = (job["TrainingJobStatus"], job.get("SecondaryStatus"))
        if status != last:
            log(f"{name}: {status[0]} ({status[1]})")
            last = status
        if status[0] in TERMINAL:
            break
        time.sleep(settings.poll_s)
    if status[0] != "Completed":
        raise LaunchError(f"training job {name} ended {status[0]}: {job.get('FailureReason', 'no reason given')}")
    return job


def fetch_model(settings: SageMakerParams, job: dict, out: Path) -> None:
    """Unpack the job's model.tar.gz (what the stage wrote to its --out) into `out`."""
    from botocore.exceptions import ClientError

    uri = job["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    with tempfile.TemporaryDirectory() as directory:
        archive = Path(directory) / "model.tar.gz"
        try:
            _boto_session(settings).client("s3").download_file(bucket, key, str(archive))
        except ClientError as exc:
            raise LaunchError(f"{uri}: the job's model could not be read ({exc})") from None
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(out, filter="data")


def _key(*parts: str) -> str:
    """An S3 key of `parts`, the empty ones (an output path with no prefix) left out."""
    return "/".join(part for part in parts if part)
