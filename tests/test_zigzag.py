"""Sharding index arithmetic, checked by looping over ranks in one process (no process groups)."""

from __future__ import annotations

import random

import pytest
import torch

from omnilong.parallel.documents import DocumentLayout, block_calls, document_bounds
from omnilong.parallel.sample import shard_sample, unshard_sample
from omnilong.parallel.zigzag import SequenceLayout, shard_sequence, unshard_sequence

SCHEMES = ("zigzag", "contiguous")


def test_zigzag_pairs_chunk_r_with_chunk_2p_minus_1_minus_r():
    layout = SequenceLayout(seq_len=16, sp_size=2)
    positions = torch.arange(16)
    assert shard_sequence(positions, layout, 0, dim=0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_sequence(positions, layout, 1, dim=0).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    contiguous = SequenceLayout(seq_len=16, sp_size=2, scheme="contiguous")
    assert shard_sequence(positions, contiguous, 1, dim=0).tolist() == list(range(8, 16))
    assert [layout.chunks(r) for r in range(2)] == [(0, 3), (1, 2)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("sp_size", [1, 2, 3, 4])
def test_shard_then_unshard_is_identity_for_every_tensor_kind(scheme, sp_size):
    seq_len = 24 * sp_size
    layout = SequenceLayout(seq_len, sp_size, scheme)
    generator = torch.Generator().manual_seed(sp_size)
    tensors = {  # (tensor, sequence dim)
        "input_ids [B, S]": (torch.randint(0, 1000, (2, seq_len), generator=generator), 1),
        "embeddings [B, S, H]": (torch.randn(2, seq_len, 8, generator=generator), 1),
        "mrope [B, 3, S]": (torch.randint(0, 99, (2, 3, seq_len), generator=generator), -1),
        "mrope [3, B, S]": (torch.randint(0, 99, (3, 2, seq_len), generator=generator), -1),
    }
    for name, (full, dim) in tensors.items():
        shards = [shard_sequence(full, layout, rank, dim) for rank in range(sp_size)]
        assert all(s.shape[dim] == seq_len // sp_size for s in shards), name
        assert torch.equal(unshard_sequence(shards, layout, dim), full), name
    # Every position is held by exactly one rank.
    held = torch.cat([shard_sequence(torch.arange(seq_len), layout, r, 0) for r in range(sp_size)])
    assert sorted(held.tolist()) == list(range(seq_len))


def test_shard_sample_and_unshard_sample_are_inverse():
    seq_len, sp_size = 48, 4
    layout = SequenceLayout(seq_len, sp_size)
    input_ids = torch.arange(2 * seq_len).view(2, seq_len)
    labels = input_ids + 1000
    position_ids = torch.arange(3 * 2 * seq_len).view(3, 2, seq_len)
    doc_lens = [[10, 30], [48]]
    shards = [shard_sample(input_ids, labels, position_ids, doc_lens, layout, rank) for rank in range(sp_size)]
    assert shards[1].inputs.shape == (2, 12) and shards[1].position_ids.shape == (3, 2, 12)
    assert shards[1].documents.rank == 1 and shards[1].documents.row_bounds == ((0, 10, 40, 48), (0, 48))
    # Labels travel with their tokens: shifting happened before, so each shard keeps its targets.
    assert torch.equal(shards[2].labels - 1000, shards[2].inputs)
    full = unshard_sample(shards)
    assert torch.equal(full[0], input_ids) and torch.equal(full[1], labels) and torch.equal(full[2], position_ids)


def test_shard_sample_names_what_is_wrong():
    layout = SequenceLayout(32, 2)
    ids = torch.zeros(1, 32, dtype=torch.long)
    with pytest.raises(ValueError, match="labels: expected rows of seq_len = 32"):
        shard_sample(ids[:, :16], ids[:, :16], ids[:, :16], [[16]], layout, 0)
    with pytest.raises(ValueError, match="doc_lens: expected one list"):
        shard_sample(ids, ids, ids, [[16], [16]], layout, 0)
    with pytest.raises(ValueError, match="doc_lens: expected lengths summing to at most seq_len = 32"):
        shard_sample(ids, ids, ids, [[20, 20]], layout, 0)
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < sp_size = 2"):
        shard_sample(ids, ids, ids, [[16]], layout, 2)


def test_layout_rejects_uneven_chunks():
    with pytest.raises(ValueError, match="seq_len: expected a positive multiple of 2 x sp_size = 8"):
        SequenceLayout(seq_len=20, sp_size=4)


def test_document_bounds_add_the_padding_tail_as_one_segment():
    assert document_bounds([5, 3], 16) == (0, 5, 8, 16)
    assert document_bounds([16], 16) == (0, 16)
    assert document_bounds([], 16) == (0, 16)
    with pytest.raises(ValueError, match="doc_lens: expected positive lengths"):
        document_bounds([5, 0], 16)


def _covered_pairs(layout: SequenceLayout, doc_lens: list[int]) -> torch.Tensor:
    """How many kernel calls, over all ranks and all key chunks, compute each (query, key) pair."""
    seq_len, chunk_len = layout.seq_len, layout.chunk_len
    count = torch.zeros(seq_len, seq_len, dtype=torch.int32)
    bounds = document_bounds(doc_lens, seq_len)
    for rank in range(layout.sp_size):
        for q_chunk in layout.chunks(rank):
            for k_chunk in range(2 * layout.sp_size):
                for call in block_calls(bounds, layout, q_chunk, k_chunk):
                    q0, k0 = q_chunk * chunk_len, k_chunk * chunk_len
                    block = torch.ones(call.q_end - call.q_start, call.k_end - call.k_start, dtype=torch.int32)
                    if call.causal:
                        assert (call.q_start, call.q_end) == (call.k_start, call.k_end)
                        block = block.tril()
                    count[q0 + call.q_start : q0 + call.q_end, k0 + call.k_start : k0 + call.k_end] += block
    return count


def _block_diagonal_causal(doc_lens: list[int], seq_len: int) -> torch.Tensor:
    segment = torch.zeros(seq_len, dtype=torch.long)
    bounds = document_bounds(doc_lens, seq_len)
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        segment[start:end] = index
    same_document = segment[:, None] == segment[None, :]
    return (same_document & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()).int()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("sp_size", [1, 2, 3, 4])
def test_kernel_calls_cover_exactly_the_block_diagonal_causal_mask(scheme, sp_size):
    layout = SequenceLayout(16 * sp_size, sp_size, scheme)
    rng = random.Random(sp_size)
    cases = [[layout.seq_len], [], [layout.chunk_len, layout.chunk_len], [1, 1, 3]]
    for _ in range(20):  # uneven documents, some padding, borders anywhere
        lens, room = [], layout.seq_len - rng.randrange(0, layout.chunk_len)
        while room > 0:
            lens.append(rng.randint(1, min(room, 2 * layout.chunk_len + 3)))
            room -= lens[-1]
        cases.append(lens)
    for doc_lens in cases:
        expected = _block_diagonal_causal(doc_lens, layout.seq_len)
        assert torch.equal(_covered_pairs(layout, doc_lens), expected), doc_lens


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    sp_size = 4
    for scheme, expected_imbalance in (("zigzag", 1.0), ("contiguous", 1.75)):
        layout = SequenceLayout(64 * sp_size, sp_size, scheme)
        work = [DocumentLayout(layout, rank, [[layout.seq_len]]).score_count() for rank in range(sp_size)]
        seq_len = layout.seq_len
        assert sum(work) == seq_len * (seq_len + 1) // 2  # the whole causal triangle, once
        assert max(work) / (sum(work) / sp_size) == pytest.approx(expected_imbalance, abs=0.005)
