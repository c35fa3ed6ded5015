"""Position ids of one whole document, computed before the sequence is sharded.

Qwen2.5-VL's 3-D mRoPE depends on the whole video grid, so ranks of a sequence-parallel group
cannot derive their shard's positions locally; they slice these instead.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, Qwen2_5_VLModel

from omnilong.models.families import family_for_config

# transformers' mm_token_type_ids values (1 marks images, which documents do not hold).
TEXT, VIDEO = 0, 2

_ROPE_MODELS: dict[str, Qwen2_5_VLModel] = {}


def _rope_model(model_config: PretrainedConfig) -> Qwen2_5_VLModel:
    """A weightless Qwen2.5-VL module (meta device) whose `get_rope_index` reads only its config."""
    key = model_config.to_json_string(use_diff=False)
    if key not in _ROPE_MODELS:
        with torch.device("meta"):
            _ROPE_MODELS[key] = Qwen2_5_VLModel(model_config)
    return _ROPE_MODELS[key]


def position_ids_for_document(
    model_config: PretrainedConfig,
    input_ids: torch.LongTensor,
    video_grid_thw: torch.LongTensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Qwen2.5-VL: mRoPE ids [3, L] (temporal, height, width); LLaVA-OneVision: arange [L].

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
    num_placeholders = int((input_ids == model_config.video_token_id).sum())
    merge = model_config.vision_config.spatial_merge_size
    expected = 0 if video_grid_thw is None else int(video_grid_thw.prod(-1).sum()) // merge**2
    if num_placeholders != expected:
        raise ValueError(
            f"input_ids: {num_placeholders} video placeholders, but video_grid_thw "
            f"{None if video_grid_thw is None else video_grid_thw.tolist()} needs {expected}"
        )
    # Without these types transformers silently falls back to 1-D positions.
    mm_token_type_ids = torch.full_like(input_ids, TEXT, dtype=torch.int)
    mm_token_type_ids[input_ids == model_config.video_token_id] = VIDEO
    position_ids, _ = _rope_model(model_config).get_rope_index(
        input_ids[None],
        mm_token_type_ids=mm_token_type_ids[None],
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
    )
    return position_ids[:, 0]  # [3, 1, L] -> [3, L]
