"""The compatibility wrappers give the same results with torch 2.13's names and with the older ones."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from omnilong import torch_compat
from tests.conftest import run_ranks

NEW_NAMES = ("all_gather_single", "reduce_scatter_single")


def _collectives(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    mine = torch.arange(6, dtype=torch.float64).reshape(3, 2) + 100 * rank
    gathered = torch.empty(3 * world, 2, dtype=torch.float64)
    torch_compat.all_gather_single(gathered, mine)
    summed = torch.empty(3, 2, dtype=torch.float64)
    torch_compat.reduce_scatter_single(summed, gathered * (rank + 1))
    return gathered, summed


def _worker(rank: int, port: int, world: int, hide_new_names: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if hide_new_names:  # as on torch < 2.13, which has only the older names
        for name in NEW_NAMES:
            delattr(dist, name)
    gathered, summed = _collectives(rank, world)
    queue.put((rank, gathered.numpy(), summed.numpy(), all(hasattr(dist, n) for n in NEW_NAMES)))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("hide_new_names", [False, True], ids=["torch>=2.13", "torch<2.13"])
def test_gather_and_reduce_scatter_on_either_branch(hide_new_names):
    world = 2
    results = run_ranks(_worker, world, world, hide_new_names, timeout=120)
    expected_gathered = torch.cat([torch.arange(6, dtype=torch.float64).reshape(3, 2) + 100 * r for r in range(world)])
    # Rank r contributes gathered * (r + 1); the sum over ranks is gathered * 3, and rank r keeps rows 3r..3r+2.
    for rank, gathered, summed, had_new_names in results:
        assert had_new_names != hide_new_names
        torch.testing.assert_close(torch.from_numpy(gathered), expected_gathered, rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(summed), 3 * expected_gathered[3 * rank : 3 * rank + 3],
                                   rtol=0, atol=0)
