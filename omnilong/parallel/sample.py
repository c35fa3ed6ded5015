"""Sequence parallelism as a data transform: one packed sample in, one rank's shard out.

Everything that needs the whole sequence happens before sharding, by the caller: labels are
shifted (`omnilong.train.batches.shift_labels`, so a rank never needs its neighbour's tokens for
its targets) and position ids are computed on the full rows (Qwen2.5-VL's 3-D mRoPE needs the
whole video grid). The model
code does not change: it sees a shorter sequence, and ring attention, through
`hf_adapter.ring_attention_context(shard.documents, ...)`, sees where that sequence's tokens
sit in the full row and which documents they belong to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omnilong.parallel.documents import DocumentLayout
from omnilong.parallel.zigzag import SequenceLayout, shard_sequence, unshard_sequence


@dataclass(frozen=True)
class SequenceShard:
    """One rank's share of a batch of packed rows."""

    inputs: torch.Tensor
    """[B, S/P] token ids, or [B, S/P, hidden] merged input embeddings of a multimodal sample."""
    labels: torch.Tensor
    """[B, S/P] shifted: the token at local position i is trained to predict labels[:, i]."""
    position_ids: torch.Tensor
    """Sharded along the last dim, other dims as given: [B, S/P], or mRoPE [B, 3, S/P] / [3, B, S/P]."""
    documents: DocumentLayout
    """This rank's place in the row and the row's document boundaries, for ring attention."""


def shard_sample(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    doc_lens: Sequence[Sequence[int]],
    layout: SequenceLayout,
    rank: int,
) -> SequenceShard:
    """Rank `rank`'s shard of a packed batch.

    inputs: [B, S] token ids or [B, S, hidden] embeddings; labels: [B, S] already shifted;
    position_ids: positions of the full rows, sequence last ([B, S], [B, 3, S] or [3, B, S]);
    doc_lens[b]: row b's document lengths (the rest of the row is padding).
    """
    batch, seq_len = labels.shape
    if seq_len != layout.seq_len:
        raise ValueError(
            f"labels: expected rows of seq_len = {layout.seq_len} tokens, given shape {list(labels.shape)}"
        )
    if tuple(inputs.shape[:2]) != (batch, seq_len):
        raise ValueError(f"inputs: expected [B={batch}, S={seq_len}] or [B, S, hidden], given {list(inputs.shape)}")
    if position_ids.shape[-1] != seq_len or batch not in position_ids.shape[:-1]:
        raise ValueError(
            f"position_ids: expected the sequence ({seq_len}) last and the batch ({batch}) before it, "
            f"given {list(position_ids.shape)}"
        )
    if len(doc_lens) != batch:
        raise ValueError(f"doc_lens: expected one list of document lengths per row ({batch}), given {len(doc_lens)}")
    return SequenceShard(
        inputs=shard_sequence(inputs, layout, rank, dim=1),
        labels=shard_sequence(labels, layout, rank, dim=1),
        position_ids=shard_sequence(position_ids, layout, rank, dim=-1),
        documents=DocumentLayout(layout, rank, doc_lens),
    )


def unshard_sample(shards: Sequence[SequenceShard]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full (inputs, labels, position_ids) from every rank's shard, in rank order."""
    layout = shards[0].documents.sequence
    if [shard.documents.rank for shard in shards] != list(range(layout.sp_size)):
        raise ValueError(
            f"shards: expected one per rank in rank order 0..{layout.sp_size - 1}, given ranks "
            f"{[shard.documents.rank for shard in shards]}"
        )
    return (
        unshard_sequence([shard.inputs for shard in shards], layout, dim=1),
        unshard_sequence([shard.labels for shard in shards], layout, dim=1),
        unshard_sequence([shard.position_ids for shard in shards], layout, dim=-1),
    )
