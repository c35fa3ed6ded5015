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

from omnilong.config import STAGE_NAMES, Params, load_params
from omnilong.data.shards import read_index


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


def packed_summary(params: Params, repo_root: Path) -> str:
    lines = []
    for stage in STAGE_NAMES:
        stage_dir = repo_root / params.data.packed_dir / stage
        stats = read_index(stage_dir).stats
        total = stats.real_tokens + stats.padding_tokens
        lines.append(
            f"  {stage_dir.relative_to(repo_root)}: {stats.documents} documents, {stats.real_tokens:,} tokens "
            f"({stats.trainable_tokens:,} trained on), padding {stats.padding_tokens / total:.1%}"
        )
    return "\n".join(lines)


@flow(name="omnilong", log_prints=True)
def omnilong_pipeline(repo_root: Path = Path(".")) -> None:
    repo_root = repo_root.resolve()
    params = load_params(repo_root / "params.yaml")  # dvc.yaml's stages read this file
    started = time.monotonic()
    for stage in stages_in_order(repo_root):
        repro_stage(stage, repo_root)
    print(f"pipeline finished in {time.monotonic() - started:.0f} s; packed data:\n{packed_summary(params, repo_root)}")


if __name__ == "__main__":
    omnilong_pipeline()
