"""What a SageMaker training job runs, in each rank the SDK's torchrun driver starts:
`dvc pull` of the stage's inputs (once per instance), then `omnilong train` with the stage's
arguments. The ranks are already under torchrun, so `omnilong train` runs the stage directly.

Run as a script from the staged project (/opt/ml/input/data/code), with the job's
hyperparameters as options: --pull and --train (JSON lists), --remote (a DVC remote).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
# Written by an instance's first rank once its inputs are pulled; the instance's other ranks wait for it.
PULLED = PROJECT / ".omnilong-inputs-pulled"
# How long the other ranks wait for the pull before giving up (the job's max runtime stops it anyway).
PULL_WAIT_S = 6 * 3600
# Names the Secrets Manager secret with MLflow's credentials (sagemaker.mlflow_credentials_secret).
MLFLOW_SECRET_ENV = "OMNILONG_MLFLOW_SECRET"


def pull_command(pull: list[str], remote: str | None) -> list[str]:
    return [sys.executable, "-m", "dvc", "pull", *(["--remote", remote] if remote else []), *pull]


def train_command(train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "omnilong.cli", "train", *train_args]


def pull_inputs(pull: list[str], remote: str | None) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        if pull:
            subprocess.run(pull_command(pull, remote), cwd=PROJECT, check=True)
        PULLED.touch()
        return
    deadline = time.monotonic() + PULL_WAIT_S
    while not PULLED.exists():  # the first rank failing ends the job: torchrun stops every rank
        if time.monotonic() > deadline:
            raise TimeoutError(f"the stage's inputs were not pulled within {PULL_WAIT_S} s")
        time.sleep(2)


def mlflow_credentials(secret_id: str) -> dict[str, str]:
    """MLflow's basic-auth environment from a Secrets Manager secret the job's role reads."""
    import boto3

    secret = json.loads(boto3.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"])
    return {"MLFLOW_TRACKING_USERNAME": secret["username"], "MLFLOW_TRACKING_PASSWORD": secret["password"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's hyperparameters, as the SDK's driver passes them: `--name value`, lists as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pull", type=json.loads, required=True)
    parser.add_argument("--train", type=json.loads, required=True)
    parser.add_argument("--remote", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pull_inputs(args.pull, args.remote)
    env = dict(os.environ)
    if os.environ.get(MLFLOW_SECRET_ENV):
        env.update(mlflow_credentials(os.environ[MLFLOW_SECRET_ENV]))
    return subprocess.run(train_command(args.train), cwd=PROJECT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
