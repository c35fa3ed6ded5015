"""Whole-document position ids: Qwen2.5-VL's original mRoPE rule, checked against tables worked
out by hand from its spec (not against transformers' `get_rope_index`, whose rule changed in 5.2)."""

from __future__ import annotations

import itertools

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


# Two videos in one document, by hand from the rule in `mrope_position_ids`' docstring, with
# tokens_per_second 2 and merge 2. Video 1: grid (3, 4, 6) -> merged 3 x 2 x 3, 1.25 s per temporal
# patch, so temporal offsets floor(k * 2.5) = 0, 2, 5; its time range (5) outlasts its side (3).
# Video 2: grid (2, 6, 4) -> merged 2 x 3 x 2, 0.5 s per patch, offsets 0, 1; its side (3) is longer.
SPEC_GRIDS = [[3, 4, 6], [2, 6, 4]]
SPEC_SECONDS = [1.25, 0.5]
SPEC_TABLE = {  # (temporal, height, width) rows of each run, in document order
    "text a": ([0, 1], [0, 1], [0, 1]),
    "video 1": (  # starts at 2
        [2] * 6 + [4] * 6 + [7] * 6,
        [2, 2, 2, 3, 3, 3] * 3,
        [2, 3, 4, 2, 3, 4] * 3,
    ),
    "text b": ([8, 9], [8, 9], [8, 9]),  # video 1's largest id is 7
    "video 2": (  # starts at 10
        [10] * 6 + [11] * 6,
        [10, 10, 11, 11, 12, 12] * 2,
        [10, 11, 10, 11, 10, 11] * 2,
    ),
    "text c": ([13, 14, 15], [13, 14, 15], [13, 14, 15]),  # video 2's largest id is 12
}


def spec_config() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(vision_config={"tokens_per_second": 2, "spatial_merge_size": 2})


def spec_document(config: Qwen2_5_VLConfig) -> torch.Tensor:
    """input_ids [L] of SPEC_TABLE's runs: text tokens 5, 6, ..., videos as placeholders."""
    ids, text = [], iter(range(5, 100))
    for name, (temporal, _, _) in SPEC_TABLE.items():
        ids += [config.video_token_id] * len(temporal) if name.startswith("video") else [next(text) for _ in temporal]
    return torch.tensor(ids)


def test_qwen_positions_follow_the_original_rule():
    """Each text run starts after the largest id before it, videos included (transformers >= 5.2
    would resume after video 1 at 2 + 3 = 5, not at 8)."""
    config = spec_config()
    positions = position_ids_for_document(
        config, spec_document(config), torch.tensor(SPEC_GRIDS), torch.tensor(SPEC_SECONDS)
    )
    assert positions.dtype == torch.long
    assert positions.tolist() == [list(itertools.chain(*(run[row] for run in SPEC_TABLE.values()))) for row in range(3)]


def test_back_to_back_videos_and_a_video_that_ends_the_document():
    """With no text between them, the second video starts after the first's largest id."""
    config = spec_config()
    input_ids = torch.tensor([5] + [config.video_token_id] * 6)
    positions = position_ids_for_document(config, input_ids, torch.tensor([[2, 2, 4], [1, 4, 2]]),
                                          torch.tensor([2.0, 1.0]))
    assert positions.tolist() == [
        [0, 1, 1, 5, 5, 6, 6],  # video 1 at 1: offsets 0, 4 over a merged 1 x 2 grid; video 2 at 6
        [0, 1, 1, 1, 1, 6, 7],
        [0, 1, 2, 1, 2, 6, 6],
    ]


def test_qwen_positions_are_those_the_forward_uses(qwen_model):
    """Ids passed explicitly are what the model uses, even where it could derive its own
    (from `mm_token_type_ids`, by transformers' rule); and 3-D ids do change the output."""
    config = qwen_model.config
    input_ids, grids = document_with_videos(config, [(4, 64, 64)])
    is_video = input_ids == config.video_token_id
    pixels = torch.randn(int(grids.prod()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    seconds = torch.tensor([2.0])  # the video's time range (2 x 2 x 2) outlasts its side (2)
    inputs = dict(input_ids=input_ids[None], pixel_values_videos=pixels, video_grid_thw=grids, second_per_grid_ts=seconds)
    ours = position_ids_for_document(config, input_ids, grids, seconds)[:, None]
    with torch.no_grad():
        given = qwen_model(**inputs, position_ids=ours).logits
        given_with_types = qwen_model(**inputs, position_ids=ours, mm_token_type_ids=(is_video.int() * 2)[None]).logits
        one_dimensional = qwen_model(**inputs).logits
    torch.testing.assert_close(given_with_types, given, rtol=0, atol=0)
    assert not torch.allclose(given, one_dimensional), "3-D positions must change the output"


def test_text_only_document_gets_sequential_positions(qwen_model):
    positions = position_ids_for_document(qwen_model.config, torch.arange(100, 140))
    assert torch.equal(positions, torch.arange(40).expand(3, -1))


def test_full_size_config():
    """The 7B-shaped default config (4 tokens per second)."""
    config = Qwen2_5_VLConfig()
    input_ids = torch.cat([torch.tensor([1, 2]), torch.full((8,), config.video_token_id), torch.tensor([3])])
    positions = position_ids_for_document(config, input_ids, torch.tensor([[2, 4, 4]]), torch.tensor([1.0]))
    # By hand: text 0, 1; the video starts at 2 with a 2 x 2 x 2 merged grid whose temporal
    # offsets are 0 and 1 x 1.0 s x 4; text resumes after its largest id, 6.
    assert positions.tolist() == [
        [0, 1] + [2] * 4 + [6] * 4 + [7],
        [0, 1] + [2, 2, 3, 3] * 2 + [7],
        [0, 1] + [2, 3, 2, 3] * 2 + [7],
    ]


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
    split = torch.tensor([5] + [config.video_token_id] * 4 + [6] + [config.video_token_id] * 4)
    with pytest.raises(ValueError, match=r"video 0 \(grid \[2, 4, 4\]\) needs 8 placeholders in a row at 1, the run holds 4"):
        position_ids_for_document(config, split, grids)


@pytest.mark.parametrize("sp_size", [2, 4])
def test_qwen_positions_are_sharded_with_the_sequence_and_survive_unsharding(qwen_model, sp_size):
    """Each rank's positions are its zigzag chunks of the whole document's ids."""
    from omnilong.parallel.zigzag import SequenceLayout, shard_sequence, unshard_sequence
    from omnilong.train.training_module import language_model_positions

    config = qwen_model.config
    input_ids, grids = document_with_videos(config, [(32, 64, 64), (5, 56, 84)])
    padding = -len(input_ids) % (2 * sp_size)
    input_ids = torch.cat([input_ids, torch.zeros(padding, dtype=torch.long)])
    seconds = torch.tensor([0.5, 1.0])
    document = position_ids_for_document(config, input_ids[: len(input_ids) - padding], grids, seconds)
    row = torch.cat([document, torch.arange(padding).expand(3, -1)], dim=-1)[:, None]  # [3, 1, L]
    full = language_model_positions("qwen2_5_vl", row, [[len(input_ids) - padding]])  # [4, 1, L]
    layout = SequenceLayout(len(input_ids), sp_size)
    shards = [shard_sequence(full, layout, rank, dim=-1) for rank in range(sp_size)]
    global_index = torch.arange(len(input_ids))
    for rank, shard in enumerate(shards):
        mine = shard_sequence(global_index, layout, rank, dim=0)
        in_document = mine < len(input_ids) - padding
        torch.testing.assert_close(shard[1:, 0][:, in_document], document[:, mine[in_document]], rtol=0, atol=0)
    assert torch.equal(unshard_sequence(shards, layout, dim=-1), full)
