"""`omnilong probe`: the bisection, the video stage's synthetic rows, the cap's checks, and a real probe."""

from __future__ import annotations

import pytest
import torch

from omnilong.config import FrameSampling, VideoTokenParams
from omnilong.probe.search import longest_fitting

# ------------------------------------------------------------------------------------------ bisection


@pytest.mark.parametrize("step", [2, 4, 8])
@pytest.mark.parametrize("lowest_steps, highest_steps", [(1, 1), (1, 2), (1, 64), (3, 50), (16, 17)])
def test_the_search_finds_the_longest_fitting_length_and_shows_the_next_one_fails(step, lowest_steps, highest_steps):
    lowest, highest = lowest_steps * step, highest_steps * step
    for limit in range(0, highest + 3 * step):
        tried: list[int] = []

        def fits(length: int) -> bool:
            tried.append(length)
            return length <= limit

        found = longest_fitting(fits, lowest, highest, step)
        expected = min(limit, highest) // step * step
        assert found == (expected if expected >= lowest else None), (limit, tried)
        assert all(length % step == 0 and lowest <= length <= highest for length in tried)
        assert len(tried) == len(set(tried)), "a length is tried once"
        if found is not None:
            assert found in tried
            if found < highest:
                assert found + step in tried, "the next length was tried and did not fit"
        else:
            assert tried == [lowest]
        # Memory grows with length: nothing longer than a length that failed is tried after it.
        for index, length in enumerate(tried):
            if length > limit:
                assert all(later < length for later in tried[index + 1 :])


def test_the_search_takes_few_trials():
    tried: list[int] = []

    def fits(length: int) -> bool:
        tried.append(length)
        return length <= 100_000

    assert longest_fitting(fits, 4, 1 << 20, 4) == 100_000
    assert len(tried) <= 2 * 19


def test_the_search_refuses_lengths_off_its_step():
    with pytest.raises(ValueError, match="multiples of step"):
        longest_fitting(lambda length: True, 6, 16, 4)


# ------------------------------------------------------------------------------------------ video rows


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("sampling", [FrameSampling(num_frames=6), FrameSampling(fps=2.5, max_frames=7)])
def test_a_video_row_holds_the_most_frames_the_sampling_takes_at_the_largest_kept_size(
    family, sampling, tiny_model_dir, tmp_path
):
    from transformers import AutoConfig

    from omnilong.models.video_inputs import frame_size, video_span
    from omnilong.train.batches import IGNORE_INDEX, collate, video_token_id
    from omnilong.train.synthetic_rows import probe_clip, shortest_video_row, video_row, write_probe_video

    config = AutoConfig.from_pretrained(tiny_model_dir(family))
    video = VideoTokenParams()
    path = tmp_path / "video.mp4"
    write_probe_video(path, sampling, family, config, video)
    clip = probe_clip(path, sampling, family, config, video)
    frames = sampling.num_frames or sampling.max_frames
    assert len(clip.frame_indices) == frames
    # A frame twice as large gives no more tokens: the settings resize it down.
    span = video_span(family, config, video, frames, clip.height, clip.width)
    assert clip.num_tokens == span.num_tokens
    assert video_span(family, config, video, frames, 2 * clip.height, 2 * clip.width) == span
    assert frame_size(family, config, video, clip.height, clip.width) == (clip.height, clip.width)

    seq_len = shortest_video_row(clip) + 5
    row = video_row(seq_len, clip, family, config)
    placeholder = video_token_id(family, config)
    assert row["input_ids"].shape == (seq_len,) and int(row["doc_lens"].sum()) == seq_len
    assert int((row["input_ids"] == placeholder).sum()) == clip.num_tokens
    assert bool((row["labels"][row["input_ids"] == placeholder] == IGNORE_INDEX).all())
    assert int((row["labels"] != IGNORE_INDEX).sum()) == seq_len - clip.num_tokens - 1  # the first token is masked
    batch = collate([row], family=family, model_config=config, video_params=video, sp_rank=1, sp_size=2)
    assert batch.input_ids.shape == (1, seq_len)
    assert sum(batch.tokens_per_rank) == span.num_units * span.tokens_per_unit  # the ranks encode every frame
    with pytest.raises(ValueError, match="seq_len: expected at least"):
        video_row(shortest_video_row(clip) - 1, clip, family, config)


def test_a_video_stage_sampling_only_by_fps_has_no_frame_count_to_probe(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from omnilong.train.synthetic_rows import write_probe_video

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    with pytest.raises(ValueError, match=r"video_frames: expected a frame count .*max_frames"):
        write_probe_video(tmp_path / "v.mp4", FrameSampling(fps=2), "qwen2_5_vl", config, VideoTokenParams())


def test_a_text_row_is_one_document_with_its_first_token_masked():
    from omnilong.train.synthetic_rows import synthetic_row

    row = synthetic_row(12, 100)
    assert row["doc_lens"].tolist() == [12] and row["labels"][0] == -100
    torch.testing.assert_close(row["labels"][1:], row["input_ids"][1:])


# ------------------------------------------------------------------------------------------ the command

MIB = 2**20


def peak_of_length(seq_len: int, rank: int) -> int:
    """The probe test's stand-in for the measured peak: rank 1 holds a MiB more than rank 0."""
    return (seq_len + rank) * MIB


@pytest.mark.parametrize("cap, message", [(["--cap-gib", "0"], "--cap-gib: expected a positive number of GiB"),
                                          (["--cap-gib", "-2"], "--cap-gib: expected a positive number of GiB"),
                                          ([], "--cap-gib: required on CPU")])
def test_a_bad_or_missing_cap_is_a_usage_error_naming_the_option(cap, message):
    from typer.testing import CliRunner

    from omnilong.cli import app
    from tests.conftest import REPO

    if not cap and torch.cuda.is_available():
        pytest.skip("on GPU the device's memory is the cap")
    result = CliRunner().invoke(app, ["probe", "--params", str(REPO / "params.yaml"), *cap])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


@pytest.fixture
def probe_project(tiny_model_dir, tmp_path, monkeypatch):
    """A params file of the tiny model at sp_size 2 on 2 CPU ranks, the MLflow store under `tmp_path`."""
    import yaml

    from omnilong.config import load_params
    from tests.conftest import REPO

    raw = {
        "model": {"family": "qwen2_5_vl", "path": str(tiny_model_dir("qwen2_5_vl"))},
        "stages": {
            "stage1": {"seq_len": 16, "sp_size": 2},
            "stage2": {"seq_len": 16, "sp_size": 2},
            # Two frames at the largest size kept (112 x 112): 16 video tokens, 20 the shortest row.
            "stage3": {"seq_len": 20, "sp_size": 2, "video_frames": {"num_frames": 2}},
        },
        "tracking": {"experiment": "probe-test"},
    }
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # the default MLflow store is the working directory's
    # The trials (torchrun jobs, run from here) import omnilong and this test module's peak function.
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:{__import__('os').environ.get('PYTHONPATH', '')}")
    return load_params(params_file), params_file


@pytest.mark.slow
def test_the_probe_finds_a_length_that_fits_the_cap_whose_next_length_does_not(probe_project, tmp_path):
    import io
    import json

    import mlflow
    from rich.console import Console

    from omnilong.probe.main import probe_and_report
    from omnilong.probe.run import ProbeSettings

    params, params_file = probe_project
    cap = int(12.5 * MIB)  # rank 0 fits to 12 tokens, rank 1 to 11
    # Few trials (each a torchrun job): the bisection itself is tested above, in-process.
    settings = ProbeSettings(tmp_path / "probe", cap, min_seq_len=8, max_seq_len=20,
                             peak_function=f"{__name__}:peak_of_length")
    console = Console(file=io.StringIO(), width=200)
    report = probe_and_report(params, params_file, ["stage1", "stage3"], settings, on_gpu=False, console=console)

    records = json.loads(report.json_path.read_text())
    trials = {(t["stage"], t["seq_len"]): t for t in records["trials"]}
    assert all(t["seq_len"] % 4 == 0 for t in records["trials"])  # 2 x sp_size
    # Stage 1: 8 fits, 16 does not, and the bisection shows 8 + 4 does not either (rank 1's peak).
    assert [t["seq_len"] for t in records["trials"] if t["stage"] == "stage1"] == [8, 16, 12]
    assert records["stages"][0]["longest_seq_len"] == 8
    assert trials["stage1", 8]["fits"] and trials["stage1", 8]["peak_bytes"] == [8 * MIB, 9 * MIB]
    assert not trials["stage1", 12]["fits"] and trials["stage1", 12]["peak_bytes"] == [12 * MIB, 13 * MIB]
    assert trials["stage1", 8]["tokens_per_s"] > 0
    # Stage 3: its shortest row holding the video (20 tokens) already exceeds the cap.
    assert [t["seq_len"] for t in records["trials"] if t["stage"] == "stage3"] == [20]
    assert records["stages"][1]["longest_seq_len"] is None and not trials["stage3", 20]["fits"]
    printed = console.file.getvalue()
    assert "[stage1] seq_len 12: does not fit" in printed and "none (not even 20)" in printed

    run = mlflow.MlflowClient().get_run(report.run_id)
    assert run.data.metrics["probe.stage1.longest_seq_len"] == 8
    assert run.data.metrics["probe.stage3.longest_seq_len"] == 0
    assert run.data.metrics["probe.stage1.peak_gib"] == pytest.approx(9 * MIB / 2**30)
    artifacts = {artifact.path for artifact in mlflow.MlflowClient().list_artifacts(report.run_id)}
    assert {"probe.json", "probe.md"} <= artifacts
    markdown = (tmp_path / "probe" / "probe.md").read_text()
    assert "| stage1 | 8 | 0.01 / 0.01 |" in markdown


@pytest.mark.slow
def test_a_trial_that_crashes_for_another_reason_is_an_error_with_its_log(probe_project, tmp_path):
    from omnilong.probe.run import ProbeSettings, TrialError, run_trial

    settings = ProbeSettings(tmp_path / "probe", 2**30)
    with pytest.raises(TrialError, match=r"(?s)stage1 at seq_len 8: the trial failed.*parameter file not found"):
        run_trial(tmp_path / "missing.yaml", "stage1", 8, 2, settings, None)
