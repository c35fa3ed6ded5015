"""The ring: point-to-point exchange with the neighbours, the K/V chunk stream, the log-sum-exp merge.

Shared by every ring attention variant. Data moves one chunk (half a rank's shard) at a time.
A rank uses its own two chunks first, so the next rank needs a chunk two steps after this rank
used it: at step j a rank sends the chunk it attends to and receives the one it will attend to
at step j + 2, which its previous rank sends in the same step. Every send has its receive
posted in the same step on the other side, so the transfers complete within the step on gloo
and NCCL alike (NCCL runs each step's batch on one stream; a receive posted a step later would
deadlock it). A rank holds three chunks of the ring at a time (the one it attends to, the next,
the one arriving): 1.5 shards of K/V, where double-buffering whole shards holds two.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Message kinds on the same link; gloo matches messages by tag, NCCL by issue order (which the
# loops keep identical on every rank).
KV_TAG = 11
GRAD_KV_TAG = 12


class Exchange:
    """Posted sends and receives of one step; `wait` before reading or releasing their buffers."""

    def __init__(self, works: list[dist.Work], buffers: list[torch.Tensor]):
        self._works = works
        self._buffers = buffers  # kept alive until the transfers are done

    def wait(self) -> None:
        # Waiting twice on a finished gloo receive blocks, so each work is waited exactly once.
        while self._works:
            self._works.pop(0).wait()
        self._buffers = []


class RingLink:
    """This rank's place in the ring of `group`: it sends to rank + 1 and receives from rank - 1."""

    def __init__(self, group: dist.ProcessGroup | None):
        if not dist.is_initialized():  # a single process is a ring of one that never communicates
            self.group, self.rank, self.size = None, 0, 1
            return
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        # P2P ops address peers by global rank.
        self._next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self._prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def exchange(self, send: list[torch.Tensor], recv: list[torch.Tensor], tag: int) -> Exchange:
        """Send `send` to the next rank and receive `recv` from the previous one, asynchronously."""
        ops = [dist.P2POp(dist.isend, t, self._next, self.group, tag) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self._prev, self.group, tag) for t in recv]
        return Exchange(dist.batch_isend_irecv(ops) if ops else [], send + recv)


def to_wire(chunk_BHCD: torch.Tensor) -> torch.Tensor:
    """A chunk as a contiguous [B, C, H, D] message.

    Free when the chunk is a slice of transformers' layout (q/k/v are [B, S, H, D] in memory,
    seen as [B, H, S, D]) with B = 1, a copy otherwise.
    """
    return chunk_BHCD.transpose(1, 2).contiguous()


def from_wire(message_BCHD: torch.Tensor) -> torch.Tensor:
    return message_BCHD.transpose(1, 2)


@dataclass(frozen=True)
class RingChunk:
    """K/V chunk `index` (0 or 1, in its owner's local order) of rank `owner`, seen as [B, H, C, D]."""

    step: int
    owner: int
    index: int
    key: torch.Tensor
    value: torch.Tensor


def stream_kv_chunks(key_BHSD: torch.Tensor, value_BHSD: torch.Tensor, link: RingLink) -> Iterator[RingChunk]:
    """Every rank's K/V chunks, own first; step j (0 <= j < 2P) yields chunk j % 2 of rank
    (rank - j // 2) mod P. Each is passed on to the next rank unless it already had it."""
    chunk_len = key_BHSD.shape[2] // 2
    chunks = {i: [to_wire(t.narrow(2, i * chunk_len, chunk_len)) for t in (key_BHSD, value_BHSD)] for i in range(2)}
    steps = 2 * link.size
    for step in range(steps):
        current = chunks.pop(step)
        exchange = None
        if step + 2 < steps:
            chunks[step + 2] = [torch.empty_like(t) for t in current]
            exchange = link.exchange(current, chunks[step + 2], KV_TAG)
        yield RingChunk(
            step, (link.rank - step // 2) % link.size, step % 2, from_wire(current[0]), from_wire(current[1])
        )
        if exchange is not None:
            exchange.wait()


def merge_partial(
    out_BHND: torch.Tensor, lse_BHN: torch.Tensor, block_out_BHND: torch.Tensor, block_lse_BHN: torch.Tensor
) -> None:
    """Fold one block's attention into the running output, in place.

    With l = logaddexp(lse, block_lse): out = out * exp(lse - l) + block_out * exp(block_lse - l),
    lse = l. Rows seen for the first time have lse = -inf and out = 0, and take the block as is.
    """
    merged_lse = torch.logaddexp(lse_BHN, block_lse_BHN)
    out_BHND.mul_(torch.exp(lse_BHN - merged_lse).unsqueeze(-1).to(out_BHND.dtype))
    out_BHND.addcmul_(block_out_BHND, torch.exp(block_lse_BHN - merged_lse).unsqueeze(-1).to(out_BHND.dtype))
    lse_BHN.copy_(merged_lse)
