"""Whole-document position ids equal what the real model computes for the same document."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig

from omnilong.config import VideoTokenParams
from omnilong.models.loading import load_model
from omnilong.models.positions import position_ids_for_document
from omnilong.models.video_inputs import num_video_tokens, video_grid_thw

VIDEO = VideoTokenParams()


@pytest.fixture(scope="module")
def qwen_model(tiny_model_dir):
    return load_model(tiny_model_dir("qwen2_5_vl"))


def document_with_videos(config, videos: list[tuple[int, int, int]]):
    """input_ids [L] of text runs around expanded videos, with their grids; videos are (T, H, W)."""
    pieces, grids = [torch.arange(20, 27)], []
    for number, (num_frames, height, width) in enumerate(videos):
        count = num_video_tokens("qwen2_5_vl", config, VIDEO, num_frames, height, width)
        pieces += [torch.full((count,), config.video_token_id), torch.arange(30, 34 + number)]
        grids.append(video_grid_thw(config, VIDEO, num_frames, height, width))
    return torch.cat(pieces), torch.tensor(grids)


def test_qwen_positions_equal_the_models_get_rope_index(qwen_model):
    config = qwen_model.config
    input_ids, grids = document_with_videos(config, [(6, 64, 64), (3, 90, 150)])
    seconds = torch.tensor([0.5, 2.0])
    ours = position_ids_for_document(config, input_ids, grids, seconds)

    is_video = input_ids == config.video_token_id
    theirs, _ = qwen_model.model.get_rope_index(
        input_ids[None], mm_token_type_ids=(is_video.int() * 2)[None], video_grid_thw=grids, second_per_grid_ts=seconds
    )
    assert ours.shape == (3, input_ids.shape[0]) and ours.dtype == torch.long
    torch.testing.assert_close(ours, theirs[:, 0], rtol=0, atol=0)
    # Really 3-D: video tokens get distinct temporal/height/width rows, text tokens equal ones.
    assert not torch.equal(ours[1, is_video], ours[2, is_video])
    assert torch.equal(ours[0, ~is_video], ours[2, ~is_video])


def test_qwen_positions_are_those_the_forward_uses(qwen_model):
    """Passing our ids explicitly gives the same logits as letting the model derive them."""
    config = qwen_model.config
    input_ids, grids = document_with_videos(config, [(4, 64, 64)])
    is_video = input_ids == config.video_token_id
    pixels = torch.randn(int(grids.prod()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    seconds = torch.tensor([1.0])
    inputs = dict(input_ids=input_ids[None], pixel_values_videos=pixels, video_grid_thw=grids, second_per_grid_ts=seconds)
    with torch.no_grad():
        derived = qwen_model(**inputs, mm_token_type_ids=(is_video.int() * 2)[None]).logits
        given = qwen_model(**inputs, position_ids=position_ids_for_document(config, input_ids, grids, seconds)[:, None]).logits
        one_dimensional = qwen_model(**inputs).logits
    torch.testing.assert_close(given, derived, rtol=0, atol=0)
    assert not torch.allclose(given, one_dimensional), "3-D positions must change the output"


def test_text_only_document_gets_sequential_positions(qwen_model):
    positions = position_ids_for_document(qwen_model.config, torch.arange(100, 140))
    assert torch.equal(positions, torch.arange(40).expand(3, -1))


def test_full_size_config_needs_no_weights():
    """The 7B-shaped default config works: the helper module lives on the meta device."""
    config = Qwen2_5_VLConfig()
    input_ids = torch.cat([torch.tensor([1, 2]), torch.full((8,), config.video_token_id), torch.tensor([3])])
    positions = position_ids_for_document(config, input_ids, torch.tensor([[2, 4, 4]]), torch.tensor([1.0]))
    # By hand: text 0, 1; the video starts at 2 with a 2 x 2 x 2 merged grid whose temporal
    # step is tokens_per_second * seconds_per_grid; text resumes after the largest spatial side.
    step = config.vision_config.tokens_per_second
    expected = torch.tensor(
        [
            [0, 1] + [2] * 4 + [2 + step] * 4 + [4],
            [0, 1] + [2, 2, 3, 3] * 2 + [4],
            [0, 1] + [2, 3, 2, 3] * 2 + [4],
        ]
    )
    assert torch.equal(positions, expected)


def test_llava_positions_are_one_dimensional(tiny_model_dir):
    config = load_model(tiny_model_dir("llava_onevision")).config
    input_ids = torch.cat([torch.arange(5), torch.full((9,), config.video_token_id)])
    assert torch.equal(position_ids_for_document(config, input_ids), torch.arange(14))


def test_rejects_batches_and_images(qwen_model):
    config = qwen_model.config
    with pytest.raises(ValueError, match=r"one document of shape \[L\]"):
        position_ids_for_document(config, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="image placeholders"):
        position_ids_for_document(config, torch.tensor([1, config.image_token_id, 2]))


def test_rejects_placeholders_that_do_not_fill_the_grids(qwen_model):
    config = qwen_model.config
    input_ids, grids = document_with_videos(config, [(4, 64, 64)])
    assert grids.tolist() == [[2, 4, 4]]  # 8 placeholders
    with pytest.raises(ValueError, match=r"8 video placeholders, but video_grid_thw \[\[7, 2, 2\]\] needs 7"):
        position_ids_for_document(config, input_ids, torch.tensor([[7, 2, 2]]))
    with pytest.raises(ValueError, match="needs 0"):
        position_ids_for_document(config, input_ids)


@pytest.mark.parametrize("sp_size", [2, 4])
def test_qwen_positions_are_sharded_with_the_sequence_and_survive_unsharding(qwen_model, sp_size):
    """Each rank's positions are its zigzag chunks of the whole document's `get_rope_index` ids."""
    from omnilong.parallel.zigzag import SequenceLayout, shard_sequence, unshard_sequence
    from omnilong.train.training_module import language_model_positions

    config = qwen_model.config
    input_ids, grids = document_with_videos(config, [(32, 64, 64), (5, 56, 84)])
    padding = -len(input_ids) % (2 * sp_size)
    input_ids = torch.cat([input_ids, torch.zeros(padding, dtype=torch.long)])
    seconds = torch.tensor([0.5, 1.0])
    is_video = (input_ids == config.video_token_id).int() * 2
    theirs, _ = qwen_model.model.get_rope_index(
        input_ids[None, : len(input_ids) - padding], mm_token_type_ids=is_video[None, : len(input_ids) - padding],
        video_grid_thw=grids, second_per_grid_ts=seconds,
    )
    document = position_ids_for_document(config, input_ids[: len(input_ids) - padding], grids, seconds)
    row = torch.cat([document, torch.arange(padding).expand(3, -1)], dim=-1)[:, None]  # [3, 1, L]
    full = language_model_positions("qwen2_5_vl", row, [[len(input_ids) - padding]])  # [4, 1, L]
    layout = SequenceLayout(len(input_ids), sp_size)
    shards = [shard_sequence(full, layout, rank, dim=-1) for rank in range(sp_size)]
    global_index = torch.arange(len(input_ids))
    for rank, shard in enumerate(shards):
        mine = shard_sequence(global_index, layout, rank, dim=0)
        in_document = mine < len(input_ids) - padding
        torch.testing.assert_close(shard[1:, 0][:, in_document], theirs[:, 0, mine[in_document]], rtol=0, atol=0)
    assert torch.equal(unshard_sequence(shards, layout, dim=-1), full)
