"""Process groups of a training job: data-parallel x sequence-parallel.

Ranks form a [dp_size, sp_size] grid, row-major: the sp_size ranks of a sequence-parallel group
are consecutive (on one node when sp_size divides the GPUs per node, where their ring traffic
is cheapest); ranks with the same position in their group form a data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from omnilong.config import StageParams


@dataclass(frozen=True)
class ParallelMesh:
    device_mesh: DeviceMesh
    """2-D mesh with dims ("dp", "sp")."""

    @property
    def sp_group(self) -> dist.ProcessGroup:
        """Ranks sharing one sequence: the ring of ring attention."""
        return self.device_mesh.get_group("sp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """Ranks at the same place of different sequence-parallel groups."""
        return self.device_mesh.get_group("dp")

    @property
    def sp_size(self) -> int:
        return self.device_mesh.size(1)

    @property
    def dp_size(self) -> int:
        return self.device_mesh.size(0)

    @property
    def sp_rank(self) -> int:
        return self.device_mesh.get_local_rank("sp")

    @property
    def dp_rank(self) -> int:
        """Which sequence-parallel group this rank is in: the index that picks its samples."""
        return self.device_mesh.get_local_rank("dp")


def build_mesh(stage: StageParams, device_type: str = "cpu") -> ParallelMesh:
    """The mesh for a stage's `sp_size` over the initialised default process group (all ranks call it)."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh: torch.distributed is not initialised (start the job with torchrun)")
    world_size = dist.get_world_size()
    if world_size % stage.sp_size:
        raise ValueError(
            f"stages.<stage>.sp_size: expected a divisor of the world size {world_size}, given {stage.sp_size}"
        )
    mesh = init_device_mesh(
        device_type, (world_size // stage.sp_size, stage.sp_size), mesh_dim_names=("dp", "sp")
    )
    return ParallelMesh(mesh)
