"""Faults injected for tests and benchmarks only, each asked for by an environment variable.

They let tests/test_train_stage.py, tests/test_peer_timeout.py and benchmarks/fault_injection.py
reproduce real failures (a hung peer, a rank killed, a job killed while it writes a checkpoint)
at an exact point of a real run. Unset, each is a no-op.

With OMNILONG_TEST_FAULT_MARKS set to a folder, each kill happens once: it leaves a mark there
when it happens and does not happen again while the mark is there, so a flow's retries get past
it and one flow run can meet several faults, one per attempt.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch.distributed as dist

STALL_ENV = "OMNILONG_TEST_STALL"
"""`RANK:STEP:SECONDS`: that rank sleeps in that step (counted from 0), before its first
collective: a peer that stopped answering."""

KILL_ENV = "OMNILONG_TEST_KILL"
"""`RANK:STEP`: that rank is killed (SIGKILL) in that step (counted from 0), once its batch is
loaded: the other ranks are inside the step's first collective."""

KILL_BEFORE_PUBLISH_ENV = "OMNILONG_TEST_KILL_BEFORE_PUBLISH"
"""`NEXT_STEP`: once every rank has written the checkpoint after which training continues at
NEXT_STEP, and before it is published, the whole job is killed (torchrun's agent, then every rank;
SIGKILL): as if the machine died."""

NONFINITE_LOSS_ENV = "OMNILONG_TEST_NONFINITE_LOSS"
"""`STEP@RANK[,STEP@RANK...]` (steps counted from 1, as the step log prints them): that rank's
loss is NaN at that step, before backward (omnilong/train/nonfinite.py's guard then skips it)."""

MARKS_ENV = "OMNILONG_TEST_FAULT_MARKS"


def _asked(name: str) -> list[int] | None:
    """The fault's numbers, unless it is not asked for or has left its mark already."""
    value = os.environ.get(name)
    marks = os.environ.get(MARKS_ENV)
    if not value or (marks and (Path(marks) / name).exists()):
        return None
    return [int(part) for part in value.split(":")]


def _kill_self(name: str, why: str) -> None:
    if marks := os.environ.get(MARKS_ENV):
        Path(marks).mkdir(parents=True, exist_ok=True)
        (Path(marks) / name).touch()
    print(f"[rank {dist.get_rank()}] {name}: {why}: SIGKILL", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def stall_if_asked(step: int) -> None:
    value = os.environ.get(STALL_ENV)
    if not value:
        return
    rank, at_step, seconds = value.split(":")
    if int(rank) == dist.get_rank() and int(at_step) == step:
        print(f"[rank {rank}] {STALL_ENV}: sleeping {seconds} s in step {step} from t={time.time():.3f}", flush=True)
        time.sleep(float(seconds))


def kill_if_asked(step: int) -> None:
    asked = _asked(KILL_ENV)
    if asked and asked == [dist.get_rank(), step]:
        _kill_self(KILL_ENV, f"killed in step {step}")


def kill_job_before_publishing_if_asked(next_step: int) -> None:
    """Collective when asked: every rank reads the mark before any leaves it."""
    asked = _asked(KILL_BEFORE_PUBLISH_ENV)
    if asked and asked == [next_step]:
        dist.barrier()
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and "TORCHELASTIC_RUN_ID" in os.environ:
            os.kill(os.getppid(), signal.SIGKILL)  # torchrun's agent: nothing restarts or reports the ranks
        _kill_self(KILL_BEFORE_PUBLISH_ENV, f"checkpoint for step {next_step} written, not published")


def nonfinite_loss_asked(step: int, rank: int) -> bool:
    """Whether NONFINITE_LOSS_ENV names 0-based `step` on `rank`."""
    named = os.environ.get(NONFINITE_LOSS_ENV, "")
    return f"{step + 1}@{rank}" in {item.strip() for item in named.split(",")}
