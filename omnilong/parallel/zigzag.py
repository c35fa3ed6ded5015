"""Which tokens of a sequence each sequence-parallel rank holds, and the inverse.

A sequence of `seq_len` tokens is cut into 2P equal chunks (P = sp_size). Under causal attention
a chunk's cost grows with its index, so `zigzag` gives rank r chunks r and 2P-1-r: every rank
pairs a cheap chunk with an expensive one and does the same work. `contiguous` (rank r holds
chunks 2r and 2r+1) is the unbalanced baseline, and the layout ring-flash-attn's llama3 varlen
kernel expects. A rank's local sequence is its two chunks back to back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

Scheme = Literal["zigzag", "contiguous"]


@dataclass(frozen=True)
class SequenceLayout:
    seq_len: int
    sp_size: int
    scheme: Scheme = "zigzag"

    def __post_init__(self) -> None:
        if self.sp_size < 1:
            raise ValueError(f"sp_size: expected a positive integer, given {self.sp_size}")
        if self.seq_len <= 0 or self.seq_len % (2 * self.sp_size):
            raise ValueError(
                f"seq_len: expected a positive multiple of 2 x sp_size = {2 * self.sp_size} "
                f"(zigzag sharding needs equal chunks), given {self.seq_len}"
            )
        if self.scheme not in ("zigzag", "contiguous"):
            raise ValueError(f"scheme: expected 'zigzag' or 'contiguous', given {self.scheme!r}")

    @property
    def chunk_len(self) -> int:
        return self.seq_len // (2 * self.sp_size)

    @property
    def local_len(self) -> int:
        return 2 * self.chunk_len

    def chunks(self, rank: int) -> tuple[int, int]:
        """Global indices of the two chunks rank `rank` holds, in local order."""
        if not 0 <= rank < self.sp_size:
            raise ValueError(f"rank: expected 0 <= rank < sp_size = {self.sp_size}, given {rank}")
        if self.scheme == "zigzag":
            return rank, 2 * self.sp_size - 1 - rank
        return 2 * rank, 2 * rank + 1

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        """Global token range [start, end) of chunk `chunk`."""
        return chunk * self.chunk_len, (chunk + 1) * self.chunk_len


def shard_sequence(full: torch.Tensor, layout: SequenceLayout, rank: int, dim: int) -> torch.Tensor:
    """Rank `rank`'s part of `full` along `dim` (of size seq_len): its two chunks concatenated."""
    _check_length(full, layout.seq_len, dim, "full")
    chunk_len = layout.chunk_len
    return torch.cat([full.narrow(dim, c * chunk_len, chunk_len) for c in layout.chunks(rank)], dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], layout: SequenceLayout, dim: int) -> torch.Tensor:
    """Inverse of `shard_sequence`: `shards[r]` is rank r's part; returns the full sequence."""
    if len(shards) != layout.sp_size:
        raise ValueError(f"shards: expected one per rank ({layout.sp_size}), given {len(shards)}")
    pieces: list[torch.Tensor | None] = [None] * (2 * layout.sp_size)
    for rank, shard in enumerate(shards):
        _check_length(shard, layout.local_len, dim, f"shards[{rank}]")
        for local_index, chunk in enumerate(layout.chunks(rank)):
            pieces[chunk] = shard.narrow(dim, local_index * layout.chunk_len, layout.chunk_len)
    return torch.cat(pieces, dim=dim)


def gather_sequence(
    local: torch.Tensor, layout: SequenceLayout, group: dist.ProcessGroup | None, dim: int
) -> torch.Tensor:
    """The full sequence on every rank of `group` (for evaluation and tests); not differentiable."""
    shards = [torch.empty_like(local) for _ in range(layout.sp_size)]
    dist.all_gather(shards, local.contiguous(), group=group)
    return unshard_sequence(shards, layout, dim)


def _check_length(tensor: torch.Tensor, expected: int, dim: int, name: str) -> None:
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected size {expected} along dim {dim} (the sequence), given shape {list(tensor.shape)}"
        )
