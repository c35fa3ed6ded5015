"""The `omnilong` flow: every stage of dvc.yaml, in dependency order, each a Prefect task.

dvc.yaml is the one DAG definition. Each task runs `dvc repro <stage>`, so a flow run and a
plain `dvc repro` share caching, the lock file and lineage, and a stage whose inputs did not
change is skipped by DVC rather than re-run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import networkx as nx
from dvc.repo import Repo
from prefect import flow, get_run_logger, task


def stages_in_order(repo_root: Path) -> list[str]:
    """dvc.yaml's stages, dependencies first (DVC's graph has edges stage -> dependency)."""
    with Repo(str(repo_root)) as repo:
        graph = repo.index.graph
        return [stage.addressing for stage in reversed(list(nx.topological_sort(graph)))]


@task(retries=1, retry_delay_seconds=5, task_run_name="dvc repro {stage}")
def repro_stage(stage: str, repo_root: Path) -> None:
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", stage]
    with subprocess.Popen(
        command, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            logger.info(line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[1:])}` exited with {proc.returncode}")


@flow(name="omnilong", log_prints=True)
def omnilong_pipeline(repo_root: Path = Path(".")) -> None:
    repo_root = repo_root.resolve()
    started = time.monotonic()
    for stage in stages_in_order(repo_root):
        repro_stage(stage, repo_root)
    print(f"pipeline finished in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    omnilong_pipeline()
