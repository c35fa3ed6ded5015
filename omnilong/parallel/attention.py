"""The ring attention backends behind one call, chosen by `parallel.ring_attention` in params.yaml."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from omnilong.config import RingBackend
from omnilong.parallel.documents import DocumentLayout
from omnilong.parallel.ring_attention_flash import flash_ring_attention
from omnilong.parallel.ring_attention_torch import torch_ring_attention
from omnilong.parallel.zigzag import Scheme


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    documents: DocumentLayout,
    group: dist.ProcessGroup | None = None,
    *,
    backend: RingBackend = "torch",
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention within documents over the sequence-parallel group: query [B, H, S/P, D],
    key/value [B, H_kv, S/P, D] -> [B, H, S/P, D]. See the backends' modules for details."""
    if backend == "torch":
        return torch_ring_attention(query, key, value, documents, group, scale)
    if backend == "ring_flash_attn":
        return flash_ring_attention(query, key, value, documents, group, scale)
    raise ValueError(f"parallel.ring_attention: expected 'torch' or 'ring_flash_attn', given {backend!r}")


def sharding_scheme(backend: RingBackend, doc_lens: Sequence[Sequence[int]]) -> Scheme:
    """How to shard a batch for `backend`: zigzag, except packed rows on ring_flash_attn (llama3 varlen)."""
    if backend == "ring_flash_attn" and any(len(lens) > 1 for lens in doc_lens):
        return "contiguous"
    return "zigzag"
