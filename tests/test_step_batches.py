"""The data loader's step dataset: the rows each rank reads under a context schedule, and what takes
the place of a row whose video no longer opens."""

from __future__ import annotations

import random

import pytest
import torch

from omnilong.config import StageParams, VideoTokenParams
from omnilong.data.synth.video import encode_mp4
from omnilong.train.batches import StepBatches
from tests.conftest import video_clip_row
from tests.test_models_video_inputs import random_frames


def three_video_rows(directory, config, first_token: int) -> list[dict]:
    """Three rows of one 8-frame video each (`video<N>.mp4` in `directory`), their prompts starting
    with `first_token` + N."""
    rows = []
    for number in range(3):
        path = directory / f"video{number}.mp4"
        encode_mp4(list(random_frames(8, 64, 64, seed=number)), path, fps=4)
        rows.append(video_clip_row(path, "qwen2_5_vl", config, 8, [first_token + number, 21], [22, 23]))
    return rows


@pytest.fixture(scope="module")
def rows_and_config(tmp_path_factory, tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    directory = tmp_path_factory.mktemp("step_batches")
    return three_video_rows(directory, config, 20), config, directory


def _steps(rows, config, sp_rank: int = 0, sp_size: int = 1, micro_batch_size_at=lambda step: 1,
           grad_accum_steps: int | None = None) -> StepBatches:
    return StepBatches({len(rows[0]["input_ids"]): rows}, lambda step: len(rows[0]["input_ids"]), micro_batch_size_at,
                       num_steps=3, grad_accum_steps=grad_accum_steps or len(rows), dp_rank=0, dp_size=1, sp_rank=sp_rank,
                       sp_size=sp_size, seed=0, family="qwen2_5_vl", model_config=config, video_params=VideoTokenParams())


def _with_broken_video(row: dict, broken) -> dict:
    return {**row, "videos": [row["videos"][0].model_copy(update={"path": str(broken)})]}


def test_a_row_whose_video_no_longer_opens_gives_its_place_to_an_unread_row_or_to_no_labels(rows_and_config):
    _, config, directory = rows_and_config
    broken = directory / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    # Five rows, a step of four (two data-parallel groups of two sequence-parallel ranks, two
    # micro-batches each): one row of the epoch is left unread. Row i starts with token 30 + i.
    five = [video_clip_row(directory / f"video{i % 3}.mp4", "qwen2_5_vl", config, 8, [30 + i, 21], [22, 23])
            for i in range(5)]

    def read(dataset):
        steps = {(dp, sp): StepBatches({64: dataset}, lambda step: 64, lambda step: 1, num_steps=1, grad_accum_steps=2,
                                       dp_rank=dp, dp_size=2, sp_rank=sp, sp_size=2, seed=0, family="qwen2_5_vl",
                                       model_config=config, video_params=VideoTokenParams())[0]
                 for dp in range(2) for sp in range(2)}
        for dp in range(2):
            for ours, theirs in zip(steps[dp, 0].micro_batches, steps[dp, 1].micro_batches, strict=True):
                assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.labels, theirs.labels)
            assert steps[dp, 0].skipped == steps[dp, 1].skipped
        return {dp: steps[dp, 0] for dp in range(2)}

    clean = read(five)
    assert all(data.skipped == [] for data in clean.values())
    clean_rows = {dp: [int(batch.input_ids[0, 0]) - 30 for batch in data.micro_batches] for dp, data in clean.items()}
    [unread] = set(range(5)) - {row for rows in clean_rows.values() for row in rows}
    # Break the first row of each data-parallel group: one unread row for two broken ones.
    broken_rows = {clean_rows[0][0], clean_rows[1][0]}
    data = read([_with_broken_video(row, broken) if i in broken_rows else row for i, row in enumerate(five)])

    assert sum(len(step.skipped) for step in data.values()) == 2
    assert all(str(broken) in reason for step in data.values() for reason in step.skipped)
    trained, ignored = [], 0
    for step in data.values():
        for batch in step.micro_batches:
            if (batch.labels == -100).all():
                ignored += 1
            else:
                trained.append(int(batch.input_ids[0, 0]) - 30)
    assert ignored == 1, "one broken row found no unread row left: its slot runs with every label ignored"
    assert sorted(trained) == sorted({unread, *(row for rows in clean_rows.values() for row in rows)} - broken_rows)


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


def _text_rows(seq_len: int, num_rows: int) -> list[dict]:
    """Rows that say which length's dataset and which row they are: input_ids = [seq_len, row]."""
    return [{"input_ids": torch.tensor([seq_len, row]), "labels": torch.tensor([row, row]),
             "position_ids": torch.arange(2), "doc_lens": torch.tensor([2])} for row in range(num_rows)]


def _random_run(rng: random.Random) -> tuple[StageParams, int, int, dict[int, int]]:
    """A stage with a random context schedule (lengths repeat and return), its step count, the
    data-parallel size, and a dataset size per length no smaller than one step's rows there."""
    sp_size, dp_size = rng.choice([1, 2]), rng.choice([1, 2, 3])
    lengths = [64, 128, 256]
    num_phases = rng.randint(1, 5)
    from_steps = [0, *sorted(rng.sample(range(1, 25), num_phases - 1))]
    schedule = [
        {"from_step": from_step, "seq_len": rng.choice(lengths), "micro_batch_size": rng.choice([None, 1, 2, 3])}
        for from_step in from_steps
    ]
    stage = StageParams(seq_len=schedule[-1]["seq_len"], sp_size=sp_size, context_schedule=schedule,
                        train={"micro_batch_size": rng.randint(1, 3), "grad_accum_steps": rng.randint(1, 3)})
    num_steps = rng.randint(1, 30)
    step_rows = {length: 1 for length in stage.packed_lengths}
    for step in range(max(num_steps, from_steps[-1] + 1)):
        length = stage.seq_len_at(step)
        rows = stage.micro_batch_size_at(step) * stage.train.grad_accum_steps * dp_size
        step_rows[length] = max(step_rows[length], rows)
    sizes = {length: rng.randint(rows, 3 * rows + 4) for length, rows in step_rows.items()}
    return stage, num_steps, dp_size, sizes


def _rank_rows(stage: StageParams, num_steps: int, dp_size: int, sizes: dict[int, int], dp_rank: int,
               sp_rank: int, first_step: int = 0) -> list[list[int]]:
    """Rows (as [seq_len, row] pairs flattened per step) one rank reads at each step from `first_step`."""
    steps = StepBatches({length: _text_rows(length, size) for length, size in sizes.items()}, stage.seq_len_at,
                        stage.micro_batch_size_at, num_steps=num_steps, grad_accum_steps=stage.train.grad_accum_steps,
                        dp_rank=dp_rank, dp_size=dp_size, sp_rank=sp_rank, sp_size=stage.sp_size, seed=7,
                        family="qwen2_5_vl", model_config=None, video_params=VideoTokenParams())
    read = []
    for step in range(first_step, num_steps):
        batches = steps[step].micro_batches
        assert all(batch.input_ids.shape[0] == stage.micro_batch_size_at(step) for batch in batches)
        assert all(int(length) == stage.seq_len_at(step) for batch in batches for length in batch.input_ids[:, 0])
        read.append([int(row) for batch in batches for row in batch.input_ids[:, 1]])
    return read


def test_under_any_context_schedule_each_epoch_reads_every_row_once_and_resumes_alike():
    rng = random.Random(0)
    for case in range(250):
        stage, num_steps, dp_size, sizes = _random_run(rng)
        described = f"case {case}: {stage.context_schedule}, {num_steps} steps, dp {dp_size}, sizes {sizes}"
        ranks = {(dp, sp): _rank_rows(stage, num_steps, dp_size, sizes, dp, sp)
                 for dp in range(dp_size) for sp in range(stage.sp_size)}
        for (dp, sp), read in ranks.items():
            assert read == ranks[dp, 0], f"{described}: sp rank {sp} of dp group {dp} read other rows"
        # Cut each length's reads into epochs where a row comes back; every cut must leave fewer
        # unread rows than the step that no longer fitted (drop-last), and no row may repeat.
        epoch_rows: dict[int, set[int]] = {length: set() for length in sizes}
        for step in range(num_steps):
            length = stage.seq_len_at(step)
            rows = [row for dp in range(dp_size) for row in ranks[dp, 0][step]]
            assert len(set(rows)) == len(rows), f"{described}: step {step} reads a row twice: {rows}"
            seen = epoch_rows[length]
            if seen & set(rows):
                unread = sizes[length] - len(seen)
                assert unread < len(rows), (
                    f"{described}: step {step} starts a new epoch of length {length} with {unread} rows "
                    f"of the last one unread, enough for the step's {len(rows)}")
                seen.clear()
            seen.update(rows)
        resume_at = rng.randrange(num_steps)
        dp, sp = rng.randrange(dp_size), rng.randrange(stage.sp_size)
        resumed = _rank_rows(stage, num_steps, dp_size, sizes, dp, sp, first_step=resume_at)
        assert resumed == ranks[dp, sp][resume_at:], f"{described}: resumed at step {resume_at}, read other rows"
