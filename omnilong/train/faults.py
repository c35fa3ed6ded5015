"""Faults injected for tests and benchmarks only, each asked for by an environment variable.

They let tests/test_train_stage.py, tests/test_peer_timeout.py, tests/test_recovery.py and
benchmarks/fault_injection.py reproduce real failures (a hung peer, a rank killed or crashed, a
job killed while it writes a checkpoint) at an exact point of a real run. Unset, each is a no-op.
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

STALL_ENV = "OMNILONG_TEST_STALL"
"""`RANK:STEP:SECONDS`: that rank sleeps in that step (counted from 0), before its first
collective: a peer that stopped answering."""

KILL_ENV = "OMNILONG_TEST_KILL"
"""`RANK:STEP`: that rank is killed (SIGKILL) in that step (counted from 0), once its batch is
loaded: the other ranks are inside the step's first collective."""

CRASH_ENV = "OMNILONG_TEST_CRASH"
"""`RANK:STEP`: that rank exits with status 1, without cleaning up, once it trained that step and
before any checkpoint after it, in an attempt that started the stage from scratch (a retry
resuming from a checkpoint gets past it): a crash the flow's retry recovers from."""

KILL_BEFORE_PUBLISH_ENV = "OMNILONG_TEST_KILL_BEFORE_PUBLISH"
"""`NEXT_STEP`: once every rank has written the checkpoint after which training continues at
NEXT_STEP, and before it is published, the whole job is killed (torchrun's agent, then every rank;
SIGKILL): as if the machine died."""


def _asked(name: str) -> list[int] | None:
    value = os.environ.get(name)
    return [int(float(part)) for part in value.split(":")] if value else None


def _kill_self(why: str) -> None:
    print(f"[rank {dist.get_rank()}] {why}: SIGKILL", flush=True)
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
        _kill_self(f"{KILL_ENV}: killed in step {step}")


def crash_if_asked(step: int, start_step: int) -> None:
    asked = _asked(CRASH_ENV)
    if asked and start_step == 0 and asked == [dist.get_rank(), step]:
        print(f"[rank {asked[0]}] {CRASH_ENV}: crashing after step {step}", flush=True)
        os._exit(1)


def kill_job_before_publishing_if_asked(next_step: int) -> None:
    asked = _asked(KILL_BEFORE_PUBLISH_ENV)
    if asked and asked == [next_step]:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and "TORCHELASTIC_RUN_ID" in os.environ:
            os.kill(os.getppid(), signal.SIGKILL)  # torchrun's agent: nothing restarts or reports the ranks
        _kill_self(f"{KILL_BEFORE_PUBLISH_ENV}: checkpoint for step {next_step} written, not published")
