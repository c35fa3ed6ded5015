"""params.yaml validation: every bad value fails before any work, naming the key path."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from omnilong.cli import app
from omnilong.config import ConfigError, load_params
from omnilong.models.model_dir import check_model_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def _set(path: str, value):
    def mutate(doc):
        *parents, leaf = path.split(".")
        for key in parents:
            doc = doc.setdefault(key, {})
        doc[leaf] = value

    return mutate


def _delete(path: str):
    def mutate(doc):
        *parents, leaf = path.split(".")
        for key in parents:
            doc = doc[key]
        del doc[leaf]

    return mutate


# (mutation, key path the message must name, a fragment saying what was expected or given)
BAD_FILES = [
    (_set("stages.stage1.seq_len", 1023), "stages.stage1.seq_len", "multiple of 2 x sp_size = 4"),
    (_set("stages.stage2.sp_size", 4), "stages.stage2.sp_size", "divisor of the world size 2"),
    (_set("eval.sp_size", 4), "eval.sp_size", "divisor of the world size 2"),
    (_set("eval.sp_size", 0), "eval.sp_size", "greater than 0"),
    (_set("eval.heldout_documents", 0), "eval.heldout_documents", "a count of documents (an integer >= 1)"),
    (_set("eval.heldout_documents", 1.0), "eval.heldout_documents", "or a fraction in (0, 1)"),
    (_set("eval.heldout_rows", 2), "eval.heldout_rows", "unknown key"),
    (_set("stages.stage1.train.lr", -1e-4), "stages.stage1.train.lr", "greater than 0"),
    (_delete("model.path"), "model.path", "required key is missing"),
    (_set("model.path", ""), "model.path", "at least 1 character"),
    (_set("model.famly", "qwen2_5_vl"), "model.famly", "unknown key"),
    (_set("model.family", "llama"), "model.family", "'qwen2_5_vl' or 'llava_onevision'"),
    (_set("parallel.nproc_per_node", "two"), "parallel.nproc_per_node", "valid integer"),
    (_set("parallel.timeout_s", 0), "parallel.timeout_s", "greater than 0"),
    (_set("parallel.rdzv_endpoint", "node0"), "parallel.rdzv_endpoint", "should match pattern"),
    (_set("parallel.hierarchical_partition", True), "parallel.hierarchical_partition", "false with one node"),
    (_delete("stages.stage3.video_frames"), "stages.stage3.video_frames", "video stage"),
    (_set("stages.stage1.video_frames", {"num_frames": 8}), "stages.stage1.video_frames", "trains on text"),
    (_set("stages.stage3.video_frames", {"num_frames": 8, "fps": 2}), "stages.stage3.video_frames.num_frames",
     "exactly one of num_frames and fps"),
    (_set("stages.stage3.video_frames", {}), "stages.stage3.video_frames.num_frames",
     "exactly one of num_frames and fps"),
    (_set("stages.stage3.video_frames", {"num_frames": 8, "max_frames": 16}), "stages.stage3.video_frames.max_frames",
     "unset unless fps is set"),
    (_set("stages.stage3.video_frames", {"fps": 0}), "stages.stage3.video_frames.fps", "greater than 0"),
    (_set("data.synth.video.long.num_frames", 1), "data.synth.video.long.num_frames", "greater than or equal to 2"),
    (_set("model.tiny.num_key_value_heads", 3), "model.tiny.num_key_value_heads", "divisor of num_attention_heads"),
    (_set("stages.stage2.corpora", ["../etc"]), "stages.stage2.corpora.0", "should match pattern"),
    (_set("stages.stage2.corpora", []), "stages.stage2.corpora", "at least 1 item"),
    (_set("model.video.qwen2_5_vl.min_pixels", 10**6), "model.video.qwen2_5_vl.min_pixels", "at most max_pixels"),
    (_set("data.synth.video.height", 33), "data.synth.video.height", "even"),
    (_set("eval.niah.depths", [0, 150]), "eval.niah.depths.1", "less than or equal to 100"),
    (_set("stages.stage3.train.finetune", "qlora"), "stages.stage3.train.finetune", "'full' or 'lora'"),
    (_delete("stages.stage2"), "stages.stage2", "required key is missing"),
    (_set("stages.stage1.mixture", {"default": 0.5}), "stages.stage1.mixture", "weights summing to 1"),
    (_set("stages.stage1.mixture", {"default": 1.0, "web": 0.0}), "stages.stage1.mixture.web", "greater than 0"),
    (lambda doc: [_set("stages.stage1.corpora", ["default", "web"])(doc),
                  _set("stages.stage1.mixture", {"web": 1.0})(doc)],
     "stages.stage1.mixture", "a weight for each of this stage's corpora; missing default"),
    (_set("stages.stage2.mixture", {"default": 1.0}), "stages.stage2.mixture", "draws the text documents of stage 1"),
    (_set("stages.stage1.long_documents", {"min_tokens": 4096, "factor": 3}), "stages.stage1.long_documents",
     "unset unless mixture is set"),
    (_set("stages.stage1.long_documents", {"min_tokens": 4096, "factor": 0.5}), "stages.stage1.long_documents.factor",
     "greater than 1"),
    (_set("stages.stage3.context_schedule", [{"from_step": 0, "seq_len": 1536, "video_frames": {"num_frames": 8}}]),
     "stages.stage3.context_schedule.0.video_frames", "the stage's video_frames (fps: 4.0, max_frames: 256) or unset"),
    (_set("stages.stage1.context_schedule", [{"from_step": 0, "seq_len": 512, "video_frames": {"num_frames": 8}},
                                             {"from_step": 6, "seq_len": 1024}]),
     "stages.stage1.context_schedule.0.video_frames", "unset: this stage trains on text"),
    (_set("stages.stage3.context_schedule", [{"from_step": 0, "seq_len": 1024,
                                              "video_frames": {"fps": 2, "num_frames": 8}},
                                             {"from_step": 6, "seq_len": 1536}]),
     "stages.stage3.context_schedule.0.video_frames.num_frames", "exactly one of num_frames and fps"),
]


@pytest.mark.parametrize(("mutate", "key", "fragment"), BAD_FILES, ids=[case[1] for case in BAD_FILES])
def test_bad_file_names_the_key_and_exits_2(tmp_path, mutate, key, fragment):
    doc = copy.deepcopy(DEFAULT)
    mutate(doc)
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(doc))

    with pytest.raises(ConfigError) as excinfo:
        load_params(bad)
    message = str(excinfo.value)
    assert f"{key}:" in message
    assert fragment in message

    result = CliRunner().invoke(app, ["config", "check", str(bad), "--skip-path-checks"])
    assert result.exit_code == 2
    assert key in result.output


def test_default_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.stages.stage1.sp_size == 2
    assert params.parallel.world_size == 2
    # The demo runs the video stage with sequence parallelism, on long videos.
    assert params.stages.stage3.sp_size == 2
    assert params.data.synth.video.long.num_videos > 0 and params.data.synth.video.long.num_frames >= 256


def test_missing_model_directory_is_named(tmp_path):
    doc = copy.deepcopy(DEFAULT)
    doc["model"]["path"] = str(tmp_path / "no-such-model")
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"model\.path: expected a local model directory"):
        load_params(bad, check_paths=True)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_a_phase_without_room_for_its_frames_is_named(tmp_path, tiny_model_dir, family):
    """The fewest tokens a frame takes: Qwen2.5-VL scales a frame up to min_pixels (56 x 56 here:
    2 x 2 merged patches, 4 tokens per temporal patch of 2 frames); the tiny LLaVA-OneVision pools
    each frame to 2 x 2 tokens, and one newline follows the video."""
    fewest_per_frame = {"qwen2_5_vl": 2, "llava_onevision": 4}[family]
    newline = {"qwen2_5_vl": 0, "llava_onevision": 1}[family]
    raw_dir = tmp_path / "raw"
    (raw_dir / "default").mkdir(parents=True)
    doc = copy.deepcopy(DEFAULT)
    doc["model"].update(family=family, path=str(tiny_model_dir(family)))
    doc["data"]["raw_dir"] = str(raw_dir)
    fits = fewest_per_frame * 128 + newline  # the first phase's 128 frames, exactly
    doc["stages"]["stage3"]["context_schedule"][0]["seq_len"] = -(-fits // 4) * 4  # a multiple of 2 x sp_size
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(doc))
    check_model_dir(load_params(good, check_paths=True))

    doc["stages"]["stage3"]["context_schedule"][0]["seq_len"] = (fits - 1) // 4 * 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=rf"stages\.stage3\.context_schedule\.0\.seq_len: expected room for 128 "
                                          rf"frames \(fps4-max128\), which take at least {fits} video tokens"):
        check_model_dir(load_params(bad, check_paths=True))
    result = CliRunner().invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 2 and "stages.stage3.context_schedule.0.seq_len" in result.output


def test_not_yaml_and_not_a_mapping(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(scalar)


def test_console_script_exits_2_before_any_work(tmp_path):
    doc = copy.deepcopy(DEFAULT)
    doc["stages"]["stage1"]["seq_len"] = 1002  # not a multiple of 2 x sp_size = 4
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out_dir = tmp_path / "corpus"
    result = subprocess.run(
        [sys.executable, "-m", "omnilong.cli", "data", "synth", "--params", str(bad), "--out", str(out_dir)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "stages.stage1.seq_len" in result.stderr
    assert not out_dir.exists()


def test_schema_is_printed_as_json():
    result = CliRunner().invoke(app, ["config", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert {"model", "stages", "parallel"} <= set(schema["properties"])


def test_heldout_fraction_rounds_up_but_not_floating_point_error():
    from omnilong.config import EvalParams

    fraction = EvalParams(heldout_documents=0.1)
    assert [fraction.heldout_count(n) for n in (30, 31, 5)] == [3, 4, 1]
    assert EvalParams(heldout_documents=7).heldout_count(1000) == 7
