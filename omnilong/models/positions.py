"""Position ids of one whole document, computed before the sequence is sharded.

Qwen2.5-VL's 3-D mRoPE depends on the whole video grid, so ranks of a sequence-parallel group
cannot derive their shard's positions locally; they slice these instead. Packing (training),
`generate` and the evaluation harnesses all take their positions from here.

The rule is the one the released Qwen2.5-VL weights were trained with, implemented here rather
than taken from the installed transformers: from 5.2 on, its `get_rope_index` continues the text
after a video at (the video's start + max(h, w) / merge) instead of after the video's largest
position, which puts the question and answer after a long video inside the video's time range.
"""

from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig

from omnilong.models.families import family_for_config


def mrope_position_ids(
    input_ids: torch.LongTensor,
    video_token_id: int,
    video_grid_thw: torch.LongTensor | None,
    second_per_grid_ts: torch.Tensor | None,
    spatial_merge_size: int,
    tokens_per_second: float,
) -> torch.LongTensor:
    """[3, L] (temporal, height, width) position ids of one document `input_ids` [L].

    Spec (the original Qwen2.5-VL rule):
    - a run of text tokens gets equal ids in all three rows, increasing by 1 from
      (the maximum position of everything before it) + 1, or from 0 at the start of the document;
    - video v (the v-th run of `video_grid_thw[v].prod() / merge**2` placeholders) with patch grid
      (T, H, W) and merged grid (T, H / merge, W / merge), its tokens in (k, i, j) order, gives
      temporal patch k and merged cell (i, j) the ids
      (s + floor(k * second_per_grid_t * tokens_per_second), s + i, s + j),
      where s = (the maximum position of everything before it) + 1;
    - the next text run (or video) starts at the maximum of those ids + 1.
    `second_per_grid_ts` None means 1.0 second per temporal patch for every video.
    """
    is_video = input_ids == video_token_id
    num_placeholders = int(is_video.sum())
    expected = 0 if video_grid_thw is None else int(video_grid_thw.prod(-1).sum()) // spatial_merge_size**2
    if num_placeholders != expected:
        raise ValueError(
            f"input_ids: {num_placeholders} video placeholders, but video_grid_thw "
            f"{None if video_grid_thw is None else video_grid_thw.tolist()} needs {expected}"
        )
    num_videos = 0 if video_grid_thw is None else len(video_grid_thw)
    seconds = [1.0] * num_videos if second_per_grid_ts is None else [float(s) for s in second_per_grid_ts]
    pieces, start, video, cursor = [], 0, 0, 0
    kinds, lengths = torch.unique_consecutive(is_video, return_counts=True)
    for run_is_video, run_length in zip(kinds.tolist(), lengths.tolist()):
        run_end = cursor + run_length
        if not run_is_video:
            pieces.append(torch.arange(start, start + run_length).expand(3, -1))
            start += run_length
            cursor = run_end
            continue
        # Videos shown back to back form one run of placeholders: take them one grid at a time.
        while cursor < run_end:
            grid_t, grid_h, grid_w = (int(n) for n in video_grid_thw[video])
            height, width = grid_h // spatial_merge_size, grid_w // spatial_merge_size
            if cursor + grid_t * height * width > run_end:
                raise ValueError(
                    f"input_ids: video {video} (grid {[grid_t, grid_h, grid_w]}) needs {grid_t * height * width} "
                    f"placeholders in a row at {cursor}, the run holds {run_end - cursor}"
                )
            temporal = [math.floor(k * seconds[video] * tokens_per_second) for k in range(grid_t)]
            ids = torch.stack(torch.meshgrid(
                torch.tensor(temporal), torch.arange(height), torch.arange(width), indexing="ij"
            )).reshape(3, -1) + start
            pieces.append(ids)
            start = int(ids.max()) + 1
            cursor += ids.shape[1]
            video += 1
    return torch.cat(pieces or [torch.zeros(3, 0, dtype=torch.long)], dim=1).to(input_ids.device)


def next_text_position(position_ids: torch.Tensor) -> int:
    """Where text appended to a document with `position_ids` ([L] or [3, L]) starts: the rule's
    next text run, at the largest position + 1. Decoded and teacher-forced answers go here, which
    is where training's document (prompt and answer together) puts them."""
    return int(position_ids.max()) + 1 if position_ids.numel() else 0


def position_ids_for_document(
    model_config: PretrainedConfig,
    input_ids: torch.LongTensor,
    video_grid_thw: torch.LongTensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Qwen2.5-VL: mRoPE ids [3, L] (temporal, height, width, see `mrope_position_ids`);
    LLaVA-OneVision: arange [L].

    `input_ids` [L] holds the document with its video placeholders already expanded;
    `video_grid_thw` [num_videos, 3] and `second_per_grid_ts` [num_videos] are what
    `preprocess_video` returned for its videos, in order.
    """
    if input_ids.ndim != 1:
        raise ValueError(f"input_ids: expected one document of shape [L], given {list(input_ids.shape)}")
    family = family_for_config(model_config)
    if family.name != "qwen2_5_vl":
        return torch.arange(input_ids.shape[0], device=input_ids.device)
    if (input_ids == model_config.image_token_id).any():
        raise ValueError("input_ids: image placeholders are not supported, only videos")
    vision = model_config.vision_config
    return mrope_position_ids(
        input_ids, model_config.video_token_id, video_grid_thw, second_per_grid_ts,
        vision.spatial_merge_size, vision.tokens_per_second,
    )
