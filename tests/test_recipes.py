"""The real-run recipes validate (paths aside), and the context schedule means what it says."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from omnilong.cli import app
from omnilong.config import ConfigError, FrameSampling, StageParams, load_params

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_is_a_recipe_per_family():
    assert {load_params(path).model.family for path in RECIPES} == {"qwen2_5_vl", "llava_onevision"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_validates_without_its_paths(recipe):
    result = CliRunner().invoke(app, ["config", "check", "--skip-path-checks", str(recipe)])
    assert result.exit_code == 0, result.output
    params = load_params(recipe)
    stage1 = params.stages.stage1
    assert stage1.packed_lengths == [65536, 131072, 262144, 524288]
    # The mixture's total: each phase's steps x seq_len x 8 accumulated micro-batches of one row, one
    # data-parallel rank.
    assert stage1.tokens_read(params.parallel.world_size // stage1.sp_size) == {
        65536: 600 * 65536 * 8, 131072: 400 * 131072 * 8, 262144: 300 * 262144 * 8, 524288: 200 * 524288 * 8}
    assert sum(stage1.mixture.values()) == pytest.approx(1)
    assert params.model.rope_theta is not None
    assert params.stages.stage1.sp_size == params.stages.stage2.sp_size == params.stages.stage3.sp_size == 8
    stage3 = params.stages.stage3
    # Stage 3 grows over 256 -> 512 -> 1024 -> 2048 frames and ends on its own setting.
    phases = [(entry.from_step, stage3.seq_len_at(entry.from_step), stage3.video_frames_at(entry.from_step))
              for entry in stage3.context_schedule]
    assert [sampling.max_frames for _, _, sampling in phases] == [256, 512, 1024, 2048]
    assert phases[-1][2] == stage3.video_frames and phases[-1][1] == stage3.seq_len
    assert len(stage3.packed_sets) == 4 and len(stage3.frame_settings) == 4
    # Each phase's row holds the most visual tokens of its frames, worked out here from the models'
    # docs: Qwen2.5-VL one token per 28 x 28 pixels of each temporal patch of 2 frames (at
    # max_pixels), LLaVA-OneVision 196 tokens a frame (27 x 27 SigLIP patches pooled 2x2) and one newline.
    for _, seq_len, sampling in phases:
        frames = sampling.max_frames
        if params.model.family == "qwen2_5_vl":
            most_visual = frames // 2 * params.model.video.qwen2_5_vl.max_pixels // (28 * 28)
        else:
            most_visual = frames * 196 + 1
        assert most_visual < seq_len, (frames, seq_len)
    # The model and corpora exist only on the training machine: the full check names them.
    with pytest.raises(ConfigError, match=r"model\.path"):
        load_params(recipe, check_paths=True)


def test_context_schedule_steps():
    stage = StageParams(seq_len=1024, sp_size=2, context_schedule=[
        {"from_step": 0, "seq_len": 256}, {"from_step": 6, "seq_len": 512}, {"from_step": 12, "seq_len": 1024}])
    assert [stage.seq_len_at(step) for step in (0, 5, 6, 11, 12, 100)] == [256, 256, 512, 512, 1024, 1024]
    assert stage.packed_lengths == [256, 512, 1024]


def test_context_schedule_micro_batch_sizes():
    stage = StageParams(seq_len=1024, train={"micro_batch_size": 2}, context_schedule=[
        {"from_step": 0, "seq_len": 256, "micro_batch_size": 8}, {"from_step": 6, "seq_len": 512},
        {"from_step": 12, "seq_len": 1024, "micro_batch_size": 1}])
    assert [stage.micro_batch_size_at(step) for step in (0, 5, 6, 11, 12, 100)] == [8, 8, 2, 2, 1, 1]
    assert StageParams(seq_len=1024, train={"micro_batch_size": 3}).micro_batch_size_at(7) == 3


@pytest.mark.parametrize(("schedule", "key"), [
    ([{"from_step": 5, "seq_len": 256}, {"from_step": 9, "seq_len": 1024}], "context_schedule.0.from_step"),
    ([{"from_step": 0, "seq_len": 256}, {"from_step": 0, "seq_len": 1024}], "context_schedule.1.from_step"),
    ([{"from_step": 0, "seq_len": 256}, {"from_step": 6, "seq_len": 512}, {"from_step": 4, "seq_len": 1024}],
     "context_schedule.2.from_step"),
    ([{"from_step": 0, "seq_len": 256}, {"from_step": 4, "seq_len": 512}], "context_schedule"),
    ([{"from_step": 0, "seq_len": 258}, {"from_step": 4, "seq_len": 1024}], "context_schedule.0.seq_len"),
])
def test_bad_schedule_names_the_key(schedule, key):
    from omnilong.config import parse_params

    raw = load_params(RECIPES[0]).model_dump(mode="json")
    raw["stages"]["stage1"].update(seq_len=1024, sp_size=2, context_schedule=schedule)
    with pytest.raises(ConfigError, match=rf"stages\.stage1\.{key.replace('.', chr(92) + '.')}:"):
        parse_params(raw)


def test_a_frame_schedule_sets_each_phases_frames_and_what_is_packed():
    stage = StageParams(seq_len=1024, sp_size=2, video_frames={"num_frames": 16}, context_schedule=[
        {"from_step": 0, "seq_len": 256, "video_frames": {"num_frames": 4}}, {"from_step": 4, "seq_len": 512},
        {"from_step": 8, "seq_len": 1024, "video_frames": {"num_frames": 16}}])
    four, sixteen = FrameSampling(num_frames=4), FrameSampling(num_frames=16)
    assert [stage.video_frames_at(step) for step in (0, 3, 4, 7, 8, 100)] == [four, four, sixteen, sixteen,
                                                                              sixteen, sixteen]
    assert [stage.packed_set_at(step) for step in (3, 4, 8)] == [(256, four), (512, sixteen), (1024, sixteen)]
    # The stage's own set first; each (length, frames) once.
    assert stage.packed_sets == [(1024, sixteen), (256, four), (512, sixteen)]
    assert stage.frame_settings == [sixteen, four]
    assert FrameSampling(fps=0.5, max_frames=64).name == "fps0.5-max64" and four.name == "frames4"
