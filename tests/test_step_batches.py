"""The data loader's step dataset: rows with a video that no longer opens are skipped and counted."""

from __future__ import annotations

import pytest
import torch

from omnilong.config import VideoTokenParams
from omnilong.data.synth.video import encode_mp4
from omnilong.train.batches import StepBatches
from tests.conftest import video_clip_row
from tests.test_models_video_inputs import random_frames


@pytest.fixture(scope="module")
def rows_and_config(tmp_path_factory, tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    directory = tmp_path_factory.mktemp("step_batches")
    rows = []
    for number in range(3):
        path = directory / f"video{number}.mp4"
        encode_mp4(list(random_frames(8, 64, 64, seed=number)), path, fps=4)
        rows.append(video_clip_row(path, "qwen2_5_vl", config, 8, [20 + number, 21], [22, 23]))
    return rows, config, directory


def _steps(rows, config, sp_rank: int = 0, sp_size: int = 1, micro_batch_size_at=lambda step: 1,
           grad_accum_steps: int | None = None) -> StepBatches:
    return StepBatches({len(rows[0]["input_ids"]): rows}, lambda step: len(rows[0]["input_ids"]), micro_batch_size_at,
                       num_steps=3, grad_accum_steps=grad_accum_steps or len(rows), dp_rank=0, dp_size=1, sp_rank=sp_rank,
                       sp_size=sp_size, seed=0, family="qwen2_5_vl", model_config=config, video_params=VideoTokenParams())


def test_a_row_whose_video_no_longer_opens_is_skipped_and_reported(rows_and_config):
    rows, config, directory = rows_and_config
    broken = directory / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    bad_row = {**rows[1], "videos": [rows[1]["videos"][0].model_copy(update={"path": str(broken)})]}
    data = _steps([rows[0], bad_row, rows[2]], config)[0]
    assert len(data.skipped) == 1 and str(broken) in data.skipped[0]
    # The next row in the epoch's order took its place: every micro-batch holds a readable row.
    for batch in data.micro_batches:
        assert batch.input_ids[0, 0] in (20, 22)
    clean = _steps(rows, config)[0]
    assert clean.skipped == []


def test_each_sequence_parallel_rank_decodes_only_its_share_of_the_frames(rows_and_config):
    rows, config, _ = rows_and_config
    whole = _steps(rows, config)[0].micro_batches[0]
    shares = [_steps(rows, config, rank, 2)[0].micro_batches[0] for rank in range(2)]
    whole_patches = sum(piece["pixel_values_videos"].shape[0] for piece in whole.video_pieces)
    share_patches = [sum(piece["pixel_values_videos"].shape[0] for piece in share.video_pieces) for share in shares]
    assert share_patches == [whole_patches // 2] * 2
    torch.testing.assert_close(torch.cat([share.video_pieces[0]["pixel_values_videos"] for share in shares]),
                               whole.video_pieces[0]["pixel_values_videos"], rtol=0, atol=0)


def test_the_micro_batch_size_follows_the_schedule(rows_and_config):
    rows, config, _ = rows_and_config
    steps = _steps(rows, config, micro_batch_size_at=lambda step: 3 if step == 0 else 1, grad_accum_steps=1)
    assert [steps[step].micro_batches[0].input_ids.shape[0] for step in range(3)] == [3, 1, 1]
    # Step 0 took each row once: an epoch's order, not one row repeated.
    assert sorted(int(first) for first in steps[0].micro_batches[0].input_ids[:, 0]) == [20, 21, 22]
