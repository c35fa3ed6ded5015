"""A frame that fails to decode after its video opened: the ranks agree and replace the row, the stage goes on.

The fault is a real file: an mp4 rewritten with its index first (faststart, as web videos are)
and cut off part-way, as an interrupted copy leaves it. It still opens, and its first frames
decode, but the later frames are gone; so with two sequence-parallel ranks, the rank that
decodes the first half of a clip's frames succeeds and the rank that decodes the second fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from omnilong.config import VideoTokenParams
from omnilong.data.video_frames import VideoReadError, read_frames, video_info
from omnilong.train.batches import IGNORE_INDEX, StepBatches
from omnilong.train.video_faults import VideoFaults
from tests.conftest import project_env, video_stage_project
from tests.test_step_batches import three_video_rows


def cut_after_frame(path: Path, keep: int) -> None:
    """Rewrite the mp4 at `path` with its index first (its packets copied as they are), then cut
    the file after the last byte of frame `keep - 1`: frames 0..keep-1 decode as before, the
    video still opens, and the frames whose data was cut off are gone."""
    remuxed = path.with_name(f"{path.stem}.faststart.mp4")
    with av.open(str(path)) as source, av.open(str(remuxed), "w", format="mp4",
                                               options={"movflags": "faststart"}) as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:  # not the empty flush packet
                packet.stream = stream
                target.mux(packet)
    with av.open(str(remuxed)) as container:
        ends = sorted((p.pts, p.pos + p.size) for p in container.demux(video=0) if p.pts is not None)
    path.write_bytes(remuxed.read_bytes()[: max(end for _, end in ends[:keep])])
    remuxed.unlink()


@pytest.fixture(scope="module")
def cut_rows(tmp_path_factory, tiny_model_dir):
    """Three rows of one 8-frame video each, made while the videos were whole; then row 0's video
    is cut after frame 4: sequence-parallel rank 0 (frames 0-3) decodes it, rank 1 (4-7) cannot."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    directory = tmp_path_factory.mktemp("video_faults")
    rows = three_video_rows(directory, config, 30)
    whole = read_frames(directory / "video0.mp4", range(8))
    cut_after_frame(directory / "video0.mp4", 4)
    assert video_info(directory / "video0.mp4").num_frames < 8
    assert (read_frames(directory / "video0.mp4", range(4)) == whole[:4]).all()
    return rows, config


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _step(rows, config, grad_accum_steps: int, micro_batch_size: int = 1):
    """Step 0 of sequence-parallel rank 1 of 2 (with seed 0 the epoch reads rows 2, 0, 1)."""
    batches = StepBatches({len(rows[0]["input_ids"]): rows}, lambda step: len(rows[0]["input_ids"]),
                          lambda step: micro_batch_size, num_steps=1, grad_accum_steps=grad_accum_steps, dp_rank=0,
                          dp_size=1, sp_rank=1, sp_size=2, seed=0, family="qwen2_5_vl", model_config=config,
                          video_params=VideoTokenParams())
    data = batches[0]
    return batches, data, [[choice.row for choice in choices] for choices in data.rows]


@pytest.mark.parametrize("grad_accum_steps,micro_batch_size", [(2, 1), (3, 1), (1, 3)],
                         ids=["an-unread-row-left", "none-left", "none-left-one-micro-batch"])
def test_a_row_whose_frames_fail_is_replaced_or_runs_with_no_labels(cut_rows, one_rank, grad_accum_steps,
                                                                    micro_batch_size):
    """The loader reports the cut video's row (its micro-batch left empty); after the agreement the
    row takes the epoch's unread row (two of three rows read), or, when every row is read, a
    readable row runs in its slot with every label ignored. Either way it counts as skipped."""
    rows, config = cut_rows
    batches, data, read = _step(rows, config, grad_accum_steps, micro_batch_size)
    [(micro, slot)] = [(micro, choices.index(0)) for micro, choices in enumerate(read) if 0 in choices]
    assert data.micro_batches[micro] is None and data.undecodable[micro][0] == slot
    assert "video0.mp4: frame index" in data.undecodable[micro][1]

    data = VideoFaults(batches, torch.device("cpu")).agree(0, data)

    assert data.undecodable == {} and len(data.skipped) == 1
    assert "video0.mp4: frame index" in data.skipped[0] and "(row 0;" in data.skipped[0]
    batch = data.micro_batches[micro]
    trained = int(batch.input_ids[slot, 0]) - 30  # row i starts with token 30 + i
    if grad_accum_steps == 2:
        [unread] = {0, 1, 2} - {row for choices in read for row in choices}
        assert trained == unread and (batch.labels[slot] != IGNORE_INDEX).any()
        assert data.skipped[0].endswith(f"row {unread}, read by no rank in this epoch, takes its place)")
    else:
        assert trained != 0 and (batch.labels[slot] == IGNORE_INDEX).all()
        assert data.skipped[0].endswith(f"row {trained} runs in its place with every label ignored)")
    # Every other slot keeps its row and its labels.
    for other_micro, choices in enumerate(read):
        for other_slot, row in enumerate(choices):
            if (other_micro, other_slot) != (micro, slot):
                other = data.micro_batches[other_micro]
                assert int(other.input_ids[other_slot, 0]) - 30 == row
                assert (other.labels[other_slot] != IGNORE_INDEX).any()
    assert all(piece["pixel_values_videos"].isfinite().all() for batch in data.micro_batches
               for piece in batch.video_pieces)


def test_spares_taken_before_a_resume_are_not_taken_again(cut_rows, one_rank):
    """The epoch's one unread row replaced the cut row; after a resume from a checkpoint holding
    the state, the same fault finds no spare left (a row read twice otherwise) and runs a stand-in."""
    rows, config = cut_rows
    batches, data, _ = _step(rows, config, grad_accum_steps=2)
    before_crash = VideoFaults(batches, torch.device("cpu"))
    assert "read by no rank in this epoch, takes its place" in before_crash.agree(0, data).skipped[0]
    state = json.loads(json.dumps(before_crash.state()))  # through the manifest's JSON

    batches, data, _ = _step(rows, config, grad_accum_steps=2)
    resumed = VideoFaults(batches, torch.device("cpu"), state).agree(0, data)
    assert "no unread row is left in this epoch" in resumed.skipped[0]
    # Without the state the same row would be taken again.
    batches, data, _ = _step(rows, config, grad_accum_steps=2)
    assert "takes its place" in VideoFaults(batches, torch.device("cpu")).agree(0, data).skipped[0]


def test_a_row_that_no_rank_can_decode_stops_with_the_file_named(cut_rows, one_rank):
    rows, config = cut_rows
    batches, data, _ = _step([rows[0]], config, 1)
    with pytest.raises(VideoReadError, match=r"no row of the .+ data has videos that decode; .*video0\.mp4"):
        VideoFaults(batches, torch.device("cpu")).agree(0, data)


@pytest.mark.slow
def test_a_stage_goes_on_when_one_rank_cannot_decode_a_frame(tmp_path_factory, tiny_model_dir):
    """Stage 3 on 2 gloo ranks (one sequence-parallel group), three rows of one video each; the
    video of the row step 1 reads is cut after prepare. Rank 1 fails to decode its frames, both
    ranks replace the row by the unread one, the stage ends and exports finite weights, and the
    row is counted once."""
    from omnilong.config import parse_params
    from omnilong.data.shards import PackedShards
    from omnilong.train.row_order import epoch_order

    root = tmp_path_factory.getbasetemp()
    work = tmp_path_factory.mktemp("video_fault_stage")
    # One video's chat fits a row, two do not.
    stage3 = {"seq_len": 320, "sp_size": 2, "video_frames": {"num_frames": 8},
              "train": {"max_steps": 2, "checkpoint_every": 2, "warmup_steps": 1}}
    raw = video_stage_project(work, root, tiny_model_dir("qwen2_5_vl"), 4, stage3)
    params = parse_params(raw)
    packed = PackedShards(root / params.data.packed_dir / "stage3")
    assert len(packed) == 3 and all(len(packed[row]["videos"]) == 1 for row in range(3))
    first = int(epoch_order(params.seed + params.stages.stage3.train.seed, 3, 0)[0])
    video = packed[first]["videos"][0].path  # relative to the project root
    assert packed[first]["videos"][0].frame_indices == [0, 2, 3, 5, 6, 8, 9, 11]
    cut_after_frame(root / video, 6)  # rank 0 decodes frames 0-5, rank 1 frames 6-11
    assert 6 <= video_info(root / video).num_frames < 12

    result = subprocess.run(
        [sys.executable, "-m", "omnilong.cli", "train", "--stage", "stage3", "--params", str(work / "params.yaml"),
         "--init", raw["model"]["path"], "--out", "runs/video-fault", "--checkpoints", "checkpoints/video-fault"],
        cwd=root, env=project_env(root), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Read by pattern, not by line: the two ranks write to one stderr, and one's line can run into
    # the other's before its newline (seen in CI).
    skips = re.findall(r"(\[rank \d\] step \d+: skipped a row: .*?\(row \d+; [^)]*\))", result.stderr)
    assert len(skips) == 2, result.stderr[-3000:]  # one per rank, both at step 0
    [rank0] = [skip for skip in skips if skip.startswith("[rank 0] step 0:")]
    [rank1] = [skip for skip in skips if skip.startswith("[rank 1] step 0:")]
    assert f"{video}: frame index" in rank1
    assert f"{video}: frames failed to decode on another rank of the sequence-parallel group" in rank0
    [unread] = {0, 1, 2} - {first, int(epoch_order(params.seed + params.stages.stage3.train.seed, 3, 0)[1])}
    replaced = f"(row {first}; row {unread}, read by no rank in this epoch, takes its place)"
    assert rank0.endswith(replaced) and rank1.endswith(replaced)
    assert "step 2/2" in result.stdout

    run_id = json.loads((root / "runs/video-fault/registration.json").read_text())["run_id"]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    history = mlflow.MlflowClient().get_metric_history(run_id, "data/skipped_rows")
    assert {metric.step: metric.value for metric in history} == {0: 1, 1: 1}
    losses = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    assert len(losses) == 2 and all(metric.value == metric.value for metric in losses)
    weights = load_file(root / "runs/video-fault/model/model.safetensors")
    assert all(tensor.isfinite().all() for tensor in weights.values())
