"""Prepare: chat spans of both families' templates, video placeholders, corpus errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import av
import numpy as np
import pytest
from transformers import AutoConfig

from omnilong.config import parse_params
from omnilong.data.prepare import (
    DocumentEntry,
    PrepareError,
    TokenizedDocument,
    chat_document,
    load_tokenized,
    prepare_corpora,
    write_tokenized,
)
from omnilong.data.schemas import Message, RecordError
from omnilong.models.families import get_family
from omnilong.models.tokenizer import train_tokenizer
from omnilong.models.video_inputs import num_video_tokens

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

    # Cutting into segments changed nothing: the tokens spell the template's own rendering.
    chat = [{"role": m.role, "content": [{"type": "text", "text": m.content}]} for m in CONVERSATION]
    if with_video:
        chat[0]["content"].insert(0, {"type": "video"})
    assert tokenizer.decode(token_ids) == tokenizer.apply_chat_template(chat, tokenize=False)

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
    assert tokenized.index.num_documents == 2
    for doc, entry in enumerate(tokenized.index.documents):
        clip = entry.video
        with av.open(str(root / clip.path)) as container:  # the video's size, read apart from decord
            stream = container.streams.video[0]
            height, width = stream.codec_context.height, stream.codec_context.width
            num_frames = sum(1 for _ in container.decode(stream))
        expected = num_video_tokens(
            family, model_config, params.model.video, params.stages.stage3.frames_per_video, height, width
        )
        token_ids, trainable = tokenized.document(doc)
        video_positions = np.flatnonzero(token_ids == video_token_id)
        assert clip.num_tokens == expected == len(video_positions)
        run = np.arange(clip.token_offset, clip.token_offset + expected)
        np.testing.assert_array_equal(video_positions, run)
        assert not trainable[video_positions].any()
        assert len(clip.frame_indices) == params.stages.stage3.frames_per_video
        assert clip.frame_indices == sorted(clip.frame_indices) and 0 <= clip.frame_indices[0]
        assert clip.frame_indices[-1] < num_frames
        assert (clip.height, clip.width) == (height, width)


def user_corpus_params(tmp_path: Path, model_dir: Path, corpus: str):
    stage = {"corpora": [corpus], "seq_len": 64, "sp_size": 1}
    return parse_params(
        {
            "model": {"family": "qwen2_5_vl", "path": str(model_dir)},
            "data": {"raw_dir": str(tmp_path / "raw"), "tokenized_dir": str(tmp_path / "tokenized")},
            "stages": {"stage1": stage, "stage2": stage, "stage3": {**stage, "frames_per_video": 2}},
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
