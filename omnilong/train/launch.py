"""`omnilong train`: run a stage under torchrun, one process per GPU (or `nproc_per_node` CPU ranks).

Already inside torchrun (a multi-node launch the user made), it runs the stage directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def launch(params: Params, args: list[str]) -> int:
    if "LOCAL_RANK" in os.environ:
        from omnilong.train.runner import main

        main(args)
        return 0
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(params.parallel.nnodes), "--nproc_per_node", str(params.parallel.nproc_per_node),
        *(["--standalone"] if params.parallel.nnodes == 1 else []),
        "-m", "omnilong.train.runner", *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, env=env).returncode
