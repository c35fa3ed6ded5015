"""Ring attention by the ring-flash-attn package (GPU, needs flash-attn): the experimental backend.

Rows holding at most one document (plus padding) run `zigzag_ring_flash_attn_func` on the
zigzag layout. Its padding tokens attend to the document before them, unlike the torch
backend's; that changes only the padding's own outputs, which carry no loss. Packed rows run
`llama3_flash_attn_varlen_func`, which needs the contiguous layout (`sharding_scheme` picks it)
and all-gathers K/V one head at a time instead of passing it around a ring.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from omnilong.parallel.documents import DocumentLayout

try:
    from ring_flash_attn import (
        llama3_flash_attn_prepare_cu_seqlens,
        llama3_flash_attn_varlen_func,
        zigzag_ring_flash_attn_func,
    )
except ImportError as exc:  # flash-attn cannot be built without CUDA
    UNAVAILABLE: str | None = f"ring-flash-attn is not importable ({exc}); install the `gpu` extra on a CUDA machine"
else:
    UNAVAILABLE = None


def flash_ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    documents: DocumentLayout,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as `ring_attention_torch.torch_ring_attention` (q/k/v [B, H, S/P, D])."""
    if UNAVAILABLE:
        raise RuntimeError(f"parallel.ring_attention = ring_flash_attn: {UNAVAILABLE}")
    layout = documents.sequence
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # flash-attn wants [B, S, H, D]
    if layout.scheme == "zigzag":
        if any(len(lens) > 1 for lens in documents.doc_lens):
            raise ValueError(
                "ring_flash_attn backend: packed rows need the contiguous layout (llama3 varlen); "
                "build the SequenceLayout with scheme=sharding_scheme('ring_flash_attn', doc_lens)"
            )
        out = zigzag_ring_flash_attn_func(q, k, v, softmax_scale=scale, causal=True, group=group)
    else:
        rows = []
        for row, bounds in enumerate(documents.row_bounds):
            cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=q.device)
            cu_q, cu_k, max_q, max_k, local_k_slice = llama3_flash_attn_prepare_cu_seqlens(
                cu_seqlens, causal=True, rank=documents.rank, world_size=layout.sp_size
            )
            rows.append(
                llama3_flash_attn_varlen_func(
                    q[row], k[row], v[row], cu_q, cu_k, max_q, max_k,
                    heads_k_stride=1, local_k_slice=local_k_slice, softmax_scale=scale, causal=True, group=group,
                )
            )
        out = torch.stack(rows)
    return out.transpose(1, 2)
