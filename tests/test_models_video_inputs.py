"""Our video preprocessing equals the families' image processors frame by frame, and
`num_video_tokens` is exactly the placeholder count the models consume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnilong.config import QwenVideoParams, VideoTokenParams
from omnilong.models.loading import load_image_processor, load_model
from omnilong.models.video_inputs import num_video_tokens, preprocess_video, seconds_per_grid

VIDEO = VideoTokenParams()
# Same PIL resize and float arithmetic as the image processors; the bound only allows for a
# different float32 evaluation order of the normalisation.
PIXEL_TOLERANCE = {"rtol": 0.0, "atol": 1e-6}


def random_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3] with smooth structure plus noise, so resampling errors would show."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, height)[None, :, None, None]
    cols = np.linspace(0, 1, width)[None, None, :, None]
    phase = np.arange(num_frames)[:, None, None, None] / max(num_frames, 1)
    base = 127 + 100 * np.sin(6 * rows + 4 * cols + 3 * phase + np.array([0.0, 1.0, 2.0]))
    return np.clip(base + rng.normal(0, 20, (num_frames, height, width, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2_5_vl")
    return load_model(model_dir).eval(), load_image_processor(model_dir)


@pytest.fixture(scope="module")
def llava(tiny_model_dir):
    model_dir = tiny_model_dir("llava_onevision")
    return load_model(model_dir).eval(), load_image_processor(model_dir)


@pytest.mark.parametrize(("num_frames", "height", "width"), [(5, 64, 80), (4, 150, 200), (2, 20, 30)])
def test_qwen_patches_equal_the_image_processor_per_frame(qwen, num_frames, height, width):
    model, image_processor = qwen
    vision = model.config.vision_config
    frames = random_frames(num_frames, height, width)
    ours = preprocess_video("qwen2_5_vl", frames, model.config, VIDEO, fps=2.0)
    grid_t, grid_h, grid_w = ours["video_grid_thw"][0].tolist()
    assert grid_t == -(-num_frames // vision.temporal_patch_size)
    assert ours["pixel_values_videos"].shape == (
        grid_t * grid_h * grid_w,
        3 * vision.temporal_patch_size * vision.patch_size**2,
    )
    # Patch vector layout: (channel, time, row, column). The image processor treats one frame as
    # a still (its time slots are copies), with the same patch order within a frame, so time
    # slot s of temporal patch t must equal frame 2t + s (the last frame repeats as padding).
    ours_by_time = ours["pixel_values_videos"].reshape(
        grid_t, grid_h * grid_w, 3, vision.temporal_patch_size, vision.patch_size, vision.patch_size
    )
    for t in range(grid_t):
        for slot in range(vision.temporal_patch_size):
            frame = frames[min(t * vision.temporal_patch_size + slot, num_frames - 1)]
            theirs = image_processor(images=[frame], return_tensors="pt")
            assert theirs["image_grid_thw"].tolist() == [[1, grid_h, grid_w]]
            theirs_patches = theirs["pixel_values"].reshape(
                grid_h * grid_w, 3, vision.temporal_patch_size, vision.patch_size, vision.patch_size
            )[:, :, 0]
            torch.testing.assert_close(ours_by_time[t, :, :, slot], theirs_patches, **PIXEL_TOLERANCE)


def test_qwen_pairs_of_equal_frames_equal_the_image_processor_output(qwen):
    """The whole tensor at once: a video of one frame shown twice is exactly an image."""
    model, image_processor = qwen
    frame = random_frames(1, 90, 120, seed=3)
    ours = preprocess_video("qwen2_5_vl", np.repeat(frame, 2, axis=0), model.config, VIDEO)
    theirs = image_processor(images=[frame[0]], return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values"], **PIXEL_TOLERANCE)
    torch.testing.assert_close(ours["video_grid_thw"], theirs["image_grid_thw"], rtol=0, atol=0)


def test_qwen_resize_follows_the_pixel_budget(qwen):
    model, _ = qwen
    budget = VideoTokenParams(qwen2_5_vl=QwenVideoParams(min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 16))
    ours = preprocess_video("qwen2_5_vl", random_frames(2, 64, 64), model.config, budget)
    assert ours["video_grid_thw"].tolist() == [[1, 8, 8]]  # 112 x 112 pixels, 14-pixel patches


def test_seconds_per_grid_come_from_fps(qwen):
    model, _ = qwen
    frames = random_frames(4, 56, 56)
    assert preprocess_video("qwen2_5_vl", frames, model.config, VIDEO, fps=4.0)["second_per_grid_ts"].item() == 0.5
    assert preprocess_video("qwen2_5_vl", frames, model.config, VIDEO)["second_per_grid_ts"].item() == 1.0
    assert seconds_per_grid(model.config, 1.0) == 2.0
    with pytest.raises(ValueError, match="fps"):
        preprocess_video("qwen2_5_vl", frames, model.config, VIDEO, fps=0.0)


@pytest.mark.parametrize(("num_frames", "height", "width"), [(3, 64, 80), (2, 30, 20)])
def test_llava_frames_equal_the_image_processor_base_view(llava, num_frames, height, width):
    model, image_processor = llava
    side = model.config.vision_config.image_size
    frames = random_frames(num_frames, height, width, seed=1)
    ours = preprocess_video("llava_onevision", frames, model.config, VIDEO)["pixel_values_videos"]
    assert ours.shape == (1, num_frames, 3, side, side)
    # The image processor's first view of each image is the whole image resized to the tower's
    # input (the rest are any-resolution tiles, which videos do not use).
    theirs = image_processor(images=list(frames), return_tensors="pt")["pixel_values"][:, 0]
    torch.testing.assert_close(ours[0], theirs, **PIXEL_TOLERANCE)


def _forward_with_placeholders(model, family, frames, num_placeholders):
    video_inputs = preprocess_video(family, frames, model.config, VIDEO, fps=2.0)
    text = torch.tensor([[11, 12, 13]])
    input_ids = torch.cat(
        [text, torch.full((1, num_placeholders), model.config.video_token_id), text], dim=1
    )
    with torch.no_grad():
        return model(input_ids=input_ids, **video_inputs).logits


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize(("num_frames", "height", "width"), [(4, 64, 64), (5, 150, 200), (1, 20, 30)])
def test_num_video_tokens_is_what_the_forward_consumes(qwen, llava, family, num_frames, height, width):
    model = qwen[0] if family == "qwen2_5_vl" else llava[0]
    frames = random_frames(num_frames, height, width, seed=2)
    count = num_video_tokens(family, model.config, VIDEO, num_frames, height, width)
    logits = _forward_with_placeholders(model, family, frames, count)
    assert logits.shape[1] == count + 6
    for wrong in (count - 1, count + 1):
        with pytest.raises(ValueError, match="Video features and video tokens do not match"):
            _forward_with_placeholders(model, family, frames, wrong)


def test_num_video_tokens_per_family_rule(qwen, llava):
    # Qwen2.5-VL: 2 frames per temporal patch, 2x2 patches merged; 64x64 -> 56x56 -> 4x4 patches.
    assert num_video_tokens("qwen2_5_vl", qwen[0].config, VIDEO, 16, 64, 64) == 8 * 4
    assert num_video_tokens("qwen2_5_vl", qwen[0].config, VIDEO, 15, 64, 64) == 8 * 4
    # LLaVA-OneVision: a 3x3 patch grid pooled to 2x2 per frame, plus one newline per video.
    assert num_video_tokens("llava_onevision", llava[0].config, VIDEO, 16, 64, 64) == 16 * 4 + 1


def test_bad_frames_are_rejected_with_what_was_expected(qwen):
    config = qwen[0].config
    with pytest.raises(TypeError, match="uint8"):
        preprocess_video("qwen2_5_vl", np.zeros((2, 32, 32, 3), dtype=np.float32), config, VIDEO)
    with pytest.raises(ValueError, match=r"\[T >= 1, H, W, 3\]"):
        preprocess_video("qwen2_5_vl", np.zeros((32, 32, 3), dtype=np.uint8), config, VIDEO)
