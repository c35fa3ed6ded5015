"""Which packed row each rank reads at each optimizer step, under a context schedule.

Each packed set (a row length, and for video the frames its videos show: `PackedSet`) has its
own dataset and its own order: epoch after epoch, each a permutation of that dataset seeded by
(seed, epoch). The steps that train on a set read its order onward from where the set's previous
step stopped, whatever phases ran between; so a phase starts at the head of its set's order, and
a phase that returns to an earlier set continues that set's epoch. A step reads consecutive rows
of its set's order, the data-parallel ranks side by side (every rank of a sequence-parallel group
reads its group's rows). A set is any hashable key; tests use plain lengths.

Drop-last: when fewer rows are left in an epoch than a step reads, the step starts the next
epoch and those rows (the epoch's unread remainder) are read by no rank; they take the places
of rows whose videos cannot be opened (`RowOrder.replacement`, from the remainder's head) or
whose frames fail to decode (`RowOrder.spare_rows`, from its end). A step that reads more rows than
the dataset has reads whole epochs and carries on into the next.

The order is a pure function of the seed and the schedule, so a run resumed at step s reads
exactly the rows an uninterrupted run would have, without saving sampler state.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Hashable

import numpy as np


@functools.lru_cache(maxsize=8)
def epoch_order(seed: int, num_rows: int, epoch: int) -> np.ndarray:
    """[num_rows]: the rows of one epoch, in the order they are read."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


class RowOrder:
    """The rows of every step of a run: `row_at(packed, position)` for each of `positions(...)`.

    A position counts the rows read from one set's order, over its epochs: `epoch, offset =
    divmod(position, num_rows)`.
    """

    def __init__(
        self, num_rows: dict[Hashable, int], packed_set_at: Callable[[int], Hashable],
        micro_batch_size_at: Callable[[int], int],
        *, num_steps: int, grad_accum_steps: int, dp_size: int, seed: int,
    ):
        self.num_rows, self.micro_batch_size_at, self.dp_size, self.seed = num_rows, micro_batch_size_at, dp_size, seed
        self._first_position: list[int] = []
        """Per step: the position of its first row in its set's order."""
        self._read_end: dict[tuple[Hashable, int], int] = {}
        """(packed, epoch) -> the offset where the run stops reading that epoch."""
        read = dict.fromkeys(num_rows, 0)  # per packed set: rows of its order read (or passed over) so far
        for step in range(num_steps):
            packed = packed_set_at(step)
            size, offset = num_rows[packed], read[packed] % num_rows[packed]
            step_rows = micro_batch_size_at(step) * grad_accum_steps * dp_size
            if offset and offset + step_rows > size:
                read[packed] += size - offset
            self._first_position.append(read[packed])
            read[packed] += step_rows
            for epoch in range(self._first_position[-1] // size, (read[packed] - 1) // size + 1):
                self._read_end[packed, epoch] = min(size, read[packed] - epoch * size)

    def positions(self, step: int, micro: int, dp_rank: int) -> range:
        """Positions of the rows of micro-batch `micro` of data-parallel rank `dp_rank` at `step`."""
        micro_batch_size = self.micro_batch_size_at(step)
        first = self._first_position[step] + (micro * self.dp_size + dp_rank) * micro_batch_size
        return range(first, first + micro_batch_size)

    def row_at(self, packed: Hashable, position: int) -> int:
        epoch, offset = divmod(position, self.num_rows[packed])
        return int(epoch_order(self.seed, self.num_rows[packed], epoch)[offset])

    def replacement(self, packed: Hashable, position: int, readable: Callable[[int], bool]) -> int | None:
        """A row of the epoch's unread remainder for the unreadable row at `position`; None when none is left.

        The epoch's unreadable rows take its readable unread rows in the epoch's order, so that
        no two take the same one and every rank agrees without a word between them.
        """
        epoch, offset = divmod(position, self.num_rows[packed])
        order = epoch_order(self.seed, self.num_rows[packed], epoch)
        unreadable_before = sum(not readable(int(row)) for row in order[:offset])
        unread = (int(row) for row in order[self._read_end[packed, epoch]:] if readable(int(row)))
        return next(itertools.islice(unread, unreadable_before, None), None)

    def spare_rows(self, packed: Hashable, position: int, opens: Callable[[int], bool]) -> list[int]:
        """The unread rows of `position`'s epoch that open and that no unopenable row takes, last first.

        `replacement` gives the unopenable rows of the epoch the remainder's first rows that open,
        one each; what is left after them, taken from the end, can replace rows that fail later
        (omnilong/train/video_faults.py) without ever meeting those. Looks at every row of the
        epoch (`opens` should be cached), unless no row of it is unread.
        """
        epoch = position // self.num_rows[packed]
        order = epoch_order(self.seed, self.num_rows[packed], epoch)
        read_end = self._read_end[packed, epoch]
        if read_end == len(order):
            return []
        taken_from_head = sum(not opens(int(row)) for row in order[:read_end])
        unread = [int(row) for row in order[read_end:] if opens(int(row))]
        return unread[taken_from_head:][::-1]

    def stand_in(self, packed: Hashable, position: int, readable: Callable[[int], bool]) -> int | None:
        """The first readable row after `position` in its epoch's order (wrapping round); None if none is."""
        epoch, offset = divmod(position, self.num_rows[packed])
        order = epoch_order(self.seed, self.num_rows[packed], epoch)
        return next((int(row) for row in np.roll(order, -offset - 1) if readable(int(row))), None)
