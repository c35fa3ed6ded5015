"""`omnilong train`: run a stage under torchrun, one process per GPU (or `nproc_per_node` CPU ranks).

Already inside torchrun (a multi-node launch the user made), it runs the stage directly. The
evaluation commands launch themselves through the same `torchrun` when sequence-parallel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

from omnilong.config import Params, StageName

# Where each stage starts from in the full recipe; the ablation points stage 3 at stage 1.
PREVIOUS_STAGE = {"stage2": "stage1", "stage3": "stage2"}


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


def torchrun(module: str, args: list[str], nproc_per_node: int, nnodes: int = 1, output: IO | None = None) -> int:
    """Run `python -m module args` as `nproc_per_node` ranks per node under torchrun (one node:
    standalone, no rendezvous server to give); its exit code. With `output` (an open file), the
    ranks' stdout and stderr go there instead of to this process's."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node),
        *(["--standalone"] if nnodes == 1 else []),
        "-m", module, *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, env=env, stdout=output, stderr=output).returncode


def preflight(params: Params, stage: StageName, init: Path, out: Path, checkpoints: Path) -> None:
    """What would otherwise fail only once every rank has started, or at the first checkpoint:
    the tracking server answers; the disk has room for a checkpoint and the exported model.
    Raises TrackingUnreachable or DiskSpaceError."""
    from omnilong.tracking.store import check_reachable
    from omnilong.train.disk_space import check_room_for_stage

    if params.tracking.enabled:
        check_reachable(params.tracking)
    if init.is_dir():  # else the runner names the missing model
        check_room_for_stage(init, params.stages[stage].train.finetune, out, checkpoints)


def launch(params: Params, args: list[str]) -> int:
    if under_torchrun():
        from omnilong.train.runner import main

        main(args)
        return 0
    return torchrun("omnilong.train.runner", args, params.parallel.nproc_per_node, params.parallel.nnodes)
