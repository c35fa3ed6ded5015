"""Ring attention inside unmodified transformers models, through `AttentionInterface`.

ring-flash-attn's own adapter patches transformers' flash-attention function and refuses
transformers 5.x; this one registers a new attention implementation instead:

    register_ring_attention()                      # once per process
    model.set_attn_implementation(ATTENTION_NAME)  # language model and vision tower alike
    with ring_attention_context(shard.documents, mesh.sp_group, params.parallel.ring_attention):
        loss = ...forward on shard.inputs / shard.position_ids...
        loss.backward()

Causal calls (the language model's layers) run ring attention over the group, with the
documents of the active context. Non-causal calls (the vision towers: Qwen2.5-VL's windowed
blocks, SigLIP) keep local attention: they are passed to transformers' own SDPA function
unchanged, so the vision config needs no separate setting. transformers builds no mask for an
implementation it does not know, so no [S x S] mask is made either.

The context is process-global, not thread-local: backward (and the recomputation of
activation checkpointing, which calls attention again) may run on autograd's own threads, so
keep the context open around both forward and backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from omnilong.config import RingBackend
from omnilong.parallel.attention import ring_attention
from omnilong.parallel.documents import DocumentLayout

ATTENTION_NAME = "omnilong_ring"


@dataclass(frozen=True)
class _RingStep:
    documents: DocumentLayout
    group: dist.ProcessGroup | None
    backend: RingBackend


_active_step: _RingStep | None = None


@contextlib.contextmanager
def ring_attention_context(
    documents: DocumentLayout, group: dist.ProcessGroup | None, backend: RingBackend = "torch"
) -> Iterator[None]:
    """Causal attention calls inside the block use ring attention over `group` for this batch."""
    global _active_step
    if _active_step is not None:
        raise RuntimeError("ring_attention_context: already inside one; one batch at a time")
    _active_step = _RingStep(documents, group, backend)
    try:
        yield
    finally:
        _active_step = None


def register_ring_attention() -> str:
    """Make `ATTENTION_NAME` a valid `attn_implementation` in this process; returns the name."""
    AttentionInterface.register(ATTENTION_NAME, ring_attention_forward)
    return ATTENTION_NAME


def ring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q [B, H, S, D], k/v [B, H_kv, S, D] -> ([B, S, H, D], None)."""
    is_causal = kwargs.pop("is_causal", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
        )
    step = _active_step
    if step is None:
        raise RuntimeError(
            f"attn_implementation {ATTENTION_NAME!r}: a causal attention call outside ring_attention_context(); "
            "the model holds a shard of the sequence and needs the group and document layout of its batch"
        )
    if attention_mask is not None:
        raise ValueError(
            f"attn_implementation {ATTENTION_NAME!r}: expected attention_mask=None (documents and padding come "
            f"from the ring context), given a mask of shape {list(attention_mask.shape)}"
        )
    if dropout:
        raise ValueError(f"attn_implementation {ATTENTION_NAME!r}: attention dropout is not supported, given {dropout}")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"attn_implementation {ATTENTION_NAME!r}: sliding-window attention is not supported")
    out = ring_attention(query, key, value, step.documents, step.group, backend=step.backend, scale=scaling)
    return out.transpose(1, 2), None
