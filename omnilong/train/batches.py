"""From packed rows to micro-batches: which rows a rank reads at a step, labels shifted, videos decoded.

Labels in the shards are unshifted (label[i] is the token at i, or -100). They are shifted here,
on the full sequence and before any sequence-parallel sharding, so every rank's shard holds the
target of each of its positions: shifted[i] = label[i + 1]. The packer masks the first token
of every document, so no position learns to predict across a document boundary.

The row order is a pure function of (seed, epoch): a run resumed at step s reads exactly the
rows an uninterrupted run would have, without saving sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from omnilong.config import Family, VideoTokenParams
from omnilong.data.shards import VideoClip
from omnilong.data.video_frames import read_frames

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], shifted: labels[:, i] is the target of position i
    position_ids: torch.Tensor  # [B, L], or [3, B, L] (Qwen2.5-VL mRoPE)
    doc_lens: list[list[int]]  # per row; the rest of the row is padding
    videos: dict[str, torch.Tensor] = field(default_factory=dict)  # model kwargs, e.g. pixel_values_videos

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


def rows_for_step(
    num_rows: int, *, step: int, micro: int, micro_batch_size: int, grad_accum_steps: int,
    dp_rank: int, dp_size: int, seed: int,
) -> list[int]:
    """Row indices of one micro-batch: disjoint across data-parallel ranks, reshuffled every epoch."""
    rows_per_step = micro_batch_size * grad_accum_steps * dp_size
    first = step * rows_per_step + (micro * dp_size + dp_rank) * micro_batch_size
    picks = []
    for position in range(first, first + micro_batch_size):
        epoch, offset = divmod(position, num_rows)
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
        picks.append(int(order[offset]))
    return picks


def _video_inputs(
    clips: list[VideoClip], family: Family, model_config, video_params: VideoTokenParams
) -> dict[str, torch.Tensor]:
    from omnilong.models.video_inputs import preprocess_video

    per_clip = [
        preprocess_video(
            family, read_frames(clip.path, clip.frame_indices), model_config, video_params, fps=clip.sampled_fps
        )
        for clip in clips
    ]
    if not per_clip:
        return {}
    # Both families take the videos of a batch concatenated along dim 0 (Qwen2.5-VL: patches,
    # with one grid row per video; LLaVA-OneVision: one [T, C, S, S] entry per video).
    return {key: torch.cat([inputs[key] for inputs in per_clip]) for key in per_clip[0]}


def collate(
    rows: list[dict], *, family: Family, model_config, video_params: VideoTokenParams
) -> MicroBatch:
    position_ids = torch.stack([row["position_ids"] for row in rows], dim=-2)  # [B, L] or [3, B, L]
    clips = [clip for row in rows for clip in row.get("videos") or []]
    return MicroBatch(
        input_ids=torch.stack([row["input_ids"] for row in rows]).long(),
        labels=shift_labels(torch.stack([row["labels"] for row in rows]).long()),
        position_ids=position_ids.long(),
        doc_lens=[[int(n) for n in row["doc_lens"]] for row in rows],
        videos=_video_inputs(clips, family, model_config, video_params),
    )


def micro_batches(
    dataset: torch.utils.data.Dataset, *, step: int, micro_batch_size: int, grad_accum_steps: int,
    dp_rank: int, dp_size: int, seed: int, family: Family, model_config, video_params: VideoTokenParams,
) -> list[MicroBatch]:
    """The `grad_accum_steps` micro-batches this data-parallel rank trains on at optimizer step `step`."""
    return [
        collate(
            [dataset[i] for i in rows_for_step(
                len(dataset), step=step, micro=micro, micro_batch_size=micro_batch_size,
                grad_accum_steps=grad_accum_steps, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
            )],
            family=family, model_config=model_config, video_params=video_params,
        )
        for micro in range(grad_accum_steps)
    ]
