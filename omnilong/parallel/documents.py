"""Document boundaries of packed rows, and the attention kernel calls they allow between chunks.

A packed row holds whole documents back to back, then padding; a token attends causally to
its own document only. The padding tail counts as one more segment so it attends to itself
alone (its positions restart at 0 too, see `omnilong.data.pack`).

Ring attention computes a rank's attention block by block: its query chunk against one key
chunk at a time. `block_calls` turns a block into per-document rectangles that the kernel runs
without any mask: the diagonal block (same chunk) gives one causal square per document; a key
chunk before the query chunk gives at most one full rectangle (only the document spanning the
chunk border can see across it); a key chunk after the query chunk gives nothing. No dense
[chunk x chunk] mask is ever built, so memory stays O(S/P).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from omnilong.parallel.zigzag import SequenceLayout

Bounds = tuple[int, ...]
"""Segment starts and the end: 0 = b0 < b1 < ... < bn = seq_len; segment i is [b_i, b_i+1)."""


def document_bounds(doc_lens: Sequence[int], seq_len: int) -> Bounds:
    """Bounds of one row: its documents in order, then the padding tail (if any) as one segment."""
    lengths = [int(n) for n in doc_lens]
    if any(n <= 0 for n in lengths):
        raise ValueError(f"doc_lens: expected positive lengths, given {lengths}")
    if sum(lengths) > seq_len:
        raise ValueError(f"doc_lens: expected lengths summing to at most seq_len = {seq_len}, given sum {sum(lengths)}")
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    if bounds[-1] < seq_len:
        bounds.append(seq_len)
    return tuple(bounds)


class KernelCall(NamedTuple):
    """Rows [q_start, q_end) of the query chunk attend keys [k_start, k_end) of the key chunk
    (chunk-local indices), causally on the diagonal (then the two ranges are the same tokens)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool

    @property
    def score_count(self) -> int:
        """Query-key pairs this call computes."""
        q_len, k_len = self.q_end - self.q_start, self.k_end - self.k_start
        return q_len * (q_len + 1) // 2 if self.causal else q_len * k_len


def block_calls(bounds: Bounds, layout: SequenceLayout, q_chunk: int, k_chunk: int) -> list[KernelCall]:
    """The kernel calls that compute query chunk `q_chunk` against key chunk `k_chunk`."""
    if k_chunk > q_chunk:
        return []
    q0, q1 = layout.chunk_span(q_chunk)
    k0, k1 = layout.chunk_span(k_chunk)
    if k_chunk == q_chunk:
        calls = []
        segment = bisect.bisect_right(bounds, q0) - 1
        while segment < len(bounds) - 1 and bounds[segment] < q1:
            start, end = max(bounds[segment], q0), min(bounds[segment + 1], q1)
            calls.append(KernelCall(start - q0, end - q0, start - q0, end - q0, causal=True))
            segment += 1
        return calls
    # Only the segment holding the query chunk's first token can also hold keys before it.
    segment = bisect.bisect_right(bounds, q0) - 1
    start, end = bounds[segment], bounds[segment + 1]
    if start >= k1:
        return []
    return [KernelCall(0, min(end, q1) - q0, max(start, k0) - k0, k1 - k0, causal=False)]


@dataclass(frozen=True)
class DocumentLayout:
    """One rank's view of a batch's documents: what ring attention needs besides q/k/v."""

    sequence: SequenceLayout
    rank: int
    doc_lens: tuple[tuple[int, ...], ...]
    """Document lengths of each batch row (every rank of the group holds all of them)."""
    row_bounds: tuple[Bounds, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.sequence.chunks(self.rank)  # validates the rank
        doc_lens = tuple(tuple(int(n) for n in lens) for lens in self.doc_lens)
        object.__setattr__(self, "doc_lens", doc_lens)
        object.__setattr__(
            self, "row_bounds", tuple(document_bounds(lens, self.sequence.seq_len) for lens in doc_lens)
        )

    def row_groups(self) -> list[tuple[slice, Bounds]]:
        """Runs of consecutive rows with the same bounds, so identical rows share kernel calls."""
        groups: list[tuple[slice, Bounds]] = []
        for row, bounds in enumerate(self.row_bounds):
            if groups and groups[-1][1] == bounds:
                groups[-1] = (slice(groups[-1][0].start, row + 1), bounds)
            else:
                groups.append((slice(row, row + 1), bounds))
        return groups

    def block_plan(self, q_chunk: int, k_chunk: int) -> list[tuple[slice, list[KernelCall]]]:
        """The kernel calls of block (q_chunk, k_chunk) for each group of rows; empty groups left out."""
        plan = []
        for rows, bounds in self.row_groups():
            calls = block_calls(bounds, self.sequence, q_chunk, k_chunk)
            if calls:
                plan.append((rows, calls))
        return plan

    def score_count(self) -> int:
        """Query-key pairs this rank computes over the whole ring (its causal work)."""
        return sum(
            (rows.stop - rows.start) * call.score_count
            for q_chunk in self.sequence.chunks(self.rank)
            for k_chunk in range(2 * self.sequence.sp_size)
            for rows, calls in self.block_plan(q_chunk, k_chunk)
            for call in calls
        )
