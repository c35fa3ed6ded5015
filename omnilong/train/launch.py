"""`omnilong train`: run a stage under torchrun, one process per GPU (or `nproc_per_node` CPU ranks).

One node: torchrun standalone, its stores on 127.0.0.1 only (loopback_torchrun.py). Several nodes
(`parallel.nnodes` > 1): the same `omnilong train` runs on every node, and their torchrun agents
meet at a c10d rendezvous (`parallel.rdzv_endpoint`, or torchrun's own PET_RDZV_ENDPOINT), which
numbers the nodes as they join. Already inside torchrun (a launch the user made), it runs the
stage directly. The evaluation commands launch themselves through the same `torchrun` when
sequence-parallel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

from omnilong.config import ParallelParams, Params, StageName

# Where each stage starts from in the full recipe; the ablation points stage 3 at stage 1.
PREVIOUS_STAGE = {"stage2": "stage1", "stage3": "stage2"}
# torchrun reads each of its options from PET_<OPTION> when the command line does not give it.
RDZV_ENDPOINT_ENV = "PET_RDZV_ENDPOINT"
# One node: its agent serves the rendezvous itself, on 127.0.0.1 only (loopback_torchrun.py).
ONE_NODE = ("-m", "omnilong.train.loopback_torchrun", "--nnodes", "1", "--standalone", "--local-addr", "127.0.0.1")


class RendezvousUnset(ValueError):
    """Several nodes and nowhere for them to meet."""


def default_init(params: Params, stage: StageName) -> Path:
    if stage == "stage1":
        return Path(params.model.path)
    return Path("runs") / PREVIOUS_STAGE[stage] / "model"


def runner_args(stage: StageName, params_file: Path, init: Path, out: Path, checkpoints: Path,
                variant: str | None) -> list[str]:
    args = ["--stage", stage, "--params", str(params_file), "--init", str(init), "--out", str(out),
            "--checkpoints", str(checkpoints)]
    return args + (["--variant", variant] if variant else [])


def under_torchrun() -> bool:
    """Whether this process is a rank torchrun started."""
    return "LOCAL_RANK" in os.environ


def torchrun_for_nodes(parallel: ParallelParams) -> tuple[str, ...]:
    """The torchrun command (after the interpreter) for the job's nodes: one node, standalone on
    loopback; several, torch's own torchrun at the c10d rendezvous every node is given (its store
    must be reached from the other nodes)."""
    if parallel.nnodes == 1:
        return ONE_NODE
    endpoint = parallel.rdzv_endpoint or os.environ.get(RDZV_ENDPOINT_ENV)
    if not endpoint:
        raise RendezvousUnset(
            f"parallel.rdzv_endpoint: expected host:port of the rendezvous every node meets at "
            f"(parallel.nnodes is {parallel.nnodes}), or torchrun's {RDZV_ENDPOINT_ENV} in the environment; "
            f"given neither"
        )
    return ("-m", "torch.distributed.run", "--nnodes", str(parallel.nnodes), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", parallel.rdzv_id)


def torchrun(module: str, args: list[str], nproc_per_node: int, nodes: tuple[str, ...] = ONE_NODE,
             output: IO | None = None) -> int:
    """Run `python -m module args` as `nproc_per_node` ranks on this node under torchrun, started
    as `nodes` (torchrun_for_nodes) says; its exit code. With `output` (an open file), the ranks'
    stdout and stderr go there instead of to this process's."""
    command = [sys.executable, *nodes, "--nproc-per-node", str(nproc_per_node), "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, env=env, stdout=output, stderr=output).returncode


class InitModelMissing(FileNotFoundError):
    """The model a stage starts from is not there."""


def preflight(params: Params, stage: StageName, init: Path, out: Path, checkpoints: Path) -> None:
    """What would otherwise fail only once every rank has started, or at the first checkpoint:
    the model to start from is there; the tracking server answers; the disk has room for a
    checkpoint and the exported model. Raises InitModelMissing, TrackingUnreachable or DiskSpaceError."""
    from omnilong.tracking.store import check_reachable
    from omnilong.train.disk_space import check_room_for_stage

    if not (init / "config.json").is_file():
        where = "no such directory" if not init.is_dir() else "no config.json there"
        previous = "" if stage == "stage1" else (
            f"; train {PREVIOUS_STAGE[stage]} first (`dvc repro train@{PREVIOUS_STAGE[stage]}`) or pass --init")
        raise InitModelMissing(f"--init {init}: expected the model to start from, a directory with config.json "
                               f"({where}){previous}")
    if params.tracking.enabled:
        check_reachable(params.tracking)
    check_room_for_stage(init, params.stages[stage].train.finetune, out, checkpoints)


def launch(params: Params, args: list[str]) -> int:
    if under_torchrun():
        from omnilong.train.runner import main

        main(args)
        return 0
    return torchrun("omnilong.train.runner", args, params.parallel.nproc_per_node, torchrun_for_nodes(params.parallel))
