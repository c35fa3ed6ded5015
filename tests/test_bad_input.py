"""Bad input, one table: each case feeds one bad input through the command a user runs (the
`omnilong` CLI, or `dvc`, in a subprocess) and expects a non-zero exit, a message naming the
culprit (key, file, line, record) and what was expected, no Python traceback, and no output a
later step could take for complete.

Every case stops before torchrun starts. The full disk is a patched free-space reading
(`omnilong.train.disk_space.free_bytes`, patched in the `omnilong` process before the CLI runs):
a filesystem that can be filled on demand needs privileges CI does not have.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, project_env
from tests.test_config import DEFAULT
from tests.test_config import _set as at  # a params mutation: at(key path, value)
from tests.test_video_frames import make_unreadable
from tests.test_videomme import _video_entry

TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Expect:
    """What a case runs and what its failure must say."""

    args: list[str]
    culprit: str
    """Names the bad key, file, line or record."""
    expected: str
    """Says what was expected instead."""
    absent: list[Path] = field(default_factory=list)
    """Outputs that must not exist afterwards."""
    command: list[str] | None = None
    """The program when it is not `omnilong` (a path: dvc)."""
    within_s: float | None = None
    """The most seconds the command may take (a preflight that must not wait on MLflow's retries)."""
    holds: object = None
    """Kept alive while the command runs (a listening socket)."""


class Inputs:
    """What the cases share, made once per module: the tiny model, a small corpus, a registry."""

    def __init__(self, tiny_model_dir, tiny_raw_dir: Path, directory: Path):
        self.model = tiny_model_dir("qwen2_5_vl")
        self.raw_dir = tiny_raw_dir
        self.directory = directory

    @property
    def video(self) -> Path:
        return self.raw_dir / "default" / "video" / "video-00000.mp4"

    @cached_property
    def registry(self) -> str:
        """A tracking store in which `omnilong-qwen2_5_vl@stage1` is the tiny model."""
        import mlflow
        from mlflow import MlflowClient

        from omnilong.tracking.registry import register_stage_model

        uri = f"sqlite:///{self.directory / 'mlflow.db'}"
        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)  # register_stage_model's client uses the global store
        try:
            client = MlflowClient()
            experiment = client.create_experiment("bad-input", artifact_location=str(self.directory / "artifacts"))
            run_id = client.create_run(experiment).info.run_id
            register_stage_model(run_id, self.model, "omnilong-qwen2_5_vl", "stage1")
            assert client.get_model_version_by_alias("omnilong-qwen2_5_vl", "stage1")
        finally:
            mlflow.set_tracking_uri(before)
        return uri


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tiny_raw_dir, tmp_path_factory) -> Inputs:
    return Inputs(tiny_model_dir, tiny_raw_dir, tmp_path_factory.mktemp("bad_input"))


def params_file(work: Path, inputs: Inputs, *changes: Callable[[dict], None]) -> Path:
    """params.yaml in `work`: the default, on the shared tiny model and corpus, outputs under
    `work`, tracking off unless a change turns it on; then `changes`."""
    doc = copy.deepcopy(DEFAULT)
    doc["model"]["path"] = str(inputs.model)
    doc["data"].update(raw_dir=str(inputs.raw_dir), tokenized_dir=str(work / "tokenized"),
                       packed_dir=str(work / "packed"))
    doc["tracking"] = {"enabled": False}
    for change in changes:
        change(doc)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def config_check(work: Path, inputs: Inputs, *changes) -> list[str]:
    return ["config", "check", str(params_file(work, inputs, *changes))]


# --- parameters ----------------------------------------------------------------------------------

def param_type(work, inputs):
    return Expect(config_check(work, inputs, at("parallel.nproc_per_node", "two")),
                  "parallel.nproc_per_node", "a valid integer")


def param_unknown_key(work, inputs):
    return Expect(config_check(work, inputs, at("stages.stage1.train.learning_rate", 1e-3)),
                  "stages.stage1.train.learning_rate", "unknown key")


def param_list_given_a_string(work, inputs):
    return Expect(config_check(work, inputs, at("stages.stage1.corpora", "default")),
                  "stages.stage1.corpora", "a valid list")


def param_sp_size_not_dividing_the_world(work, inputs):
    return Expect(config_check(work, inputs, at("stages.stage2.sp_size", 4)),
                  "stages.stage2.sp_size", "a divisor of the world size 2")


def param_seq_len_not_a_multiple_of_2_sp(work, inputs):
    return Expect(config_check(work, inputs, at("stages.stage2.seq_len", 4094)),
                  "stages.stage2.seq_len", "a multiple of 2 x sp_size = 4")


def param_from_step_not_increasing(work, inputs):
    schedule = [{"from_step": 0, "seq_len": 256}, {"from_step": 6, "seq_len": 512}, {"from_step": 6, "seq_len": 1024}]
    return Expect(config_check(work, inputs, at("stages.stage1.context_schedule", schedule)),
                  "stages.stage1.context_schedule.2.from_step", "more than the previous entry's from_step (6)")


def param_mixture_naming_no_corpus_of_the_stage(work, inputs):
    return Expect(config_check(work, inputs, at("stages.stage1.mixture", {"default": 0.7, "web": 0.3})),
                  "stages.stage1.mixture.web", "expected a corpus of this stage's corpora (default)")


def param_mixture_weight_negative(work, inputs):
    return Expect(config_check(work, inputs, at("stages.stage1.mixture", {"default": -1.0})),
                  "stages.stage1.mixture.default", "greater than 0")


def param_lora_target_matching_no_module(work, inputs):
    lora = at("stages.stage2.train.lora.target_modules", ["q_proj", "qkv"])
    return Expect(config_check(work, inputs, at("stages.stage2.train.finetune", "lora"), lora),
                  "stages.stage2.train.lora.target_modules.1: 'qkv' matches no module", "expected one of ")


def params_not_yaml(work, inputs):
    path = work / "params.yaml"
    path.write_text("model:\n  family: [qwen2_5_vl\nstages: {}\n")
    return Expect(["config", "check", str(path)], f"{path}: not valid YAML", "line 3")


# --- the model directory --------------------------------------------------------------------------

def copy_model(inputs: Inputs, work: Path, leave_out: str | None = None) -> Path:
    """The tiny model's files (links to them, but a copy of tokenizer.json) without `leave_out`."""
    model = work / "model"
    model.mkdir()
    for path in inputs.model.iterdir():
        if path.name != leave_out:
            (model / path.name).symlink_to(path) if path.name != "tokenizer.json" else shutil.copy(path, model)
    return model


def model_missing(work, inputs):
    return Expect(config_check(work, inputs, at("model.path", str(work / "no-model"))),
                  "model.path", "expected a local model directory with config.json")


def model_partial(work, inputs):
    model = copy_model(inputs, work, leave_out="model.safetensors")  # an interrupted download
    return Expect(config_check(work, inputs, at("model.path", str(model))),
                  "model.path", "expected weights as model.safetensors or model.safetensors.index.json")


def model_pickled_weights_only(work, inputs):
    model = copy_model(inputs, work, leave_out="model.safetensors")
    (model / "pytorch_model.bin").write_bytes(b"not loaded: a pickle could run code")
    return Expect(config_check(work, inputs, at("model.path", str(model))),
                  "found only pytorch_model.bin", "expected weights as model.safetensors")


def model_of_another_family(work, inputs):
    return Expect(config_check(work, inputs, at("model.family", "llava_onevision")),
                  "model.path", "expected a llava_onevision model (model_type 'llava_onevision' in config.json)")


def tokenizer_without_the_family_tokens(work, inputs):
    """A plain text tokenizer: Qwen2.5-VL's vision tokens renamed away."""
    model = copy_model(inputs, work)
    tokenizer = model / "tokenizer.json"
    text = tokenizer.read_text()
    for token in ("<|vision_start|>", "<|video_pad|>"):
        text = text.replace(json.dumps(token), json.dumps(token.replace("|>", "_text|>")))
    tokenizer.write_text(text)
    return Expect(["data", "prepare", "--params", str(params_file(work, inputs, at("model.path", str(model))))],
                  "model.path", "expected a tokenizer with the qwen2_5_vl special tokens, given "
                  f"{str(model)!r}: its tokenizer lacks <|vision_start|>, <|video_pad|>",
                  absent=[work / "tokenized"])


# --- the registry and the tracking server ----------------------------------------------------------

def registry_name_unknown(work, inputs):
    params = params_file(work, inputs, at("tracking.uri", inputs.registry))
    model = "models:/omnilong-llama@stage1"
    return Expect(["generate", "--model", model, "--question", "hi", "--params", str(params)],
                  f"{model}: not found", "expected models:/NAME@ALIAS of a registered model")


def registry_alias_unknown(work, inputs):
    params = params_file(work, inputs, at("tracking.uri", inputs.registry))
    model = "models:/omnilong-qwen2_5_vl@stage9"
    return Expect(["generate", "--model", model, "--question", "hi", "--params", str(params)],
                  f"{model}: not found", "and one of its aliases")


def tracking_server_refusing(work, inputs):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://omnilong:s3cret@127.0.0.1:{port}"
    params = params_file(work, inputs, at("tracking.uri", uri))
    return Expect(["generate", "--model", "models:/omnilong-qwen2_5_vl@stage1", "--question", "hi",
                   "--params", str(params)],
                  f"tracking.uri: expected a reachable MLflow tracking server, given 'http://omnilong:***@127.0.0.1:{port}'",
                  "Connection refused")


def tracking_server_silent(work, inputs):
    """A server that accepts connections and never answers (hung, or behind a firewall)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    params = params_file(work, inputs, at("tracking", {"enabled": True, "uri": f"http://127.0.0.1:{port}"}))
    return Expect(["train", "--stage", "1", "--params", str(params)], "tracking.uri",
                  "did not answer within 5 s", absent=[work / "runs", work / "checkpoints", work / "mlruns"],
                  within_s=60, holds=server)


# --- corpora: `omnilong data add` ----------------------------------------------------------------

def add_corpus(work: Path, inputs: Inputs, source: Path, kind: str) -> list[str]:
    params = params_file(work, inputs, at("data.raw_dir", str(work / "raw")))
    return ["data", "add", str(source), "--kind", kind, "--name", "mine", "--params", str(params)]


def write_lines(path: Path, *lines: bytes | str | dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(
        (line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n"
        for line in lines))
    return path


TEXT = {"id": "doc", "source": "test", "text": "A document."}
CHAT = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer."}]


def corpus_empty_file(work, inputs):
    path = write_lines(work / "in" / "empty.jsonl")
    return Expect(add_corpus(work, inputs, path, "text"), f"{path}: holds no record",
                  "expected one JSON record per line", absent=[work / "raw"])


def corpus_line_not_utf8(work, inputs):
    path = write_lines(work / "in" / "docs.jsonl", TEXT, b'{"id": "caf\xe9", "source": "latin-1", "text": "x"}')
    return Expect(add_corpus(work, inputs, path, "text"), f"{path}:2: not UTF-8 text",
                  "expected one JSON record per line, encoded as UTF-8", absent=[work / "raw"])


def corpus_broken_json(work, inputs):
    path = write_lines(work / "in" / "docs.jsonl", TEXT, TEXT, '{"id": "cut", "source": "test", "text": "A doc')
    return Expect(add_corpus(work, inputs, path, "text"), f"{path}:3: not valid JSON",
                  "expected one JSON record per line",
                  absent=[work / "raw"])


def corpus_record_without_a_field(work, inputs):
    path = write_lines(work / "in" / "docs.jsonl", {"id": "doc", "source": "test"})
    return Expect(add_corpus(work, inputs, path, "text"), f"{path}:1: not a valid text record (field text",
                  "Field required", absent=[work / "raw"])


def corpus_chat_not_ending_with_the_assistant(work, inputs):
    path = write_lines(work / "in" / "chats.jsonl", {"id": "ok", "messages": CHAT},
                       {"id": "open", "messages": [*CHAT, {"role": "user", "content": "And?"}]})
    return Expect(add_corpus(work, inputs, path, "instruct"), f"{path}:2: not a valid instruct record",
                  "the last message must be the assistant's answer", absent=[work / "raw"])


def corpus_zst_stream_cut(work, inputs):
    import zstandard

    path = work / "in" / "docs.jsonl.zst"
    path.parent.mkdir(parents=True)
    line = json.dumps(TEXT).encode() + b"\n"
    compressor = zstandard.ZstdCompressor()
    path.write_bytes(compressor.compress(line) + compressor.compress(line * 2)[:-4])  # the second frame cut short
    return Expect(add_corpus(work, inputs, path, "text"), f"{path}:2: the zstd stream is broken here",
                  "expected a complete zstd-compressed JSONL file", absent=[work / "raw"])


def corpus_parquet_row_without_the_mapped_field(work, inputs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / "in" / "docs.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"uid": "a", "body": "A document."}, {"uid": "b", "body": None}]), path)
    params = params_file(work, inputs, at("data.raw_dir", str(work / "raw")),
                         at("data.fields", {"mine": {"text_field": "body", "id_field": "uid", "source_field": None}}))
    return Expect(["data", "add", str(path), "--kind", "text", "--name", "mine", "--params", str(params)],
                  f"{path}: row 1: not a valid text record (field body", "the mapping's text_field: missing or null",
                  absent=[work / "raw"])


def prepare_broken_json(work, inputs):
    """`data prepare` reads a corpus that bypassed `data add`: the same error, and no tokenized output."""
    raw = work / "raw"
    (raw / "default").parent.mkdir()
    (raw / "default").symlink_to(inputs.raw_dir / "default")
    path = write_lines(raw / "user" / "mine" / "text" / "part.jsonl", TEXT, "{not json}")
    params = params_file(work, inputs, at("data.raw_dir", str(raw)), at("stages.stage1.corpora", ["default", "mine"]))
    return Expect(["data", "prepare", "--params", str(params)], f"{path}:2: not valid JSON",
                  "expected one JSON record per line", absent=[work / "tokenized" / "stage1"])


# --- videos and subtitles: `omnilong data add --kind video` ------------------------------------------

def video_corpus(work: Path, inputs: Inputs, video: Path, **record) -> tuple[list[str], Path]:
    """A video corpus directory: `video` (copied or made there) and qa.jsonl naming it."""
    corpus = work / "clips"
    corpus.mkdir(exist_ok=True)
    if video.parent != corpus:
        shutil.copy(video, corpus / video.name)
    write_lines(corpus / "qa.jsonl", {"id": "clip", "video": video.name, "messages": CHAT, **record})
    return add_corpus(work, inputs, corpus, "video"), corpus / video.name


def unreadable_video(kind: str, reason: str):
    def case(work, inputs):
        (work / "clips").mkdir()
        args, video = video_corpus(work, inputs, make_unreadable(kind, work / "clips", inputs.video))
        return Expect(args, f"record 'clip': {video}: ", reason, absent=[work / "raw"])

    case.__name__ = f"video_{kind.replace('-', '_')}"
    return case


def video_unsupported_codec(work, inputs):
    """An mp4 whose video stream's codec is one no decoder knows (its sample entry renamed)."""
    (work / "clips").mkdir()
    video = work / "clips" / "clip.mp4"
    data = inputs.video.read_bytes()
    entry = data.rindex(b"avc1")  # the stream's sample entry; the first is a brand of the file type
    video.write_bytes(data[:entry] + b"zzz1" + data[entry + 4:])
    args, video = video_corpus(work, inputs, video)
    return Expect(args, f"record 'clip': {video}: the codec of its video stream", "expected a video in a common codec",
                  absent=[work / "raw"])


def video_window_beyond_the_end(work, inputs):
    args, video = video_corpus(work, inputs, inputs.video, start_s=100.0, end_s=110.0)
    return Expect(args, "record 'clip': frame window start_s=100.0, end_s=110.0",
                  "expected 0 <= start_s < end_s <= the duration", absent=[work / "raw"])


def srt_with_bad_timestamps(work, inputs):
    args, video = video_corpus(work, inputs, inputs.video, subtitles="clip.srt")
    srt = write_lines(work / "clips" / "clip.srt", "1", "00:00:01,000 --> 00:00:02,000", "Hello.", "",
                      "2", "00:00:03.5 --> 00:00:04,000", "Again.")
    return Expect(args, f"record 'clip': {srt}:6:", "expected a timing line 'HH:MM:SS,mmm --> HH:MM:SS,mmm'",
                  absent=[work / "raw"])


# --- evaluation data -------------------------------------------------------------------------------

def videomme_missing_fields(work, inputs):
    entry = _video_entry("002")
    del entry["duration"]
    path = work / "results.json"
    path.write_text(json.dumps([_video_entry("001"), entry]))
    return Expect(["report", "videomme", "--without-subtitles", str(path), "--out", str(work / "report")],
                  f"{path}: entry 1 (video_id '002'): duration or duration_category", "required field is missing",
                  absent=[work / "report"])


# --- packing and training -------------------------------------------------------------------------

def pack_before_prepare(work, inputs):
    return Expect(["data", "pack", "--stage", "1", "--params", str(params_file(work, inputs))],
                  str(work / "tokenized" / "stage1" / "index.json"), "run `omnilong data prepare` first",
                  absent=[work / "packed"])


def train_unknown_stage(work, inputs):
    return Expect(["train", "--stage", "4", "--params", str(params_file(work, inputs))],
                  "--stage", "expected one of 1, 2, 3 (or stage1..stage3), given '4'", absent=[work / "runs"])


def train_without_the_previous_stage(work, inputs):
    return Expect(["train", "--stage", "2", "--params", str(params_file(work, inputs))],
                  "--init runs/stage1/model", "train stage1 first (`dvc repro train@stage1`) or pass --init",
                  absent=[work / "runs", work / "checkpoints"])


def train_on_nodes_without_a_rendezvous(work, inputs):
    params = params_file(work, inputs, at("parallel.nnodes", 2))
    return Expect(["train", "--stage", "1", "--params", str(params)], "parallel.rdzv_endpoint",
                  "expected host:port of the rendezvous every node meets at", absent=[work / "runs"])


def full_disk(work, inputs):
    """1 MB free where stage 1 writes its checkpoints and model (the free-space reading patched)."""
    patch = ("import omnilong.train.disk_space as d; d.free_bytes = lambda directory: 1_000_000; "
             "from omnilong.cli import main; main()")
    params = params_file(work, inputs)
    return Expect(["train", "--stage", "1", "--params", str(params)], "checkpoints/stage1: a checkpoint and the "
                  "exported model (in runs/stage1) needs about", "but 1,000,000 bytes (0.00 GiB) are free",
                  absent=[work / "runs", work / "checkpoints"], command=[sys.executable, "-c", patch])


# --- DVC ------------------------------------------------------------------------------------------

def dvc_remote_missing(work, inputs):
    """`dvc pull` in a clone whose remote's folder is gone: the data is not half restored."""
    env = project_env(work)
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=work, env=env, check=True)
    write_lines(work / "data" / "corpus" / "docs.jsonl", TEXT)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data/corpus"], cwd=work, env=env, check=True)
    (work / ".dvc" / "config").write_text('[core]\n    remote = local\n[\'remote "local"\']\n    url = ../gone\n')
    shutil.rmtree(work / ".dvc" / "cache")
    shutil.rmtree(work / "data" / "corpus")
    return Expect(["pull"], "data/corpus", "Missing cache files", absent=[work / "data" / "corpus"],
                  command=[sys.executable, "-m", "dvc"])


CASES = [
    param_type, param_unknown_key, param_list_given_a_string, param_sp_size_not_dividing_the_world,
    param_seq_len_not_a_multiple_of_2_sp, param_from_step_not_increasing, param_mixture_naming_no_corpus_of_the_stage,
    param_mixture_weight_negative, param_lora_target_matching_no_module, params_not_yaml,
    model_missing, model_partial, model_pickled_weights_only, model_of_another_family,
    tokenizer_without_the_family_tokens,
    registry_name_unknown, registry_alias_unknown, tracking_server_refusing, tracking_server_silent,
    corpus_empty_file, corpus_line_not_utf8, corpus_broken_json, corpus_record_without_a_field,
    corpus_chat_not_ending_with_the_assistant, corpus_zst_stream_cut, corpus_parquet_row_without_the_mapped_field,
    prepare_broken_json,
    unreadable_video("random-bytes", "cannot be read as a video"),
    unreadable_video("truncated", "corrupt or truncated file"),
    unreadable_video("zero-frames", "no video stream with frames"),
    unreadable_video("audio-only", "no video stream with frames"),
    video_unsupported_codec, video_window_beyond_the_end, srt_with_bad_timestamps,
    videomme_missing_fields,
    pack_before_prepare, train_unknown_stage, train_without_the_previous_stage, train_on_nodes_without_a_rendezvous,
    full_disk,
    dvc_remote_missing,
]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_fails_naming_the_culprit(case, inputs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    expect = case(work, inputs)
    command = expect.command or [sys.executable, "-m", "omnilong.cli"]
    env = {**project_env(work), "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    started = time.monotonic()
    result = subprocess.run([*command, *expect.args], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert TRACEBACK not in output, output
    assert expect.culprit in output, output
    assert expect.expected in output, output
    for path in expect.absent:
        assert not path.exists(), f"{path} left behind"
    if expect.within_s is not None:
        assert elapsed < expect.within_s
    if isinstance(expect.holds, socket.socket):
        expect.holds.close()
