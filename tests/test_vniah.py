"""V-NIAH: the cached haystack with a spliced needle is exactly the spliced video's encoding,
the needle sits at its depth, and a grid run writes its results and heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilong.config import FrameSampling, VideoTokenParams, VniahParams
from omnilong.data.synth.video import encode_mp4
from omnilong.data.video_frames import read_frames, sample_frames, video_info
from omnilong.eval.vniah import HaystackCache, cell_prompt, generation_correct, needle_units, run_vniah
from omnilong.eval.vniah_needles import PROBLEMS, render_needle
from omnilong.infer.generate import ModelAnswerer
from omnilong.models.video_encoders import encode_units
from omnilong.models.video_inputs import preprocess_video
from omnilong.train.batches import video_token_id
from tests.test_models_video_inputs import random_frames

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
FAMILIES = ["qwen2_5_vl", "llava_onevision"]


@pytest.fixture(scope="module")
def haystack_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vniah") / "haystack.mp4"
    encode_mp4(list(random_frames(24, 64, 64, seed=9)), path, fps=4)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def answerer(request, tiny_model_dir) -> ModelAnswerer:
    return ModelAnswerer(tiny_model_dir(request.param), VideoTokenParams())


@pytest.mark.parametrize("depth", [0.0, 40.0, 100.0])
def test_cached_haystack_with_the_needle_equals_encoding_the_spliced_frames(answerer, haystack_video, depth):
    cache = HaystackCache(answerer)
    haystack = cache.get(haystack_video, 8)
    assert cache.get(haystack_video, 8) is haystack and cache.encoded == 1
    problem = PROBLEMS[0]
    needle = needle_units(answerer, problem, haystack)
    prompt = cell_prompt(answerer, problem, haystack, needle, depth)

    info = video_info(haystack_video)
    frames = read_frames(haystack_video, sample_frames(info, FrameSampling(num_frames=8)).indices, size=haystack.frame_size)
    per_unit = haystack.span.frames_per_unit
    at = round(depth / 100 * haystack.span.num_units)
    needle_frames = np.repeat(render_needle(problem, *haystack.frame_size)[None], per_unit, axis=0)
    spliced = np.concatenate([frames[: at * per_unit], needle_frames, frames[at * per_unit :]])
    config = answerer.model.config
    with torch.no_grad():
        recomputed = encode_units(answerer.model, answerer.family, answerer.video,
                                  [preprocess_video(answerer.family, spliced, config, answerer.video, fps=haystack.sampled_fps)])
    video_positions = prompt.input_ids == video_token_id(answerer.family, config)
    merged_video = prompt.embeds[0][video_positions][: len(recomputed)]
    torch.testing.assert_close(merged_video, recomputed, **TOLERANCE)
    # The needle's tokens are where the depth puts them, and hold the needle's embeddings.
    start, end = prompt.needle_tokens
    first_video = int(video_positions.nonzero()[0])
    assert start == first_video + at * haystack.span.tokens_per_unit and end - start == haystack.span.tokens_per_unit
    torch.testing.assert_close(prompt.embeds[0, start:end], needle[0], **TOLERANCE)


def test_frame_counts_must_be_whole_temporal_patches(tiny_model_dir, haystack_video):
    answerer = ModelAnswerer(tiny_model_dir("qwen2_5_vl"), VideoTokenParams())
    with pytest.raises(ValueError, match="eval.vniah.frame_counts: expected multiples of 2"):
        HaystackCache(answerer).get(haystack_video, 7)


@pytest.mark.parametrize(("reply", "answer", "correct"), [
    ("7", "7", True), ("The digit is 7.", "7", True), ("17", "7", False), ("Red", "red", True),
    ("reddish", "red", False), ("B", "B", True), ("Best is C", "B", False), ("CAT!", "CAT", True), ("", "3", False),
])
def test_generation_scoring_wants_the_answer_as_a_word(reply, answer, correct):
    assert generation_correct(reply, answer) is correct


def test_grid_run_writes_every_cell_and_both_heatmaps(answerer, haystack_video, tmp_path):
    params = VniahParams(frame_counts=[4, 8], depths=[0.0, 100.0], max_new_tokens=3)
    summary = run_vniah(answerer, haystack_video, params, tmp_path, problems=PROBLEMS[:2])
    assert summary["haystacks_encoded"] == 2  # once per frame count, not per depth or needle
    written = json.loads((tmp_path / "vniah.json").read_text())
    assert [(c["frames"], c["depth"]) for c in written["cells"]] == [(4, 0.0), (4, 100.0), (8, 0.0), (8, 100.0)]
    for cell in written["cells"]:
        assert len(cell["problems"]) == 2
        assert all(r["teacher_forced"] in (0.0, 1.0) and r["generation"] in (0.0, 1.0) for r in cell["problems"])
    for mode in ("teacher_forced", "generation"):
        assert (tmp_path / f"vniah_{mode}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
