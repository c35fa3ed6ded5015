"""A peer that stops answering: every collective waits at most `parallel.timeout_s`, and the rank
that gave up says who it is, where it was and which collective it waited in.

Without this, a rank hung in a kernel or a deadlocked loader, or a stopped node, leaves the others
waiting in their next collective for torch's default (30 minutes on gloo, 10 on NCCL), then
failing with a transport message ("Timed out waiting 1800000ms for recv operation to complete")
that names neither the step nor the collective.

Groups made with `new_group` do not inherit the default group's timeout: each one gets its own
(`omnilong/parallel/mesh.py`), and `bound_every_group` sets it on those a library made without one
(DeepSpeed clones the world group for ZeRO).

gloo (CPU) fails the waiting call itself: `naming_stalled_collectives` turns its error into one
that names the rank, the step and the collective. On NCCL a collective is waited for by torch's
watchdog thread, which, with `TORCH_NCCL_ASYNC_ERROR_HANDLING=1` (`abort_nccl_on_timeout`),
aborts the communicators and the process once the timeout passes; its log line names the rank and
the collective (`OpType=...`), the step being the one after the last logged. With
`TORCH_NCCL_BLOCKING_WAIT=1` the waiting call raises instead and the step is named too, at the cost
of the CPU no longer running ahead of the GPU's collectives.
"""

from __future__ import annotations

import contextlib
import os
import re
import traceback
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d

# Transport errors of a peer that stopped answering (gloo: "Timed out waiting ...", "Application
# timeout caused pair closure"; NCCL: "Watchdog caught collective operation timeout") or that died
# ("Connection closed by peer", "Connection reset by peer").
_PEER_FAILURE = re.compile(r"timed? ?out|timeout|connection (?:closed|reset) by peer|broken pipe", re.IGNORECASE)
_NCCL_OP = re.compile(r"OpType=(\w+)")


class PeerStoppedAnswering(RuntimeError):
    """A collective of this rank did not complete: a peer hung or died."""


def as_timedelta(timeout_s: float) -> timedelta:
    return timedelta(seconds=timeout_s)


def abort_nccl_on_timeout() -> None:
    """Make NCCL groups fail on a timeout: the watchdog aborts the communicators and the process
    (torch's default since 2.2 does so without the clean-up; older releases and some clusters set
    0, no handling: a hang forever). Call before the first NCCL group; a value already set wins."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")


def bound_every_group(timeout_s: float) -> None:
    """Every process group this rank is in waits at most `timeout_s` in a collective, those that
    libraries made with torch's default timeout included. Call once every group exists."""
    # torch lists the groups and sets a made group's timeout through private calls only (2.11-2.13).
    for group in list(distributed_c10d._world.pg_map):
        if not distributed_c10d._rank_not_in_group(group):
            distributed_c10d._set_pg_timeout(as_timedelta(timeout_s), group)


@contextlib.contextmanager
def naming_stalled_collectives(where: str, timeout_s: float) -> Iterator[None]:
    """Re-raise a collective's timeout (or a dead peer's closed connection) inside the block as
    `PeerStoppedAnswering`: "rank R: <where>: <collective> did not complete within ...".
    Other errors pass unchanged."""
    try:
        yield
    except RuntimeError as error:  # torch's DistBackendError is one
        if not _PEER_FAILURE.search(str(error)):
            raise
        raise PeerStoppedAnswering(
            f"rank {dist.get_rank()}: {where}: {collective_of(error)} did not complete within "
            f"parallel.timeout_s={timeout_s:g} s (a peer stopped answering)"
        ) from error


def collective_of(error: BaseException) -> str:
    """The collective `error` came from and our code that called it, read from its traceback: the
    innermost torch.distributed call (or the DeepSpeed call that waited on one) and the innermost
    frame of omnilong, e.g. "all_reduce (called at omnilong/train/runner.py:212 in train_step)"."""
    frames = traceback.extract_tb(error.__traceback__)
    nccl_op = _NCCL_OP.search(str(error))
    collective = nccl_op.group(1).lower() if nccl_op else _innermost_call(frames)
    ours = next((f for f in reversed(frames) if _package_path(f.filename).startswith("omnilong/")), None)
    if ours is None:
        return collective
    return f"{collective} (called at {_package_path(ours.filename)}:{ours.lineno} in {ours.name})"


def _innermost_call(frames: traceback.StackSummary) -> str:
    for package in ("torch/distributed/", "deepspeed/"):
        for frame in reversed(frames):
            # c10d's logging decorators wrap every collective in a function named `wrapper`.
            if package in frame.filename.replace("\\", "/") and frame.name != "wrapper":
                return frame.name
    return "a collective"


def _package_path(filename: str) -> str:
    """`.../omnilong/train/runner.py` -> `omnilong/train/runner.py` (unchanged outside omnilong)."""
    path = filename.replace("\\", "/")
    start = path.rfind("/omnilong/")
    return path[start + 1:] if start >= 0 else path
