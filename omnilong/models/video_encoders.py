"""Each family's vision encoder, run on any contiguous range of a batch's frames.

A video is a run of *units* (`VideoSpan`, omnilong/models/video_inputs.py) that the vision tower
encodes independently of each other:
Qwen2.5-VL's temporal patches (2 frames; its windowed and full attention never cross one) and
LLaVA-OneVision's frames (SigLIP and the pooling see one frame at a time). Encoding a range of
units therefore gives exactly the embeddings the whole video would give for those units, which
is what lets a sequence-parallel group split the frames (omnilong/parallel/vision.py).

These functions call the model's own submodules (vision tower, projector, merger); they change
nothing in the model. LLaVA-OneVision's pooling is ours, to make its size configurable
(`model.video.llava_onevision.tokens_per_frame`); at the model's own size it is transformers'.
"""

from __future__ import annotations

import math
import torch
from torch import nn
from transformers import PretrainedConfig

from omnilong.config import Family, VideoTokenParams


def llava_pooled_side(model_config: PretrainedConfig, video: VideoTokenParams) -> int:
    """LLaVA-OneVision: side of the square each frame's patch grid is pooled to."""
    grid = model_config.vision_config.image_size // model_config.vision_config.patch_size
    tokens = video.llava_onevision.tokens_per_frame
    if tokens is None:
        return math.ceil(grid / 2)  # transformers' apply_pooling
    side = math.isqrt(tokens)
    if side > grid:
        raise ValueError(
            f"model.video.llava_onevision.tokens_per_frame: expected at most the vision tower's "
            f"{grid} x {grid} = {grid * grid} patches per frame, given {tokens}"
        )
    return side


def encode_units(
    model: nn.Module, family: Family, video: VideoTokenParams, pieces: list[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """[tokens, hidden] embeddings of `pieces` in order, one tower call.

    A piece is `preprocess_video`'s output for a run of whole units of one video (for
    Qwen2.5-VL an even number of frames, or the video's last frames, padded as the whole video's).

    Without the trailing tokens: the caller places LLaVA-OneVision's `image_newline` itself.
    """
    decoder = model.model  # Qwen2_5_VLModel / LlavaOnevisionModel
    if family == "qwen2_5_vl":
        pixels = torch.cat([piece["pixel_values_videos"] for piece in pieces])
        grid_thw = torch.cat([piece["video_grid_thw"] for piece in pieces]).to(pixels.device)
        return decoder.visual(pixels.type(decoder.visual.dtype), grid_thw=grid_thw).pooler_output
    frames = torch.cat([piece["pixel_values_videos"].flatten(0, 1) for piece in pieces])  # [F, C, S, S]
    return _llava_frame_features(decoder, model.config, video, frames)


def _llava_frame_features(
    decoder: nn.Module, model_config: PretrainedConfig, video: VideoTokenParams, frames: torch.Tensor
) -> torch.Tensor:
    """[F * side * side, hidden]: what transformers' get_video_features computes, before the newline,
    with the pooled side configurable."""
    layer = model_config.vision_feature_layer
    tower = decoder.vision_tower(frames.type(decoder.vision_tower.dtype), output_hidden_states=True)
    layers = [layer] if isinstance(layer, int) else list(layer)
    features = torch.cat([tower.hidden_states[i] for i in layers], dim=-1)
    if model_config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    features = decoder.multi_modal_projector(features)  # [F, grid * grid, hidden]
    grid = model_config.vision_config.image_size // model_config.vision_config.patch_size
    side = llava_pooled_side(model_config, video)
    num_frames, _, hidden = features.shape
    grid_FHWC = features.view(num_frames, grid, grid, hidden).permute(0, 3, 1, 2)
    pooled = nn.functional.interpolate(grid_FHWC, size=[side, side], mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(num_frames * side * side, hidden)


def trailing_embedding(model: nn.Module, family: Family) -> torch.Tensor | None:
    """[1, hidden] embedding that ends every video, or None (Qwen2.5-VL's videos have none)."""
    return None if family == "qwen2_5_vl" else model.model.image_newline[None]
