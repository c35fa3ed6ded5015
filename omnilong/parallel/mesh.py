"""Process groups of a training job: data-parallel x sequence-parallel.

Ranks form a [dp_size, sp_size] grid, row-major: the sp_size ranks of a sequence-parallel group
are consecutive (on one node when sp_size divides the GPUs per node, where their ring traffic
is cheapest); ranks with the same position in their group form a data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from omnilong.config import StageParams
from omnilong.parallel.timeout import as_timedelta


@dataclass(frozen=True)
class ParallelMesh:
    sp_group: dist.ProcessGroup
    """Ranks sharing one sequence: the ring of ring attention."""
    dp_group: dist.ProcessGroup
    """Ranks at the same place of different sequence-parallel groups."""
    dp_size: int
    sp_size: int
    dp_rank: int
    """Which sequence-parallel group this rank is in: the index that picks its samples."""
    sp_rank: int


def build_mesh(stage: StageParams, *, timeout_s: float) -> ParallelMesh:
    """The groups for a stage's `sp_size` over the initialised default process group (all ranks
    call it); a collective on them waits at most `timeout_s` for its peers."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh: torch.distributed is not initialised (start the job with torchrun)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size % stage.sp_size:
        raise ValueError(
            f"stages.<stage>.sp_size: expected a divisor of the world size {world_size}, given {stage.sp_size}"
        )
    sp_size, dp_size = stage.sp_size, world_size // stage.sp_size
    # Every rank makes every group, in the same order (new_group is collective), on the default
    # group's backend. Not DeviceMesh: its groups take torch's default timeout.
    timeout = as_timedelta(timeout_s)
    sp_groups = [dist.new_group(list(range(d * sp_size, (d + 1) * sp_size)), timeout=timeout) for d in range(dp_size)]
    dp_groups = [dist.new_group(list(range(s, world_size, sp_size)), timeout=timeout) for s in range(sp_size)]
    dp_rank, sp_rank = divmod(rank, sp_size)
    return ParallelMesh(sp_groups[dp_rank], dp_groups[sp_rank], dp_size, sp_size, dp_rank, sp_rank)
