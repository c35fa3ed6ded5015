"""The ring of P ranks replayed in one process: every rank's kernel calls, no communication.

A lent GPU machine has one GPU, and NCCL will not put two ranks on one device. To run the block
plans of P = 2 or 4 on the GPU's kernels all the same, rank r's forward and backward run with a
`ReplayLink`, which stands for the ring: what the previous rank would send is cut straight from
the full K/V, and what this rank sends is recorded. In backward each rank starts every incoming
partial dK/dV at zero, so what it sends on for a chunk is exactly its own share of that chunk's
gradient; the shares summed over ranks are the chunk's dK/dV. dQ never leaves its rank.

The output and gradients are those of `torch_ring_attention` on P processes (the same
`_ring_forward` / `_ring_backward` code runs); tests/test_gpu_suite.py holds them to SDPA on CPU.
"""

from __future__ import annotations

import torch

from omnilong.parallel.documents import DocumentLayout
from omnilong.parallel.ring_attention_torch import _ring_backward, _ring_forward
from omnilong.parallel.ring_comm import GRAD_KV_TAG, KV_TAG, from_wire, to_wire
from omnilong.parallel.zigzag import SequenceLayout, shard_sequence, unshard_sequence


class _Done:
    def wait(self) -> None:
        pass


class ReplayLink:
    """Rank `rank` of a ring of `size`: receives are filled from the full sequence's K/V chunks."""

    def __init__(self, rank: int, size: int, kv_chunks: dict[tuple[int, int], list[torch.Tensor]]):
        self.rank, self.size = rank, size
        self._kv_chunks = kv_chunks  # (owner, index) -> [key, value] as wire messages [B, C, H, D]
        self._kv_step = 0
        self._grad_step = 0
        self.grad_shares: dict[tuple[int, int], list[torch.Tensor]] = {}

    def _chunk_at(self, step: int) -> tuple[int, int]:
        return (self.rank - step // 2) % self.size, step % 2

    def exchange(self, send: list[torch.Tensor], recv: list[torch.Tensor], tag: int) -> _Done:
        if tag == KV_TAG:  # at step j the ring delivers the chunk attended to at step j + 2
            for buffer, tensor in zip(recv, self._kv_chunks[self._chunk_at(self._kv_step + 2)]):
                buffer.copy_(tensor)
            self._kv_step += 1
        else:
            assert tag == GRAD_KV_TAG
            self.grad_shares[self._chunk_at(self._grad_step)] = [t.clone() for t in send]
            for buffer in recv:
                buffer.zero_()
            self._grad_step += 1
        return _Done()


def replayed_ring_attention(
    q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, dout_BHSD: torch.Tensor,
    doc_lens: list[list[int]], sp_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, dq, dk, dv) of the full sequences, computed rank by rank as a ring of `sp_size` would."""
    layout = SequenceLayout(q_BHSD.shape[2], sp_size)
    kv_chunks = {}
    for owner in range(sp_size):
        shard_k, shard_v = (shard_sequence(t, layout, owner, dim=2) for t in (k_BKSD, v_BKSD))
        for index in range(2):
            span = slice(index * layout.chunk_len, (index + 1) * layout.chunk_len)
            kv_chunks[owner, index] = [to_wire(shard_k[:, :, span]), to_wire(shard_v[:, :, span])]
    outs, dqs, grad_shares = [], [], []
    for rank in range(sp_size):
        documents = DocumentLayout(layout, rank, doc_lens)
        q, k, v, dout = (shard_sequence(t, layout, rank, dim=2) for t in (q_BHSD, k_BKSD, v_BKSD, dout_BHSD))
        out, lse = _ring_forward(q, k, v, documents, ReplayLink(rank, sp_size, kv_chunks), scale)
        link = ReplayLink(rank, sp_size, kv_chunks)
        dq, dk_own, dv_own = _ring_backward(dout, q, k, v, out, lse, documents, link, scale)
        if sp_size == 1:  # no exchange: the rank's own chunks' gradients come back whole
            half = layout.chunk_len
            link.grad_shares = {(0, i): [to_wire(g[:, :, i * half:(i + 1) * half]) for g in (dk_own, dv_own)]
                                for i in range(2)}
        outs.append(out)
        dqs.append(dq)
        grad_shares.append(link.grad_shares)
    dk_dv = []
    for which in range(2):
        shards = []
        for owner in range(sp_size):
            halves = [sum(from_wire(shares[owner, index][which]).float() for shares in grad_shares)
                      for index in range(2)]
            shards.append(torch.cat(halves, dim=2).to(k_BKSD.dtype))
        dk_dv.append(unshard_sequence(shards, layout, dim=2))
    return unshard_sequence(outs, layout, dim=2), unshard_sequence(dqs, layout, dim=2), dk_dv[0], dk_dv[1]
