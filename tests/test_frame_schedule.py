"""A frame schedule for stage 3: each phase trains on the frames its `context_schedule` entry sets,
prepared and packed apart, and a stage resumed mid-schedule goes on in the phase it was in.

The reference for what each step must train on is the packed data read back here, step by step,
by the loader's own `StepBatches`; the run's logged frames, row lengths and tokens per step are
measured from the batches it trained on. A resume that restarted a phase, or read another
phase's rows, would log other tokens or frames at the steps after the crash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import project_env, video_stage_project

pytestmark = pytest.mark.slow

FEW, MANY = 4, 8  # frames of each video in the first phase, and from step 2 on (the stage's own)


@pytest.fixture(scope="module")
def scheduled_video_stage(tmp_path_factory, tiny_model_dir):
    """A stage-3 project: 5 videos of 12 frames (one held out); 5 steps, the first 2 at FEW frames
    in 288-token rows, the rest at MANY in 320-token rows (one video's chat to a row)."""
    from omnilong.config import parse_params

    root = tmp_path_factory.getbasetemp()
    work = tmp_path_factory.mktemp("frame_schedule")
    stage3 = {
        "seq_len": 320, "sp_size": 2, "video_frames": {"num_frames": MANY},
        "context_schedule": [{"from_step": 0, "seq_len": 288, "video_frames": {"num_frames": FEW}},
                             {"from_step": 2, "seq_len": 320}],
        "train": {"max_steps": 5, "checkpoint_every": 3, "warmup_steps": 1, "finetune": "lora"},
    }
    params = parse_params(video_stage_project(work, root, tiny_model_dir("qwen2_5_vl"), 5, stage3))
    params_file = work / "params.yaml"
    return params, root, params_file


def test_each_frame_setting_is_prepared_and_packed_apart_with_one_held_out_split(scheduled_video_stage):
    from omnilong.data.pack import packed_set_dirs
    from omnilong.data.prepare import load_tokenized, tokenized_dir
    from omnilong.data.shards import PackedShards

    params, root, _ = scheduled_video_stage
    stage = params.stages.stage3
    few, many = stage.video_frames_at(0), stage.video_frames
    assert tokenized_dir(params, "stage3", few, root).name == "stage3-frames4"
    for sampling, frames in ((few, FEW), (many, MANY)):
        tokenized = load_tokenized(tokenized_dir(params, "stage3", sampling, root))
        assert [len(entry.video.frame_indices) for entry in tokenized.index.documents] == [frames] * 5

    stage_dir = root / params.data.packed_dir / "stage3"
    sets = {packed: PackedShards(directory) for packed, directory in packed_set_dirs(stage_dir, stage).items()}
    assert [directory.name for directory in packed_set_dirs(stage_dir, stage).values()] == ["stage3", "len288-frames4"]
    heldout = PackedShards(stage_dir / "heldout")
    [heldout_id] = sets[stage.packed_set_at(4)].index.heldout_split.document_ids
    [[heldout_clip]] = heldout.index.videos
    assert len(heldout) == 1
    for packed, shards in sets.items():
        clips = [clip for row in shards.index.videos for clip in row]
        assert len(shards) == len(clips) == 4  # the four training videos, one to a row
        assert {len(clip.frame_indices) for clip in clips} == {FEW if packed.seq_len == 288 else MANY}
        # No frame setting trains on the held-out video.
        assert heldout_clip.path not in {clip.path for clip in clips}, heldout_id


def _train(root: Path, params_file: Path, model: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "omnilong.cli", "train", "--stage", "stage3", "--params", str(params_file),
         "--init", model, "--out", "runs/frame-schedule", "--checkpoints", "checkpoints/frame-schedule"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )


def test_a_run_crossing_phases_trains_each_phases_frames_and_resumes_in_its_phase(scheduled_video_stage, monkeypatch):
    """Rank 1 is killed in step 4 of 5, after step 3's checkpoint: the rerun resumes at step 4, in
    the second phase, and every step logs what the loader gives for it."""
    import mlflow
    from transformers import AutoConfig

    from omnilong.data.pack import packed_set_dirs
    from omnilong.data.shards import PackedShards
    from omnilong.train.batches import StepBatches
    from omnilong.train.faults import KILL_ENV

    params, root, params_file = scheduled_video_stage
    stage = params.stages.stage3
    killed = _train(root, params_file, params.model.path, {**project_env(root), KILL_ENV: "1:3"})
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert f"[rank 1] {KILL_ENV}: killed in step 3" in killed.stdout, killed.stdout[-3000:] + killed.stderr[-5000:]
    resumed = _train(root, params_file, params.model.path, project_env(root))
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-5000:]
    assert "[stage3] resuming at step 3;" in output
    assert [output.count(f"step {n}/5 ") for n in range(1, 6)] == [0, 0, 0, 1, 1], output[-3000:]
    assert f"step 4/5 seq 320 frames {MANY} " in output

    # What the loader gives for each step, read here from the packed sets: the reference.
    monkeypatch.chdir(root)  # the packed rows name their videos relative to the project
    datasets = {packed: PackedShards(directory) for packed, directory in
                packed_set_dirs(Path(params.data.packed_dir) / "stage3", stage).items()}
    batches = StepBatches(
        datasets, stage.packed_set_at, stage.micro_batch_size_at, num_steps=stage.train.max_steps,
        grad_accum_steps=1, dp_rank=0, dp_size=1, sp_rank=0, sp_size=2, seed=params.seed + stage.train.seed,
        family="qwen2_5_vl", model_config=AutoConfig.from_pretrained(root / params.model.path),
        video_params=params.model.video,
    )
    expected = {"train/seq_len": {}, "data/video_frames": {}, "train/tokens": {}}
    for step in range(stage.train.max_steps):
        [batch] = batches[step].micro_batches
        expected["train/seq_len"][step] = batch.input_ids.shape[1]
        expected["data/video_frames"][step] = max(batch.frame_counts)
        expected["train/tokens"][step] = batch.num_tokens
    assert list(expected["data/video_frames"].values()) == [FEW, FEW, MANY, MANY, MANY]
    assert list(expected["train/seq_len"].values()) == [288, 288, 320, 320, 320]
    assert len(set(expected["train/tokens"].values())) > 1  # the rows differ: tokens tell them apart

    run_id = json.loads((root / "runs/frame-schedule/registration.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    for metric, by_step in expected.items():
        logged = {point.step: point.value for point in client.get_metric_history(run_id, metric)}
        assert logged == by_step, metric
