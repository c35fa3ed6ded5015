"""Ring attention on PyTorch's own kernels (CPU and CUDA): the default backend and the test reference.

Spec, for the P ranks of `group`, each holding its shard of a packed row (see `zigzag.py`):

    out = scaled_dot_product_attention(q, k, v, attn_mask=block-diagonal causal mask of the documents)

computed on the full sequence and sharded back, without any rank holding the full K/V, the
full attention matrix or a dense mask. Forward: K/V chunks travel around the ring
(`ring_comm.stream_kv_chunks`); each block's kernel calls (`documents.block_calls`) return
output and log-sum-exp, merged in place. Backward: the same K/V stream again; each rank adds its
share of a chunk's dK/dV to the partial sum that travels with that chunk, which arrives back at
its owner after a full turn. dQ stays local. Memory per rank is O(S/P): the shard, its
gradients, three half-shard chunks of K/V and three of dK/dV in the ring, and one kernel call's
outputs (at most a chunk of queries).
GQA (fewer K/V heads) is handled by the kernels; gradients come back per K/V head.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from omnilong.parallel.documents import DocumentLayout
from omnilong.parallel.lse_kernels import accumulator_dtype, attention_backward, attention_forward
from omnilong.parallel.ring_comm import (
    GRAD_KV_TAG,
    Exchange,
    RingChunk,
    RingLink,
    from_wire,
    merge_partial,
    stream_kv_chunks,
)


def torch_ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    documents: DocumentLayout,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention within documents over the ring of `group`.

    query [B, H, S/P, D], key/value [B, H_kv, S/P, D]: this rank's shard (`documents.rank`'s
    chunks). Returns [B, H, S/P, D], laid out in memory as [B, S/P, H, D] (what transformers'
    attention functions return after a transpose).
    """
    _check_shapes(query, key, value, documents, group)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(query, key, value, documents, group, scale)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, documents, group, scale):
        out, lse = _ring_forward(query, key, value, documents, RingLink(group), scale)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.documents, ctx.group, ctx.scale = documents, group, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        grads = _ring_backward(
            _dense(grad_out), query, key, value, out, lse, ctx.documents, RingLink(ctx.group), ctx.scale
        )
        return (*grads, None, None, None)


def _ring_forward(q, k, v, documents: DocumentLayout, link: RingLink, scale: float):
    batch, heads, local_len, head_dim = q.shape
    acc_dtype = accumulator_dtype(q.dtype)
    out = q.new_zeros(batch, local_len, heads, head_dim, dtype=acc_dtype).transpose(1, 2)
    lse = q.new_full((batch, heads, local_len), float("-inf"), dtype=acc_dtype)
    for chunk in stream_kv_chunks(k, v, link):
        for rows, q_rows, k_cols, segments in _block_calls(chunk, documents):
            block_out, block_lse = attention_forward(
                q[rows, :, q_rows], chunk.key[rows, :, k_cols], chunk.value[rows, :, k_cols],
                segments=segments, scale=scale,
            )
            merge_partial(out[rows, :, q_rows], lse[rows, :, q_rows], block_out, block_lse)
            del block_out, block_lse  # before the next call allocates its own: one block at a time
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, documents: DocumentLayout, link: RingLink, scale: float):
    batch, kv_heads, local_len, head_dim = k.shape
    chunk_len = local_len // 2
    acc_dtype = accumulator_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc_dtype)
    finished: list[list[torch.Tensor]] = [[], []]  # dK/dV of this rank's own two chunks

    def grad_buffers(fill=torch.Tensor.new_empty) -> list[torch.Tensor]:  # [B, C, H_kv, D] each
        return [fill(q, (batch, chunk_len, kv_heads, head_dim), dtype=acc_dtype) for _ in range(2)]

    partials: dict[int, list[torch.Tensor]] = {}  # step -> partial dK/dV of that step's chunk
    passing: Exchange | None = None  # last step's partial going out, and a later one coming in
    for chunk in stream_kv_chunks(k, v, link):
        # A chunk's partial dK/dV starts at its owner and picks up each rank's share on its way.
        partial = grad_buffers(torch.Tensor.new_zeros) if chunk.step < 2 else partials.pop(chunk.step)
        for rows, q_rows, k_cols, segments in _block_calls(chunk, documents):
            block_dq, block_dk, block_dv = attention_backward(
                dout[rows, :, q_rows], q[rows, :, q_rows], chunk.key[rows, :, k_cols], chunk.value[rows, :, k_cols],
                out[rows, :, q_rows], lse[rows, :, q_rows], segments=segments, scale=scale,
            )
            dq[rows, :, q_rows] += block_dq
            from_wire(partial[0])[rows, :, k_cols] += block_dk
            from_wire(partial[1])[rows, :, k_cols] += block_dv
            del block_dq, block_dk, block_dv
        if link.size == 1:
            finished[chunk.index] = partial
            continue
        # Pass the partial on (in the last round, back to its owner) and take the previous rank's
        # partial of this step: the one this rank extends two steps on, or, in the last round, the
        # finished gradient of its own chunk. Waited a step later, so the transfer overlaps compute.
        incoming = grad_buffers()
        if chunk.step + 2 < 2 * link.size:
            partials[chunk.step + 2] = incoming
        else:
            finished[chunk.index] = incoming
        posted = link.exchange(partial, incoming, GRAD_KV_TAG)
        if passing is not None:
            passing.wait()
        passing = posted
    if passing is not None:
        passing.wait()
    dk, dv = (
        torch.cat([from_wire(finished[0][i]), from_wire(finished[1][i])], dim=2).to(k.dtype) for i in range(2)
    )
    return dq.to(q.dtype), dk, dv


def _block_calls(chunk: RingChunk, documents: DocumentLayout):
    """(rows, query rows of the shard, key columns of the chunk, causal segments) for every kernel
    call with `chunk`. The diagonal block's causal squares, one per document, tile the chunk and
    go to the kernels as one call (`segments`: their lengths); a rectangle has segments None."""
    layout = documents.sequence
    k_chunk = layout.chunks(chunk.owner)[chunk.index]
    for local_index, q_chunk in enumerate(layout.chunks(documents.rank)):
        offset = local_index * layout.chunk_len
        for rows, calls in documents.block_plan(q_chunk, k_chunk):
            if calls[0].causal:
                whole_chunk = slice(calls[0].q_start, calls[-1].q_end)
                yield rows, _query_rows(whole_chunk, offset), whole_chunk, tuple(c.q_end - c.q_start for c in calls)
                continue
            for call in calls:
                yield rows, _query_rows(slice(call.q_start, call.q_end), offset), slice(call.k_start, call.k_end), None


def _query_rows(chunk_rows: slice, offset: int) -> slice:
    return slice(offset + chunk_rows.start, offset + chunk_rows.stop)


def _dense(grad_BHSD: torch.Tensor) -> torch.Tensor:
    """The incoming gradient in a layout the kernels read (it may be broadcast, e.g. from a sum)."""
    if grad_BHSD.is_contiguous() or grad_BHSD.transpose(1, 2).is_contiguous():
        return grad_BHSD
    return grad_BHSD.transpose(1, 2).contiguous().transpose(1, 2)


def _check_shapes(query, key, value, documents: DocumentLayout, group) -> None:
    if query.ndim != 4 or key.shape != value.shape or key.ndim != 4:
        raise ValueError(
            f"query/key/value: expected [B, H, S/P, D] and two equal [B, H_kv, S/P, D], given "
            f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
        )
    batch, heads, local_len, head_dim = query.shape
    if (key.shape[0], key.shape[2], key.shape[3]) != (batch, local_len, head_dim) or heads % key.shape[1]:
        raise ValueError(
            f"key: expected [B={batch}, H_kv dividing H={heads}, S/P={local_len}, D={head_dim}], "
            f"given {list(key.shape)}"
        )
    layout = documents.sequence
    if local_len != layout.local_len or len(documents.row_bounds) != batch:
        raise ValueError(
            f"query: expected {len(documents.row_bounds)} rows of {layout.local_len} tokens "
            f"(seq_len {layout.seq_len} / sp_size {layout.sp_size}), given {list(query.shape)}"
        )
    group_size = dist.get_world_size(group) if dist.is_initialized() else 1
    if group_size != layout.sp_size or (dist.is_initialized() and dist.get_rank(group) != documents.rank):
        raise ValueError(
            f"documents: laid out for rank {documents.rank} of sp_size {layout.sp_size}, but this process is "
            f"rank {dist.get_rank(group) if dist.is_initialized() else 0} of a group of {group_size}"
        )
