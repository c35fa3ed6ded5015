"""Synthetic packed rows (as `PackedShards` gives them), for measuring a training step without a corpus.

- `synthetic_row`: one document of random tokens filling the row (the text stages).
- `video_row`: one document of a synthetic video's placeholders with random text around it,
  filling the row (the video stage). The video is an mp4 written by `write_probe_video` with as
  many frames as the stage's `video_frames` sample at most, at the largest frame size the
  model's video settings keep, so the row holds the most visual tokens the stage can give one
  video; the row is built as the packer builds one (labels unshifted, the first token and the
  placeholders masked, positions from `position_ids_for_document`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig

from omnilong.config import Family, FrameSampling, VideoTokenParams
from omnilong.data.prepare import VideoContext, video_clip
from omnilong.data.shards import VideoClip
from omnilong.data.synth.video import encode_mp4
from omnilong.data.video_frames import sample_frames, video_info
from omnilong.models.positions import position_ids_for_document
from omnilong.models.video_inputs import frame_size
from omnilong.train.batches import IGNORE_INDEX, video_token_id

TEXT_BEFORE_VIDEO = 2
"""Text tokens before the video, as a chat's opening precedes it; the rest of the text follows it."""
_LARGER_THAN_ANY_FRAME = 1 << 15
"""Pixels per side of a frame the model's video settings certainly resize down."""


def synthetic_row(seq_len: int, vocab_size: int) -> dict:
    """A packed row holding one document of `seq_len` random tokens (the same on every rank)."""
    generator = torch.Generator().manual_seed(seq_len)
    input_ids = torch.randint(0, vocab_size, (seq_len,), generator=generator)
    labels = input_ids.clone()
    labels[0] = IGNORE_INDEX  # the packer masks a document's first token
    return {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(seq_len),
            "doc_lens": torch.tensor([seq_len])}


def frames_sampled_at_most(sampling: FrameSampling) -> int:
    """The most frames `sampling` takes from one video; ValueError when it sets no bound."""
    if sampling.num_frames is not None:
        return sampling.num_frames
    if sampling.max_frames is None:
        raise ValueError(
            f"video_frames: expected a frame count to probe with ({{num_frames: N}} or {{fps: F, max_frames: N}}), "
            f"given {sampling.model_dump(exclude_none=True)}: fps alone takes more frames the longer the video"
        )
    return sampling.max_frames


def write_probe_video(
    path: Path, sampling: FrameSampling, family: Family, model_config: PretrainedConfig, video: VideoTokenParams
) -> None:
    """An mp4 of which `sampling` takes `frames_sampled_at_most` frames, each of the largest size
    `video` keeps (a larger frame is resized down to it, so it would give no more tokens)."""
    height, width = frame_size(family, model_config, video, _LARGER_THAN_ANY_FRAME, _LARGER_THAN_ANY_FRAME)
    height, width = height + height % 2, width + width % 2  # yuv420p needs even sides
    frames_wanted = frames_sampled_at_most(sampling)
    # fps sampling takes a frame every 1 / fps seconds: the video lasts long enough to give the cap.
    rate = math.ceil(sampling.fps) if sampling.fps else 1
    num_frames = frames_wanted if sampling.fps is None else math.ceil(frames_wanted * rate / sampling.fps)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    frames = [np.broadcast_to((gradient + 8 * k) % 256, (height, width, 3)).astype(np.uint8) for k in range(num_frames)]
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_mp4(frames, path, rate)


def probe_clip(
    video_path: Path, sampling: FrameSampling, family: Family, model_config: PretrainedConfig,
    video: VideoTokenParams,
) -> VideoClip:
    """The clip the packer would record for the video at `video_path`, placed after the opening text."""
    context = VideoContext(family, model_config, video, sampling, video_token_id(family, model_config), Path.cwd())
    info = video_info(video_path)
    return video_clip(context, "probe", video_path, info, sample_frames(info, sampling), TEXT_BEFORE_VIDEO)


def shortest_video_row(clip: VideoClip) -> int:
    """Tokens of the shortest row `video_row` can make around `clip`: one trained text token after it."""
    return TEXT_BEFORE_VIDEO + clip.num_tokens + 1


def video_row(seq_len: int, clip: VideoClip, family: Family, model_config: PretrainedConfig) -> dict:
    """A packed row of one document: opening text, the clip's placeholders, text to `seq_len`."""
    if seq_len < shortest_video_row(clip):
        raise ValueError(f"seq_len: expected at least {shortest_video_row(clip)} to hold the video, given {seq_len}")
    vocab_size = model_config.text_config.vocab_size
    placeholder = video_token_id(family, model_config)
    generator = torch.Generator().manual_seed(seq_len)
    text = torch.randint(0, vocab_size, (seq_len - clip.num_tokens,), generator=generator)
    # Random text must not hold the families' image or video placeholders: they stand for pixels.
    special = [getattr(model_config, key, None) for key in
               ("image_token_id", "video_token_id", "image_token_index", "video_token_index")]
    text[torch.isin(text, torch.tensor([token for token in special if token is not None]))] = 0
    input_ids = torch.cat([text[:TEXT_BEFORE_VIDEO], torch.full((clip.num_tokens,), placeholder),
                           text[TEXT_BEFORE_VIDEO:]])
    labels = torch.where(input_ids == placeholder, IGNORE_INDEX, input_ids)
    labels[0] = IGNORE_INDEX  # the packer masks a document's first token
    grid = torch.tensor([clip.grid_thw]) if clip.grid_thw else None
    seconds = torch.tensor([clip.second_per_grid_t]) if clip.second_per_grid_t else None
    return {"input_ids": input_ids, "labels": labels,
            "position_ids": position_ids_for_document(model_config, input_ids, grid, seconds),
            "doc_lens": torch.tensor([seq_len]), "videos": [clip]}
