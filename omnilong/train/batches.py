"""From packed rows to micro-batches: which rows a rank reads at a step, labels shifted, videos decoded.

Labels in the shards are unshifted (label[i] is the token at i, or -100). They are shifted here,
on the full sequence and before any sequence-parallel sharding, so every rank's shard holds the
target of each of its positions: shifted[i] = label[i + 1]. The packer masks the first token
of every document, so no position learns to predict across a document boundary.

Which rows a rank reads at a step: omnilong/train/row_order.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from omnilong.config import Family, VideoTokenParams
from omnilong.data.shards import VideoClip
from omnilong.data.video_frames import VideoReadError, read_frames, video_info
from omnilong.models.video_inputs import VideoSpan, frame_size, preprocess_video, video_span
from omnilong.parallel.vision import FrameSplit, split_frames
from omnilong.train.row_order import RowOrder

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], shifted: labels[:, i] is the target of position i
    position_ids: torch.Tensor  # [B, L], or [3, B, L] (Qwen2.5-VL mRoPE)
    doc_lens: list[list[int]]  # per row; the rest of the row is padding
    videos: list[VideoSpan] = field(default_factory=list)
    """Every video of the batch, in the order of their placeholders."""
    video_pieces: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """Vision-encoder inputs of the units this rank encodes (`FrameSplit.unit_ranges`)."""
    tokens_per_rank: list[int] = field(default_factory=list)
    video_token_id: int | None = None
    frame_counts: list[int] = field(default_factory=list)
    """Frames sampled of each video of the batch (all of them, whichever this rank encodes)."""

    @property
    def num_valid(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return sum(sum(lens) for lens in self.doc_lens)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] unshifted -> [B, L] where position i holds the label of i + 1 (last: ignored)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def clip_span(clip: VideoClip, family: Family, model_config, video_params: VideoTokenParams) -> VideoSpan:
    span = video_span(family, model_config, video_params, len(clip.frame_indices), clip.height, clip.width)
    if span.num_tokens != clip.num_tokens:
        raise ValueError(
            f"{clip.path}: the packed data planned {clip.num_tokens} video tokens, model.video now gives "
            f"{span.num_tokens}; re-run `dvc repro` to prepare and pack again"
        )
    return span


class FramesUnreadable(VideoReadError):
    """Frames of `clips[video]` that could not be decoded (the message says why)."""

    def __init__(self, message: str, video: int):
        super().__init__(message)
        self.video = video


def load_video_pieces(
    clips: list[VideoClip], spans: list[VideoSpan], split: FrameSplit, family: Family, model_config,
    video_params: VideoTokenParams,
) -> list[dict[str, torch.Tensor]]:
    """Decode and preprocess only the frames of the units in `split`, resized batch by batch as
    they are decoded (so at most one decode batch of full-size frames is in memory). A video
    whose frames cannot be read raises `FramesUnreadable` naming it."""
    pieces = []
    for video, first, end in split.unit_ranges:
        clip, frames_per_unit = clips[video], spans[video].frames_per_unit
        indices = clip.frame_indices[first * frames_per_unit : end * frames_per_unit]
        size = frame_size(family, model_config, video_params, clip.height, clip.width)
        try:
            frames = read_frames(clip.path, indices, size=size)
        except VideoReadError as exc:
            raise FramesUnreadable(str(exc), video) from None
        pieces.append(preprocess_video(family, frames, model_config, video_params, fps=clip.sampled_fps))
    return pieces


def collate(
    rows: list[dict], *, family: Family, model_config, video_params: VideoTokenParams,
    sp_rank: int = 0, sp_size: int = 1,
) -> MicroBatch:
    """A micro-batch of packed rows; with sp_size > 1, with only rank `sp_rank`'s share of the frames."""
    position_ids = torch.stack([row["position_ids"] for row in rows], dim=-2)  # [B, L] or [3, B, L]
    clips = [clip for row in rows for clip in row.get("videos") or []]
    spans = [clip_span(clip, family, model_config, video_params) for clip in clips]
    split = split_frames(spans, sp_size, sp_rank)
    return MicroBatch(
        input_ids=torch.stack([row["input_ids"] for row in rows]).long(),
        labels=shift_labels(torch.stack([row["labels"] for row in rows]).long()),
        position_ids=position_ids.long(),
        doc_lens=[[int(n) for n in row["doc_lens"]] for row in rows],
        videos=spans,
        video_pieces=load_video_pieces(clips, spans, split, family, model_config, video_params) if clips else [],
        tokens_per_rank=split.tokens_per_rank if clips else [],
        video_token_id=video_token_id(family, model_config) if clips else None,
        frame_counts=[len(clip.frame_indices) for clip in clips],
    )


def video_token_id(family: Family, model_config) -> int:
    return model_config.video_token_id if family == "qwen2_5_vl" else model_config.video_token_index


@dataclass(frozen=True)
class RowChoice:
    """What fills a slot of a micro-batch: a row of the step's length, its labels kept or all ignored."""

    row: int
    labels_ignored: bool = False


@dataclass
class StepData:
    """What a rank trains on at one optimizer step, and the rows it had to skip to get it."""

    micro_batches: list[MicroBatch | None]
    """None where this rank could not decode the frames of a row (`undecodable`)."""
    skipped: list[str]
    """One line per row skipped because a video in it could not be read."""
    rows: list[list[RowChoice]]
    """Per micro-batch, what fills each slot: the row read there, or what took its place."""
    undecodable: dict[int, tuple[int, str]] = field(default_factory=dict)
    """micro-batch -> (slot, why): a frame of that slot's video failed to decode on this rank,
    after the video opened. The ranks agree on it and replace the row in the training process
    (omnilong/train/video_faults.py): a loader worker cannot reach the other ranks."""


class StepBatches(torch.utils.data.Dataset):
    """Optimizer step -> this rank's micro-batches, for a DataLoader.

    Run in DataLoader workers, so videos decode while the previous step trains; each rank of a
    sequence-parallel group decodes only the frames it encodes. A row with a video that cannot
    be opened is skipped (with its reason, for the step log) and a row that no rank reads in
    this epoch takes its place (`RowOrder.replacement`); when none is left, a readable row with
    every label ignored does, so the micro-batch still runs and the collectives stay in step.
    Every rank of the group runs the same checks on the same rows, so they choose alike. A frame
    that fails to decode after the video opened is only reported (`StepData.undecodable`): the
    ranks decode different frames, so only the training process, which can reach the others,
    decides (omnilong/train/video_faults.py, which calls `rebuild`).
    """

    def __init__(
        self, datasets: dict[Hashable, torch.utils.data.Dataset], packed_set_at, micro_batch_size_at, *, num_steps: int,
        grad_accum_steps: int, dp_rank: int, dp_size: int, sp_rank: int, sp_size: int,
        seed: int, family: Family, model_config, video_params: VideoTokenParams,
    ):
        self.datasets, self.packed_set_at, self.num_steps = datasets, packed_set_at, num_steps
        self.grad_accum_steps, self.dp_rank, self.sp_rank, self.sp_size = grad_accum_steps, dp_rank, sp_rank, sp_size
        self.dp_size = dp_size
        self.family, self.model_config, self.video_params = family, model_config, video_params
        self.order = RowOrder(
            {packed: len(dataset) for packed, dataset in datasets.items()}, packed_set_at, micro_batch_size_at,
            num_steps=num_steps, grad_accum_steps=grad_accum_steps, dp_size=dp_size, seed=seed,
        )
        self._video_errors: dict[tuple[Hashable, int], str | None] = {}
        """(packed set, row) -> why a video of the row does not open (None: all open). Kept: finding a
        replacement looks at every row read before it in the epoch."""

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> StepData:
        packed = self.packed_set_at(step)
        skipped: list[str] = []
        rows = [
            [self._readable_row(packed, position, skipped)
             for position in self.order.positions(step, micro, self.dp_rank)]
            for micro in range(self.grad_accum_steps)
        ]
        return self.rebuild(step, StepData([None] * len(rows), skipped, rows), range(len(rows)))

    def rebuild(self, step: int, data: StepData, micros) -> StepData:
        """`data` with micro-batches `micros` collated (again) from the rows `data.rows` names."""
        packed = self.packed_set_at(step)
        micro_batches, undecodable = list(data.micro_batches), dict(data.undecodable)
        for micro in micros:
            items = [self.item(packed, choice) for choice in data.rows[micro]]
            undecodable.pop(micro, None)
            try:
                micro_batches[micro] = collate(items, family=self.family, model_config=self.model_config,
                                               video_params=self.video_params, sp_rank=self.sp_rank,
                                               sp_size=self.sp_size)
            except FramesUnreadable as exc:
                videos_through = itertools.accumulate(len(item.get("videos") or []) for item in items)
                slot = next(slot for slot, count in enumerate(videos_through) if exc.video < count)
                micro_batches[micro], undecodable[micro] = None, (slot, str(exc))
        return StepData(micro_batches, data.skipped, data.rows, undecodable)

    def item(self, packed: Hashable, choice: RowChoice) -> dict:
        item = self.datasets[packed][choice.row]
        return {**item, "labels": torch.full_like(item["labels"], IGNORE_INDEX)} if choice.labels_ignored else item

    def opens(self, packed: Hashable, row: int) -> bool:
        """Whether every video of the row opens (checked once per row)."""
        return self._video_error(packed, row) is None

    def _video_error(self, packed: Hashable, row: int) -> str | None:
        if (packed, row) not in self._video_errors:
            item = self.datasets[packed][row]
            self._video_errors[packed, row] = None
            for clip in item.get("videos") or []:
                try:
                    video_info(clip.path)
                except VideoReadError as exc:
                    self._video_errors[packed, row] = str(exc)
                    break
        return self._video_errors[packed, row]

    def _readable_row(self, packed: Hashable, position: int, skipped: list[str]) -> RowChoice:
        row = self.order.row_at(packed, position)
        error = self._video_error(packed, row)
        if error is None:
            return RowChoice(row)

        def readable(other: int) -> bool:
            return self.opens(packed, other)

        # Unopenable rows take the spares from the head of the remainder; rows whose frames fail
        # later take them from its end (video_faults.py), so the two never take the same row.
        replacement = self.order.replacement(packed, position, readable)
        if replacement is not None:
            skipped.append(f"{error} (row {row}; row {replacement}, read by no rank in this epoch, takes its place)")
            return RowChoice(replacement)
        stand_in = self.order.stand_in(packed, position, readable)
        if stand_in is None:
            raise VideoReadError(f"no row of the {packed} data has videos that open; one error: {error}")
        skipped.append(f"{error} (row {row}; no unread row is left in this epoch: row {stand_in} runs in its "
                       f"place with every label ignored)")
        return RowChoice(stand_in, labels_ignored=True)
