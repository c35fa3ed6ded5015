"""The `omnilong` flow: the stages of dvc.yaml a pipeline variant needs, in order, each a Prefect task.

dvc.yaml is the one DAG definition. A variant names only its final DVC stage; the tasks are that
stage and everything upstream of it, in dependency order, each running `dvc repro <stage>`. So
a flow run and a plain `dvc repro` share caching, the lock file and lineage, and a stage whose
inputs did not change is skipped by DVC rather than re-run. A retried training task resumes
from its stage's last DeepSpeed checkpoint (kept outside DVC's outputs) and continues the
stage's MLflow run, which the failed attempt's task marked FAILED (omnilong/tracking/attempts.py).

With `launcher="sagemaker"` each training stage DVC does not find up to date runs as a SageMaker
training job instead (`omnilong launch sagemaker`): its inputs are pushed to the DVC remote, the
job is followed to its end, its model is unpacked into the stage's runs/ folder, committed to
dvc.lock and pushed, so the next stage's job can pull it and a later `dvc repro` skips the stage.

One MLflow parent run per flow run: the training stages and the evaluation nest their runs
under it, and after each training task the parent records the registered model version the
stage produced (or, when DVC skipped the stage, the version registered when it last ran).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import networkx as nx
from dvc.repo import Repo
from prefect import flow, get_run_logger, task
from prefect.context import get_run_context

from omnilong.config import STAGE_NAMES, Params, load_params, parse_params
from omnilong.tracking import attempts
from omnilong.tracking.registry import REGISTRATION_FILE
from omnilong.tracking.runs import PARENT_RUN_ENV, create_run
from omnilong.tracking.secrets import redact_uri
from omnilong.tracking.store import tracking_uri

# The final DVC stage of each pipeline variant; the rest follows from dvc.yaml.
VARIANT_TARGETS = {"full": "evaluate", "no-stage2": "ablation-report"}
TRAIN_STAGE_PREFIX = "train@"


def stages_for(repo_root: Path, target: str) -> list[str]:
    """`target` and every stage upstream of it, dependencies first (DVC's edges: stage -> dependency)."""
    with Repo(str(repo_root)) as repo:
        graph = repo.index.graph
        [node] = [stage for stage in graph if stage.addressing == target]
        needed = graph.subgraph({node} | nx.descendants(graph, node))
        return [stage.addressing for stage in reversed(list(nx.topological_sort(needed)))]


def _stream(command: list[str], repo_root: Path, env: dict[str, str]) -> None:
    logger = get_run_logger()
    with subprocess.Popen(
        command, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            logger.info(line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[2:])}` exited with {proc.returncode}")


@task(retries=2, retry_delay_seconds=5, task_run_name="{name}")
def stage_task(name: str, command: list[str], repo_root: Path, parent_run_id: str) -> None:
    """Run one stage's command, retried. Every attempt is handed this task run's id, with which a
    training stage tags its MLflow run (and a retry finds it); when an attempt fails, its run is
    marked FAILED before Prefect retries."""
    task_run = get_run_context().task_run
    env = {**os.environ, PARENT_RUN_ENV: parent_run_id, attempts.TASK_RUN_ENV: str(task_run.id)}
    try:
        _stream(command, repo_root, env)
    except Exception as error:
        failed = attempts.mark_failed(parent_run_id, str(task_run.id), str(error))
        if failed:
            get_run_logger().warning(f"MLflow run {failed} marked FAILED (try {task_run.run_count})")
        raise


def repro_stage(stage: str, repo_root: Path, parent_run_id: str) -> None:
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    stage_task(f"dvc repro {stage}", command, repo_root, parent_run_id)


def up_to_date(stage: str, repo_root: Path) -> bool:
    with Repo(str(repo_root)) as repo:
        return not repo.status(targets=[stage])


def sagemaker_stage(stage: str, params: Params, repo_root: Path, parent_run_id: str) -> None:
    """A training stage as a SageMaker job, its inputs and output going through the DVC remote."""
    from omnilong.sagemaker.job import stage_job

    key = stage.removeprefix(TRAIN_STAGE_PREFIX)
    train_stage, _, variant = key.partition("-")
    push = [sys.executable, "-m", "dvc", "push", *(["--remote", params.sagemaker.dvc_remote]
                                                   if params.sagemaker.dvc_remote else [])]
    inputs = stage_job(repo_root, stage).pull
    if inputs:  # `dvc push` without targets pushes everything
        stage_task(f"dvc push {stage} inputs", [*push, *inputs], repo_root, parent_run_id)
    launch = [sys.executable, "-m", "omnilong.cli", "launch", "sagemaker", "--stage", train_stage, "--wait",
              *(["--variant", variant] if variant else [])]
    stage_task(f"sagemaker {stage}", launch, repo_root, parent_run_id)
    stage_task(f"dvc commit {stage}", [sys.executable, "-m", "dvc", "commit", "--force", stage],
               repo_root, parent_run_id)
    stage_task(f"dvc push {stage}", [*push, stage], repo_root, parent_run_id)


def link_registered_model(stage: str, repo_root: Path, parent_run_id: str) -> dict:
    """Record on the parent run the model version a training stage registered (run now or earlier)."""
    from mlflow import MlflowClient

    record = json.loads((repo_root / "runs" / stage.removeprefix(TRAIN_STAGE_PREFIX) / REGISTRATION_FILE).read_text())
    MlflowClient().set_tag(parent_run_id, f"omnilong.model.{record['alias']}", f"{record['name']}/{record['version']}")
    return record


def packed_summary(params: Params, repo_root: Path) -> str:
    from omnilong.data.packed_summary import describe_packed_stage  # imports transformers: not at the flow's import

    lines = []
    for stage in STAGE_NAMES:
        stage_dir = repo_root / params.data.packed_dir / stage
        lines += describe_packed_stage(stage_dir, params.stages[stage], stage_dir.relative_to(repo_root))
    return "\n".join(lines)


@task(task_run_name="dvc exp run {name}")
def run_experiment(name: str, target: str, overrides: dict[str, object], repo_root: Path, parent_run_id: str) -> None:
    """The pipeline with parameter overrides, as a DVC experiment in a temporary copy of the
    project: the overrides are recorded with the experiment and params.yaml is left untouched."""
    sets = [arg for key, value in overrides.items() for arg in ("--set-param", f"{key}={json.dumps(value)}")]
    command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", name, *sets, target]
    _stream(command, repo_root, {**os.environ, PARENT_RUN_ENV: parent_run_id})


@flow(name="omnilong", log_prints=True)
def omnilong_pipeline(
    variant: str = "full", overrides: dict[str, object] | None = None, repo_root: Path = Path("."),
    launcher: Literal["torchrun", "sagemaker"] = "torchrun",
) -> None:
    """The OmniLong recipe on params.yaml: `full` (stages 1-3) or `no-stage2` (the ablation).

    `overrides` ({"stages.stage1.train.max_steps": 2, ...}) runs it as a DVC experiment instead.
    `launcher`: where the training stages run, torchrun on this machine or SageMaker jobs
    (params.yaml's `sagemaker` block).
    """
    from mlflow import MlflowClient

    if variant not in VARIANT_TARGETS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANT_TARGETS)}, given {variant!r}")
    if launcher == "sagemaker" and overrides:
        raise ValueError("overrides: a DVC experiment runs its stages locally; expected none with launcher=sagemaker")
    repo_root = repo_root.resolve()
    os.chdir(repo_root)  # MLflow's local store and DVC's paths are relative to the project
    params = load_params(repo_root / "params.yaml")  # dvc.yaml's stages read this file
    if launcher == "sagemaker" and params.sagemaker is None:
        raise ValueError("launcher: sagemaker needs the sagemaker block of params.yaml (see README)")
    started = time.monotonic()
    parent_run_id = create_run(params, f"pipeline-{variant}", {"omnilong.variant": variant})

    if overrides:
        # Fail on a bad override here, before DVC copies the project.
        patched = params.model_dump(mode="json")
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = patched
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        parse_params(patched, source="overrides")
        # The experiment runs in a copy of the project: it must track into this project's store
        # (a tracking.uri of the user's own already points there, and may hold a secret DVC
        # would record with the experiment).
        if not params.tracking.uri:
            overrides = {"tracking.uri": tracking_uri(params.tracking, repo_root), **overrides}
        name = f"{variant}-{get_run_context().flow_run.name}"
        run_experiment(name, VARIANT_TARGETS[variant], overrides, repo_root, parent_run_id)
        MlflowClient().set_terminated(parent_run_id)
        print(f"experiment {name} finished in {time.monotonic() - started:.0f} s; "
              f"`dvc exp show` compares it, `dvc exp apply {name}` brings its outputs here")
        return

    registered = []
    for stage in stages_for(repo_root, VARIANT_TARGETS[variant]):
        if launcher == "sagemaker" and stage.startswith(TRAIN_STAGE_PREFIX) and not up_to_date(stage, repo_root):
            sagemaker_stage(stage, params, repo_root, parent_run_id)
        else:
            repro_stage(stage, repo_root, parent_run_id)
        if stage.startswith(TRAIN_STAGE_PREFIX):
            registered.append(link_registered_model(stage, repo_root, parent_run_id))
    MlflowClient().set_terminated(parent_run_id)

    models = "\n".join(
        f"  models:/{r['name']}@{r['alias']}  (version {r['version']}, lineage {' > '.join(r['lineage'])})"
        for r in registered
    )
    print(
        f"pipeline '{variant}' finished in {time.monotonic() - started:.0f} s\n"
        f"packed data:\n{packed_summary(params, repo_root)}\n"
        f"registered models:\n{models}\n"
        f"evaluation: runs/eval-{variant}/ (heldout.json, metrics.json, comparison.png, each model's NIAH, "
        f"V-NIAH and VideoMME results and plots)\n"
        + ("ablation report: runs/ablation/ablation.md\n" if variant == "no-stage2" else "")
        + f"MLflow parent run {parent_run_id}; " + (
            f"browse it on the tracking server, {redact_uri(params.tracking.uri)}"
            if (params.tracking.uri or "").startswith(("http://", "https://"))
            else f"browse with `make ui` (mlflow ui --backend-store-uri "
                 f"{redact_uri(tracking_uri(params.tracking, repo_root))})")
    )


if __name__ == "__main__":
    omnilong_pipeline(variant=sys.argv[1] if len(sys.argv) > 1 else "full")
