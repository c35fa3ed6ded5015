"""Prepare: chat spans of both families' templates, video placeholders, subtitles, windows, corpus errors,
batches and workers (the same bytes for any number), and the throughput benchmark's quick run."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import random
import re
import shutil
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
from transformers import AutoConfig

from omnilong.config import VideoSynthParams, parse_params
from omnilong.data.pack import pack_stage
from omnilong.data.prepare import (
    DocumentEntry,
    PrepareError,
    RecordBatch,
    TokenizedDocument,
    batch_documents,
    chat_document,
    encoding_pool,
    encoding_task,
    load_tokenized,
    prepare_corpora,
    prepare_stage,
    text_document,
    write_tokenized,
)
from omnilong.data.schemas import InstructRecord, Message, RecordError, TextRecord, iter_records
from omnilong.data.shards import PackedShards
from omnilong.data.token_encoding import backend_json, encode_texts, load_backend
from omnilong.data.synth.video import encode_mp4, random_scene, render_frame
from omnilong.models.families import get_family
from omnilong.models.loading import load_tokenizer
from omnilong.models.tokenizer import train_tokenizer
from omnilong.models.video_inputs import num_video_tokens
from tests.conftest import quick_benchmark

CONVERSATION = [
    Message(role="user", content="Here is a long context about the river. What colour is the boat?"),
    Message(role="assistant", content="The boat is red."),
    Message(role="user", content="And the bridge?"),
    Message(role="assistant", content="The bridge is made of old grey stone."),
    Message(role="user", content="Is the boat (a) small or (b) large?"),
    # Also a letter of the role header: the answer must not be located there.
    Message(role="assistant", content="a"),
]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision"])
def family_tokenizer(request):
    texts = [message.content for message in CONVERSATION] * 20
    return request.param, train_tokenizer(texts, get_family(request.param), vocab_size=400)


def as_trained(rendered: str) -> str:
    """A chat's rendering by the template as training holds it: each assistant header is the
    generation prompt's. LLaVA-OneVision's published template writes `assistant \\n` in a
    conversation and `assistant\\n` to generate; Qwen2.5-VL's writes `assistant\\n` in both."""
    return rendered.replace("<|im_start|>assistant \n", "<|im_start|>assistant\n")


def trainable_runs(token_ids: list[int], trainable: list[bool]) -> list[list[int]]:
    return [
        [token for token, _ in run]
        for is_trained, run in itertools.groupby(zip(token_ids, trainable), key=lambda pair: pair[1])
        if is_trained
    ]


@pytest.mark.parametrize("with_video", [False, True])
def test_only_assistant_answers_and_their_end_of_turn_are_trainable(family_tokenizer, with_video):
    family, tokenizer = family_tokenizer
    token_ids, trainable = chat_document(tokenizer, CONVERSATION, with_video=with_video)
    assert len(token_ids) == len(trainable)

    answers = [tokenizer.decode(run) for run in trainable_runs(token_ids, trainable)]
    assert answers == [m.content + tokenizer.eos_token for m in CONVERSATION if m.role == "assistant"]

    # Cutting into segments changed nothing: the tokens spell the template's rendering as trained.
    chat = [{"role": m.role, "content": [{"type": "text", "text": m.content}]} for m in CONVERSATION]
    if with_video:
        chat[0]["content"].insert(0, {"type": "video"})
    assert tokenizer.decode(token_ids) == as_trained(tokenizer.apply_chat_template(chat, tokenize=False))

    video_token_id = tokenizer.convert_tokens_to_ids(get_family(family).video_token)
    video_positions = np.flatnonzero(np.asarray(token_ids) == video_token_id)
    assert len(video_positions) == (1 if with_video else 0)
    if with_video:
        first_user_text = tokenizer.encode(CONVERSATION[0].content, add_special_tokens=False)
        text_start = next(
            i for i in range(len(token_ids)) if token_ids[i : i + len(first_user_text)] == first_user_text
        )
        assert video_positions[0] < text_start and not trainable[video_positions[0]]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_video_placeholder_run_has_the_models_token_count(tiny_prepared, family):
    params, root = tiny_prepared(family)
    model_config = AutoConfig.from_pretrained(root / params.model.path)
    video_token_id = model_config.video_token_id if family == "qwen2_5_vl" else model_config.video_token_index
    tokenized = load_tokenized(root / params.data.tokenized_dir / "stage3")
    assert tokenized.index.num_documents == 3
    for doc, entry in enumerate(tokenized.index.documents):
        clip = entry.video
        with av.open(str(root / clip.path)) as container:  # the video's size, read apart from decord
            stream = container.streams.video[0]
            height, width = stream.codec_context.height, stream.codec_context.width
            num_frames = sum(1 for _ in container.decode(stream))
        expected = num_video_tokens(
            family, model_config, params.model.video, params.stages.stage3.video_frames.num_frames, height, width
        )
        token_ids, trainable = tokenized.document(doc)
        video_positions = np.flatnonzero(token_ids == video_token_id)
        assert clip.num_tokens == expected == len(video_positions)
        run = np.arange(clip.token_offset, clip.token_offset + expected)
        np.testing.assert_array_equal(video_positions, run)
        assert not trainable[video_positions].any()
        assert len(clip.frame_indices) == params.stages.stage3.video_frames.num_frames
        assert clip.frame_indices == sorted(clip.frame_indices) and 0 <= clip.frame_indices[0]
        assert clip.frame_indices[-1] < num_frames
        assert (clip.height, clip.width) == (height, width)


def user_corpus_params(tmp_path: Path, model_dir: Path, corpus: str):
    stage = {"corpora": [corpus], "seq_len": 64, "sp_size": 1}
    return parse_params(
        {
            "model": {"family": "qwen2_5_vl", "path": str(model_dir)},
            "data": {"raw_dir": str(tmp_path / "raw"), "tokenized_dir": str(tmp_path / "tokenized")},
            "stages": {"stage1": stage, "stage2": stage, "stage3": {**stage, "video_frames": {"num_frames": 2}}},
        }
    )


def test_bad_record_names_file_line_and_field_and_keeps_the_previous_output(tmp_path, tiny_model_dir):
    params = user_corpus_params(tmp_path, tiny_model_dir("qwen2_5_vl"), "mine")
    text_dir = tmp_path / "raw" / "user" / "mine" / "text"
    text_dir.mkdir(parents=True)
    bad_file = text_dir / "docs.jsonl"
    good = {"id": "a", "source": "test", "text": "hello world"}
    bad_file.write_text(json.dumps(good) + "\n\n" + json.dumps({"id": "b", "source": "test"}) + "\n")
    previous = tmp_path / "tokenized" / "stage1"
    entry = DocumentEntry(id="old", corpus="mine")
    old_document = TokenizedDocument(entry, np.ones(3, np.int32), np.ones(3, bool))
    write_tokenized(previous, "stage1", "qwen2_5_vl", 0, [old_document])
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    with pytest.raises(RecordError) as error:
        prepare_corpora(params)
    assert f"{bad_file}:3:" in str(error.value) and "field text" in str(error.value)
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before


def test_corpus_without_records_of_a_stages_kind_is_refused(tmp_path, tiny_model_dir):
    params = user_corpus_params(tmp_path, tiny_model_dir("qwen2_5_vl"), "textonly")
    text_dir = tmp_path / "raw" / "user" / "textonly" / "text"
    text_dir.mkdir(parents=True)
    (text_dir / "docs.jsonl").write_text(json.dumps({"id": "a", "source": "test", "text": "hello"}) + "\n")
    expected = r"stages\.stage2\.corpora: corpus 'textonly' holds no instruct records"
    with pytest.raises(PrepareError, match=expected):
        prepare_corpora(params)
    assert load_tokenized(tmp_path / "tokenized" / "stage1").index.num_documents == 1


# --- video records with subtitles, windows and unreadable files ----------------------------------

VIDEO_FPS, VIDEO_FRAMES = 4, 24  # 6 s
# Cue order in the file is not time order; the 2.1 s cue is on screen between two sampled frames
# (at 2 fps: 0.25 s, 0.75 s, ...), so the model never sees it.
GOOD_SRT = """3
00:00:04,000 --> 00:00:05,000
the <i>heron</i> lands

1
00:00:00,000 --> 00:00:01,000
the otter swims

2
00:00:02,100 --> 00:00:02,200
never on screen

4
00:00:02,500 --> 00:00:03,500
the badger digs
"""
SHOWN_SUBTITLES = "the otter swims\nthe badger digs\nthe heron lands"
BAD_SRT = "1\n00:00:01,000 -> 00:00:02,000\nan arrow too short\n"


def _video_record(id: str, video: str, **fields) -> dict:
    messages = [
        {"role": "user", "content": "What does the animal do?"},
        {"role": "assistant", "content": "It moves."},
    ]
    return {"id": id, "video": video, "messages": messages, **fields}


@pytest.fixture(scope="module")
def video_corpus(tmp_path_factory, tiny_model_dir) -> tuple[object, Path]:
    """A project with a user corpus of good and unreadable videos and subtitles, prepared once."""
    root = tmp_path_factory.mktemp("video_corpus")
    corpus = root / "raw" / "user" / "vids"
    video_dir = corpus / "video"
    for kind in ("text", "instruct"):
        (corpus / kind).mkdir(parents=True)
    (corpus / "text" / "docs.jsonl").write_text(json.dumps({"id": "t", "source": "test", "text": "hello"}) + "\n")
    chat = {k: v for k, v in _video_record("i", "unused").items() if k != "video"}
    (corpus / "instruct" / "chats.jsonl").write_text(json.dumps(chat) + "\n")
    video_dir.mkdir()
    synth = VideoSynthParams(num_frames=VIDEO_FRAMES, height=64, width=64, fps=VIDEO_FPS)
    scene = random_scene(random.Random(0), VIDEO_FRAMES)
    good = video_dir / "good.mp4"
    encode_mp4([render_frame(scene, t, synth) for t in range(VIDEO_FRAMES)], good, VIDEO_FPS)
    # Cut before the index at the end of the file, as an interrupted copy leaves it.
    (video_dir / "corrupt.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (video_dir / "good.srt").write_text(GOOD_SRT)
    (video_dir / "bad.srt").write_text(BAD_SRT)
    records = [
        _video_record("whole", "good.mp4", subtitles="good.srt"),
        _video_record("corrupt", "corrupt.mp4", subtitles="good.srt"),
        _video_record("bad-srt", "good.mp4", subtitles="bad.srt"),
        _video_record("no-srt", "good.mp4", subtitles="missing.srt"),
        _video_record("window", "good.mp4", start_s=2.0, end_s=4.0, subtitles="good.srt"),
        _video_record("plain", "good.mp4"),
    ]
    (video_dir / "qa.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    stage = {"corpora": ["vids"], "seq_len": 256, "sp_size": 1}
    params = parse_params(
        {
            "model": {"family": "qwen2_5_vl", "path": str(tiny_model_dir("qwen2_5_vl"))},
            "data": {"raw_dir": "raw", "tokenized_dir": "tokenized", "packed_dir": "packed"},
            "stages": {"stage1": stage, "stage2": stage, "stage3": {**stage, "video_frames": {"fps": 2}}},
        }
    )
    return params, root


@pytest.fixture(scope="module")
def prepared_videos(video_corpus):
    """(params, root, tokenized stage 3, what prepare wrote on stderr)."""
    params, root = video_corpus
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        prepare_corpora(params, root)
    return params, root, load_tokenized(root / params.data.tokenized_dir / "stage3"), stderr.getvalue()


def test_unreadable_videos_and_subtitles_are_skipped_listed_and_announced(prepared_videos):
    params, root, tokenized, stderr = prepared_videos
    video_dir = Path(params.data.raw_dir) / "user" / "vids" / "video"
    assert [entry.id for entry in tokenized.index.documents] == ["whole", "window", "plain"]
    skipped = {entry.id: entry for entry in tokenized.index.skipped}
    assert list(skipped) == ["corrupt", "bad-srt", "no-srt"]
    assert {entry.id: entry.file for entry in skipped.values()} == {
        "corrupt": str(video_dir / "corrupt.mp4"),
        "bad-srt": str(video_dir / "bad.srt"),
        "no-srt": str(video_dir / "missing.srt"),
    }
    assert "corrupt.mp4" in skipped["corrupt"].reason
    assert "bad.srt:2" in skipped["bad-srt"].reason and "timing line" in skipped["bad-srt"].reason
    assert "no such subtitle file" in skipped["no-srt"].reason
    for entry in skipped.values():
        assert f"record {entry.id!r} skipped" in stderr and Path(entry.file).name in stderr
    assert "3 of 6 records skipped" in stderr

    # Packing carries the count, for training to log.
    pack_stage(params, "stage3", root)
    index = PackedShards(root / params.data.packed_dir / "stage3").index
    assert index.stats.skipped_documents == 3 and index.stats.source_documents == 3


def test_subtitles_at_the_sampled_frames_lead_the_first_user_turn_in_time_order(prepared_videos):
    params, root, tokenized, _ = prepared_videos
    tokenizer = load_tokenizer(root / params.model.path)
    question = "What does the animal do?"
    for doc, entry in enumerate(tokenized.index.documents):
        token_ids, trainable = tokenized.document(doc)
        text = tokenizer.decode(token_ids)
        subtitles = "This video's subtitles are listed below:\n"
        if entry.id == "whole":
            assert f"{subtitles}{SHOWN_SUBTITLES}\n{question}" in text
            assert "never on screen" not in text
            # After the video's placeholders, and never trained on.
            video_end = entry.video.token_offset + entry.video.num_tokens
            assert text.index(subtitles) >= len(tokenizer.decode(token_ids[:video_end]))
        elif entry.id == "window":  # 2 s to 4 s: only the cue shown then
            assert f"{subtitles}the badger digs\n{question}" in text
        else:
            assert subtitles not in text and question in text
        answers = [tokenizer.decode(run) for run in trainable_runs(token_ids.tolist(), trainable.tolist())]
        assert answers == ["It moves." + tokenizer.eos_token]


def test_a_window_samples_only_its_frames(prepared_videos):
    _, _, tokenized, _ = prepared_videos
    clips = {entry.id: entry.video for entry in tokenized.index.documents}
    whole, window = clips["whole"], clips["window"]
    assert len(whole.frame_indices) == 12 and whole.sampled_fps == window.sampled_fps == 2
    assert len(window.frame_indices) == 4 and window.num_tokens < whole.num_tokens
    assert all(2.0 <= t < 4.0 for t in window.timestamps)
    assert [i / VIDEO_FPS for i in window.frame_indices] == window.timestamps
    assert window.frame_indices != whole.frame_indices[:4]


@pytest.mark.parametrize(
    ("window", "fragment"),
    [
        ({"start_s": -1.0}, "field start_s: Input should be greater than or equal to 0"),
        ({"start_s": 3.0, "end_s": 3.0}, "field end_s: Value error, end_s must be greater than start_s (3.0)"),
        ({"end_s": 0}, "field end_s: Input should be greater than 0"),
    ],
)
def test_a_bad_window_names_the_line_and_field(tmp_path, window, fragment):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps(_video_record("ok", "a.mp4")) + "\n" + json.dumps(_video_record("w", "a.mp4", **window)))
    with pytest.raises(RecordError) as error:
        list(iter_records(qa, "video"))
    assert f"{qa}:2:" in str(error.value) and fragment in str(error.value)


def test_a_window_outside_its_video_fails_naming_the_record(tmp_path, video_corpus):
    params, root = video_corpus
    shutil.copytree(root / "raw", tmp_path / "raw")
    qa = tmp_path / "raw" / "user" / "vids" / "video" / "qa.jsonl"
    qa.write_text(json.dumps(_video_record("late", "good.mp4", start_s=10.0)) + "\n")
    with pytest.raises(PrepareError) as error:
        prepare_corpora(params, tmp_path)
    message = str(error.value)
    assert f"{qa}: record 'late'" in message and "good.mp4" in message and "start_s=10.0" in message


# --- batches and workers ---------------------------------------------------------------------------


def test_a_batch_encodes_as_records_one_by_one(tiny_model_dir, tiny_text_corpus, tmp_path):
    """The batch path (a worker's backend loaded from the serialised one, one call per batch)
    against its plain reference (transformers' `encode`, one call per record)."""
    tokenizer = load_tokenizer(tiny_model_dir("qwen2_5_vl"))
    backend = load_backend(backend_json(tokenizer), tokenizer.split_special_tokens)
    texts = [record for path in sorted((tiny_text_corpus / "text").glob("*.jsonl")) for record in
             iter_records(path, "text")]
    texts.append(TextRecord(id="short", source="test", text="x <|im_end|> y"))  # a special token in text
    chats = [InstructRecord(id=str(i), messages=CONVERSATION[: 2 * i]) for i in (1, 2, 3)]
    for records, reference in (
        (texts, [text_document(tokenizer, record) for record in texts]),
        (chats, [chat_document(tokenizer, record.messages, with_video=False) for record in chats]),
    ):
        (batch, chats_segments), batch_texts = encoding_task(tokenizer, RecordBatch(tmp_path / "f.jsonl", "c", records))
        documents = list(batch_documents(batch, chats_segments, encode_texts(backend, batch_texts),
                                         tokenizer.eos_token_id))
        assert [doc.entry.id for doc in documents] == [record.id for record in records]
        assert [(doc.token_ids.tolist(), doc.trainable.tolist()) for doc in documents] == reference


def test_two_workers_write_the_same_bytes_as_one(video_corpus, tmp_path, monkeypatch):
    """Text and chats of varied lengths in batches of 3 records (several in flight, finishing out
    of order), videos with skipped ones; and the progress bar in tokens/s."""
    params, root = video_corpus
    shutil.copytree(root / "raw", tmp_path / "raw")
    corpus = tmp_path / "raw" / "user" / "vids"
    rng = random.Random(0)
    words = [message.content for message in CONVERSATION]
    texts = [{"id": f"t{i}", "source": "test", "text": " ".join(rng.choices(words, k=rng.choice([1, 30, 600])))}
             for i in range(40)]
    (corpus / "text" / "more.jsonl").write_text("".join(json.dumps(text) + "\n" for text in texts))
    chats = [{"id": f"c{i}", "messages": [m.model_dump() for m in CONVERSATION[: 2 * (1 + i % 3)]]} for i in range(10)]
    (corpus / "instruct" / "more.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    monkeypatch.setattr("omnilong.data.prepare.BATCH_RECORDS", 3)
    outputs = {}
    for workers in (1, 2):
        data = params.data.model_copy(update={"prepare_workers": workers, "tokenized_dir": f"tokenized-{workers}"})
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            prepare_corpora(params.model_copy(update={"data": data}), tmp_path)
        outputs[workers] = {path.relative_to(tmp_path / data.tokenized_dir): path.read_bytes()
                            for path in (tmp_path / data.tokenized_dir).rglob("*") if path.is_file()}
        assert re.search(r"prepare stage1: .*\d[kMG]?tok/s", stderr.getvalue()), stderr.getvalue()[-500:]
        assert all(f"record {name!r} skipped" in stderr.getvalue() for name in ("corrupt", "bad-srt", "no-srt"))
    assert len(outputs[1]) == 3 * 4 and outputs[2] == outputs[1]
    stage1 = load_tokenized(tmp_path / "tokenized-2" / "stage1")
    assert [entry.id for entry in stage1.index.documents] == ["t"] + [text["id"] for text in texts]


@pytest.mark.slow
def test_quick_throughput_benchmark_compares_the_three_and_checks_the_bytes(tmp_path):
    result = quick_benchmark("prepare_throughput", tmp_path)
    assert result["benchmark"] == "prepare_throughput" and result["quick"] and result["workers"] >= 2
    assert result["identical_files_plain_ours"] and result["same_token_counts"]
    assert result["corpus"]["tokens_large"] > 3.5 * result["corpus"]["tokens_small"]
    for name in ("ratio_vs_datasets", "ratio_vs_datasets_map_only", "ratio_vs_plain", "memory_ratio_large_over_small"):
        assert 0 < result[name] < 100, name
    assert result["projected_hours_for_1_2b_tokens"] > 0
    assert all(mib > 50 for mib in result["peak_rss_mib"].values() if mib is not None)


def test_preparation_memory_is_flat_in_the_number_of_documents(tmp_path, monkeypatch):
    """The Python heap's peak (tracemalloc; one worker, so records are read, encoded and written in
    this process) preparing N and then 4N short text documents. Until the index's entries and
    offsets went to scratch files as documents streamed by, each document held about 650 bytes to
    the end: 1.46 MiB for 2,000 documents, 5.19 MiB for 8,000; now 0.56 for both. Allowed: +1 MiB
    (175 bytes per added document).
    tracemalloc counts allocations, not time, so load on the machine does not move it; memory the
    tokenizers library allocates in Rust is not seen (its peak follows the longest document)."""
    family = get_family("qwen2_5_vl")
    words = [message.content for message in CONVERSATION]
    tokenizer = train_tokenizer(words * 20, family, vocab_size=400)
    # The checksums read files in pieces of CHUNK_BYTES (8 MiB): smaller ones here, so that no
    # piece grows with the files up to that size.
    monkeypatch.setattr("omnilong.data.checksum.CHUNK_BYTES", 1 << 16)
    rng = random.Random(0)
    stage = {"corpora": ["docs"], "seq_len": 64, "sp_size": 1}
    stages = {"stage1": stage, "stage2": stage, "stage3": {**stage, "video_frames": {"num_frames": 2}}}

    def peak_mib(documents: int) -> float:
        raw = f"raw-{documents}"
        path = tmp_path / raw / "user" / "docs" / "text" / "part-0.jsonl"
        path.parent.mkdir(parents=True)
        with path.open("w") as out:
            for i in range(documents):
                text = " ".join(rng.choices(words, k=rng.randint(1, 3)))
                out.write(TextRecord(id=f"d{i}", source="test", text=text).model_dump_json() + "\n")
        params = parse_params({"model": {"family": "qwen2_5_vl", "path": "unused"},
                               "data": {"raw_dir": raw, "tokenized_dir": f"tokenized-{documents}"}, "stages": stages})
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        with encoding_pool(params, tokenizer) as pool, contextlib.redirect_stderr(io.StringIO()):
            assert prepare_stage(params, "stage1", pool, None, tmp_path).num_documents == documents
        return (tracemalloc.get_traced_memory()[1] - before) / 2**20

    tracemalloc.start()
    try:
        peak_mib(500)  # first calls' one-time allocations (schemas, caches) out of the way
        small, large = peak_mib(2000), peak_mib(8000)
    finally:
        tracemalloc.stop()
    assert large - small < 1.0, f"peak {small:.2f} MiB for 2,000 documents, {large:.2f} MiB for 8,000"
