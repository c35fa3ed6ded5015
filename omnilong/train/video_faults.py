"""Frames that fail to decode after their video opened: every rank agrees, and the row is replaced.

A loader worker decodes only its rank's share of a row's frames (the ranks of a sequence-parallel
group encode different frames) and cannot reach the other ranks, so a frame that fails there is
only reported (`StepData.undecodable`). Here, in the training process and before the step trains,
one all-reduce over every rank tells each rank which slots of the step failed on any rank. Every
rank of the world takes part, not only the group: the rows that replace them come from one pool,
the epoch's unread remainder, shared by all data-parallel groups.

A failed slot takes a spare row (`RowOrder.spare_rows`: unread in its epoch by every rank, opens,
and left over by the rows whose videos do not open), the failures of a step in the order of their
positions, each the last spare not yet taken: every rank knows the same failures and the same
spares taken before, so they choose alike without another word. When no spare is left, a readable
row runs in the slot with every label ignored, so the micro-batch still runs forward and backward
and ZeRO-3's collectives stay in step. Either way the row counts as skipped. The replaced
micro-batches are decoded here; if a replacement fails in turn, the ranks agree again.

The spares taken go into each checkpoint (`state`, in its manifest) and come back on resume, so a
fault after a crash never takes a row that a fault before it took (a row read twice in an epoch).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.distributed as dist

from omnilong.data.video_frames import VideoReadError
from omnilong.train.batches import RowChoice, StepBatches, StepData


class VideoFaults:
    """Agreement on undecodable rows, step after step, for one rank's `StepBatches`."""

    def __init__(self, batches: StepBatches, device: torch.device, state: dict | None = None):
        """`state`: what `state()` returned when the checkpoint resumed from was written."""
        self.batches, self.device = batches, device
        self._packed_sets = list(batches.datasets)
        """In the stage's order: the state names a packed set by its number here."""
        self._taken: dict[tuple[Hashable, int], set[int]] = {
            (self._packed_sets[number], epoch): set(rows)
            for number, epoch, rows in (state or {}).get("spares_taken", [])
        }
        """(packed set, epoch) -> the spare rows taken so far."""
        self._undecodable: set[tuple[Hashable, int]] = set()
        """(packed set, row): rows of this rank's slots whose frames failed, never a stand-in."""

    def state(self) -> dict:
        """The spares taken, as JSON (the same on every rank: they choose alike)."""
        taken = sorted((self._packed_sets.index(packed), epoch, sorted(rows))
                       for (packed, epoch), rows in self._taken.items())
        return {"spares_taken": [list(entry) for entry in taken]}

    def agree(self, step: int, data: StepData) -> StepData:
        """Collective over every rank: `data` with each row whose frames failed on any rank of its
        sequence-parallel group replaced alike on all of them, and counted in `skipped`."""
        while failed := self._failed_slots(step, data):
            data = self._replace(step, data, failed)
        assert all(batch is not None for batch in data.micro_batches), "a micro-batch left undecoded"
        return data

    def _failed_slots(self, step: int, data: StepData) -> list[tuple[int, int, int]]:
        """(dp_rank, micro, slot) of every slot that failed on some rank, in the order of their positions."""
        batches = self.batches
        flags = torch.zeros(batches.dp_size, len(data.rows), len(data.rows[0]), dtype=torch.int64)
        for micro, (slot, _) in data.undecodable.items():
            flags[batches.dp_rank, micro, slot] = 1
        flags = flags.to(self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed = [tuple(index) for index in flags.nonzero().tolist()]
        return sorted(failed, key=lambda slot: batches.order.positions(step, slot[1], slot[0])[slot[2]])

    def _spare(self, packed: Hashable, position: int) -> int | None:
        order = self.batches.order
        taken = self._taken.setdefault((packed, position // order.num_rows[packed]), set())
        spares = order.spare_rows(packed, position, lambda row: self.batches.opens(packed, row))
        spare = next((row for row in spares if row not in taken), None)
        if spare is not None:
            taken.add(spare)
        return spare

    def _replace(self, step: int, data: StepData, failed: list[tuple[int, int, int]]) -> StepData:
        batches, packed = self.batches, self.batches.packed_set_at(step)
        rows, skipped = [list(choices) for choices in data.rows], list(data.skipped)
        for dp_rank, micro, slot in failed:
            position = batches.order.positions(step, micro, dp_rank)[slot]
            spare = self._spare(packed, position)  # on every rank, so all know which spares are taken
            if dp_rank != batches.dp_rank:
                continue
            row = rows[micro][slot].row
            self._undecodable.add((packed, row))
            reported = data.undecodable.get(micro)
            if reported and reported[0] == slot:
                why = reported[1]
            else:  # this rank decoded its share of the frames; another could not decode its own
                videos = ", ".join(clip.path for clip in batches.item(packed, rows[micro][slot])["videos"])
                why = f"{videos}: frames failed to decode on another rank of the sequence-parallel group"
            if spare is not None:
                rows[micro][slot] = RowChoice(spare)
                skipped.append(f"{why} (row {row}; row {spare}, read by no rank in this epoch, takes its place)")
                continue
            stand_in = batches.order.stand_in(
                packed, position,
                lambda other: batches.opens(packed, other) and (packed, other) not in self._undecodable,
            )
            if stand_in is None:
                raise VideoReadError(f"no row of the {packed} data has videos that decode; one error: {why}")
            rows[micro][slot] = RowChoice(stand_in, labels_ignored=True)
            skipped.append(f"{why} (row {row}; no unread row is left in this epoch: row {stand_in} runs in its "
                           f"place with every label ignored)")
        micros = sorted({micro for dp_rank, micro, _ in failed if dp_rank == batches.dp_rank})
        return batches.rebuild(step, StepData(data.micro_batches, skipped, rows, data.undecodable), micros)
