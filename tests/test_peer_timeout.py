"""A peer that stops answering fails the stage within `parallel.timeout_s`, the survivor naming
its rank, the step and the collective (omnilong/parallel/timeout.py)."""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from omnilong.config import StageParams
from omnilong.parallel.mesh import build_mesh
from omnilong.parallel.timeout import naming_stalled_collectives
from omnilong.train.faults import STALL_ENV
from tests.conftest import project_env
from tests.test_train_stage import _train, stage1_setup  # noqa: F401  (the fixture, reused)


def group_timeout(group: dist.ProcessGroup) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def test_the_mesh_groups_wait_timeout_s():
    # new_group does not inherit the default group's timeout: torch would give each 30 minutes.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=7))
    try:
        mesh = build_mesh(StageParams(seq_len=64, sp_size=1), timeout_s=7)
        assert group_timeout(mesh.sp_group) == group_timeout(mesh.dp_group) == timedelta(seconds=7)
    finally:
        dist.destroy_process_group()


def test_other_errors_pass_unchanged():
    with pytest.raises(RuntimeError, match=r"^shapes \[2\] and \[3\] differ$"):
        with naming_stalled_collectives("step 3", 7):
            raise RuntimeError("shapes [2] and [3] differ")


@pytest.mark.slow
def test_a_stalled_rank_fails_the_stage_within_the_timeout(stage1_setup):  # noqa: F811
    """Rank 0 sleeps 600 s in step 1; rank 1 gives up after timeout_s in its first collective of
    the step, exits non-zero, and torchrun stops the sleeper."""
    raw, root = stage1_setup
    raw = json.loads(json.dumps(raw))
    timeout_s, sleep_s = 12, 600
    raw["parallel"]["timeout_s"] = timeout_s
    raw["tracking"] = {"enabled": False}  # no MLflow start on rank 0 alone: its peer would wait on it
    env = {**project_env(root), STALL_ENV: f"0:1:{sleep_s}"}
    started = time.monotonic()
    result = _train(root, raw, "stall", "runs/stall", "checkpoints/stall", env=env)
    ended, wall_s = time.time(), time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert re.search(
        rf"rank 1: step 1: all_reduce \(called at omnilong/train/runner.py:\d+ in _all_reduce\) did not "
        rf"complete within parallel.timeout_s={timeout_s} s \(a peer stopped answering\)", output
    ), output[-3000:]
    stalled_from = float(re.search(r"sleeping 600 s in step 1 from t=([\d.]+)", output).group(1))
    # From the stall to the end of torchrun: the timeout, then torchrun stopping the sleeper.
    print(output[-6000:]); print(f"stage wall {wall_s:.1f} s; {ended - stalled_from:.1f} s from the stall to the end")
    assert timeout_s <= ended - stalled_from < timeout_s + 60
    assert wall_s < sleep_s / 2
    assert not (root / "runs/stall/model").exists()
