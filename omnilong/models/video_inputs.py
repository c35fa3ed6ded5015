"""Decoded frames -> the video tensors each family's forward takes, and how many placeholders they fill.

transformers' own video processors need torchvision, which has no CPU build here, so this does
their work: the same PIL bicubic resize and float arithmetic as the families' image processors,
then the family's layout (Qwen2.5-VL's flattened patches, LLaVA-OneVision's frame stack).
`num_video_tokens` gives the placeholder count from the frame count and size alone, so packing
can plan sequences before any frame is decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import PretrainedConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from omnilong.config import VideoTokenParams
from omnilong.models.families import FamilySpec, get_family
from omnilong.models.video_encoders import llava_pooled_side

RESCALE_FACTOR = 1 / 255


def preprocess_video(
    family: str,
    frames: np.ndarray,
    model_config: PretrainedConfig,
    video: VideoTokenParams,
    fps: float | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for one video of uint8 frames [T, H, W, 3].

    Qwen2.5-VL: `pixel_values_videos` [grid_t * grid_h * grid_w, 3 * 2 * 14 * 14],
    `video_grid_thw` [1, 3] and `second_per_grid_ts` [1] (seconds per temporal patch, from the
    `fps` of the given frames; 1.0 when unknown, transformers' default).
    LLaVA-OneVision: `pixel_values_videos` [1, T, 3, S, S], S the vision tower's input side.
    """
    spec = get_family(family)
    _check_frames(frames)
    if spec.name == "qwen2_5_vl":
        return _qwen2_5_vl_inputs(spec, frames, model_config, video, fps)
    side = model_config.vision_config.image_size
    pixels_TCSS = _resize_and_normalise(frames, side, side, spec)
    return {"pixel_values_videos": pixels_TCSS.unsqueeze(0)}


@dataclass(frozen=True)
class VideoSpan:
    """A video's visual tokens as runs of *units* the vision tower encodes independently:
    Qwen2.5-VL's temporal patches, LLaVA-OneVision's frames (omnilong/models/video_encoders.py)."""

    num_units: int
    frames_per_unit: int
    tokens_per_unit: int
    trailing_tokens: int
    """Tokens after the last unit's: LLaVA-OneVision's one `image_newline` per video."""

    @property
    def num_tokens(self) -> int:
        return self.num_units * self.tokens_per_unit + self.trailing_tokens


def video_span(
    family: str, model_config: PretrainedConfig, video: VideoTokenParams, num_frames: int, height: int, width: int
) -> VideoSpan:
    """The units of `num_frames` frames of height x width pixels, known before decoding."""
    spec = get_family(family)
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, given {num_frames}")
    vision = model_config.vision_config
    if spec.name == "qwen2_5_vl":
        grid_t, grid_h, grid_w = video_grid_thw(model_config, video, num_frames, height, width)
        # The vision merger folds each merge x merge block of patches into one token.
        return VideoSpan(grid_t, vision.temporal_patch_size, grid_h * grid_w // vision.spatial_merge_size**2, 0)
    # Every frame is resized to the tower's square input and its patch grid pooled to a
    # square; one image_newline embedding follows the whole video.
    return VideoSpan(num_frames, 1, llava_pooled_side(model_config, video) ** 2, 1)


def num_video_tokens(
    family: str,
    model_config: PretrainedConfig,
    video: VideoTokenParams,
    num_frames: int,
    height: int,
    width: int,
) -> int:
    """Video placeholders the model fills for `num_frames` frames of height x width pixels."""
    return video_span(family, model_config, video, num_frames, height, width).num_tokens


def fewest_video_tokens(family: str, model_config: PretrainedConfig, video: VideoTokenParams, num_frames: int) -> int:
    """Video placeholders of `num_frames` frames at the smallest size `video` lets a frame take:
    Qwen2.5-VL scales any frame up to `min_pixels`; LLaVA-OneVision's count ignores the size."""
    side = model_config.vision_config.patch_size * getattr(model_config.vision_config, "spatial_merge_size", 1)
    return num_video_tokens(family, model_config, video, num_frames, side, side)


def frame_size(
    family: str, model_config: PretrainedConfig, video: VideoTokenParams, height: int, width: int
) -> tuple[int, int]:
    """(height, width) `preprocess_video` resizes frames of height x width to, so a decoder can
    resize each batch as it decodes and never hold many full-size frames."""
    if get_family(family).name == "qwen2_5_vl":
        return _qwen2_5_vl_frame_size(model_config, video, height, width)
    side = model_config.vision_config.image_size
    return side, side


def video_grid_thw(
    model_config: PretrainedConfig, video: VideoTokenParams, num_frames: int, height: int, width: int
) -> tuple[int, int, int]:
    """Qwen2.5-VL: the (temporal, height, width) patch grid `preprocess_video` gives for such frames."""
    vision = model_config.vision_config
    resized_height, resized_width = _qwen2_5_vl_frame_size(model_config, video, height, width)
    return (
        math.ceil(num_frames / vision.temporal_patch_size),
        resized_height // vision.patch_size,
        resized_width // vision.patch_size,
    )


def seconds_per_grid(model_config: PretrainedConfig, fps: float | None) -> float:
    """Qwen2.5-VL: seconds one temporal patch spans for frames played at `fps`.

    Unknown `fps` gives 1.0, what transformers assumes when `second_per_grid_ts` is absent.
    """
    if fps is None:
        return 1.0
    if fps <= 0:
        raise ValueError(f"fps: expected a positive frame rate, given {fps}")
    return model_config.vision_config.temporal_patch_size / fps


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise TypeError(
            f"frames: expected a uint8 numpy array [T, H, W, 3], given "
            f"{type(frames).__name__} of dtype {getattr(frames, 'dtype', None)}"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames: expected shape [T >= 1, H, W, 3], given {list(frames.shape)}")


def _qwen2_5_vl_frame_size(
    model_config: PretrainedConfig, video: VideoTokenParams, height: int, width: int
) -> tuple[int, int]:
    vision = model_config.vision_config
    return smart_resize(
        height,
        width,
        factor=vision.patch_size * vision.spatial_merge_size,
        min_pixels=video.qwen2_5_vl.min_pixels,
        max_pixels=video.qwen2_5_vl.max_pixels,
    )


def _resize_and_normalise(frames: np.ndarray, height: int, width: int, spec: FamilySpec) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, height, width], normalised with the family's statistics.

    Resizing on uint8 with PIL and rescaling in float64 before the float32 normalisation is what
    the families' image processors do; doing the same keeps our pixels equal to theirs.
    """
    resized = np.stack(
        [
            np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
            for frame in frames
        ]
    )
    pixels = (torch.from_numpy(resized).permute(0, 3, 1, 2).double() * RESCALE_FACTOR).float()
    mean = torch.tensor(spec.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _qwen2_5_vl_inputs(
    spec: FamilySpec,
    frames: np.ndarray,
    model_config: PretrainedConfig,
    video: VideoTokenParams,
    fps: float | None,
) -> dict[str, torch.Tensor]:
    vision = model_config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    num_frames, height, width, _ = frames.shape
    grid_t, grid_h, grid_w = video_grid_thw(model_config, video, num_frames, height, width)
    pixels_TCHW = _resize_and_normalise(frames, grid_h * patch, grid_w * patch, spec)
    # The temporal patch spans `temporal` frames: repeat the last frame to fill the final one.
    if pad := grid_t * temporal - num_frames:
        pixels_TCHW = torch.cat([pixels_TCHW, pixels_TCHW[-1:].expand(pad, -1, -1, -1)])
    channels = pixels_TCHW.shape[1]
    patches = pixels_TCHW.reshape(
        grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
    )
    # Order patches so each merge x merge block is contiguous (the merger reads them in runs
    # of merge**2), and flatten each patch as (channel, time, row, column) like the conv3d
    # patch embedding expects.
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values_videos = patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)
    return {
        "pixel_values_videos": pixel_values_videos,
        "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long),
        "second_per_grid_ts": torch.tensor([seconds_per_grid(model_config, fps)], dtype=torch.float32),
    }
