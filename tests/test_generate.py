"""`omnilong generate`'s decoding equals a plain reference on the same prompt, and puts the answer
where training puts it.

Ours: the prompt's embeddings through the training path (omnilong/parallel/vision.py), mRoPE
ids computed on the whole prompt, then a KV-cached greedy loop. The reference: transformers' own
forward (its vision path, its merge, its decoder) without a cache, each step on the whole document
(prompt and answer so far) with the position ids training gives that document. Random tiny models
rarely stop early, so both produce the full number of tokens (stopping is switched off for the
comparison).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilong.config import FrameSampling, VideoTokenParams, parse_params
from omnilong.data.pack import pack_stage
from omnilong.data.prepare import (
    DocumentEntry,
    TokenizedDocument,
    VideoContext,
    chat_document,
    video_clip,
    video_document,
    write_tokenized,
)
from omnilong.data.schemas import Message, VideoRecord
from omnilong.data.shards import PackedShards
from omnilong.data.synth.video import encode_mp4
from omnilong.data.video_frames import sample_frames, video_info
from omnilong.eval.answering import Question, VideoQuery
from omnilong.infer.generate import ModelAnswerer, Prompt
from omnilong.models.positions import position_ids_for_document
from omnilong.train.batches import collate, video_token_id
from omnilong.train.training_module import language_model_positions
from tests.test_models_video_inputs import random_frames

NEW_TOKENS = 6
FAMILIES = ("qwen2_5_vl", "llava_onevision")
LONG_VIDEO_FRAMES = 8

# The generation prompt for one user turn "What happens?" (with and without a video before it),
# written by hand from each family's published chat template: Qwen2.5-VL's, and the llava-hf
# LLaVA-OneVision (qwen2) one, whose generation prompt ends in ChatML's `<|im_start|>assistant\n`
# (no space) as the original LLaVA-OneVision training format does.
PUBLISHED_PROMPTS = {
    ("qwen2_5_vl", False): "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\nWhat happens?<|im_end|>\n<|im_start|>assistant\n",
    ("qwen2_5_vl", True): "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                          "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n"
                          "<|im_start|>assistant\n",
    ("llava_onevision", False): "<|im_start|>user \nWhat happens?<|im_end|>\n<|im_start|>assistant\n",
    ("llava_onevision", True): "<|im_start|>user <video>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("generate") / "clip.mp4"
    encode_mp4(list(random_frames(12, 64, 96, seed=5)), path, fps=4)
    return path


@pytest.fixture(scope="module")
def long_video_file(tmp_path_factory) -> Path:
    """48 s at 1 fps: 8 sampled frames are 4 temporal patches of 12 s, so the tiny Qwen2.5-VL's
    temporal ids (2 per second) reach 72 past the video's start, beyond the question after it."""
    path = tmp_path_factory.mktemp("generate_long") / "long.mp4"
    encode_mp4(list(random_frames(48, 64, 96, seed=6)), path, fps=1)
    return path


def long_video_question(path: Path) -> Question:
    return Question([{"role": "user", "content": "What happens?"}],
                    VideoQuery(path, FrameSampling(num_frames=LONG_VIDEO_FRAMES)), NEW_TOKENS)


@contextlib.contextmanager
def fed_positions(answerer: ModelAnswerer) -> Iterator[list[torch.Tensor]]:
    """The `position_ids` of every decoder call inside the block, in call order."""
    fed: list[torch.Tensor] = []
    hook = answerer.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["position_ids"].cpu().clone()), with_kwargs=True
    )
    try:
        yield fed
    finally:
        hook.remove()


def training_positions(model_dir: Path, answerer: ModelAnswerer, prompt: Prompt, answer_ids: list[int],
                       video_path: Path, work_dir: Path) -> list[torch.Tensor]:
    """The position ids the decoder gets in training for the chat `prompt` + `answer_ids` (answer
    trained), one per document: prepared with its clip as `prepare` makes it, packed (twice, into
    one row, so the second copy restarts at 0) and read as the trainer reads the row. Each
    [4, 1, L] (Qwen2.5-VL) or [1, L] (LLaVA-OneVision), L = the chat's length."""
    family, config = answerer.family, answerer.model.config
    token_ids = torch.cat([prompt.input_ids, torch.tensor(answer_ids)]).numpy().astype(np.int32)
    length = len(token_ids)
    token_id = video_token_id(family, config)
    context = VideoContext(family, config, answerer.video, FrameSampling(num_frames=LONG_VIDEO_FRAMES),
                            token_id, work_dir)
    info = video_info(video_path)
    clip = video_clip(context, "chat", video_path, info, sample_frames(info, context.video_frames),
                       token_offset=int((prompt.input_ids == token_id).nonzero()[0]))
    stage = {"seq_len": 2 * length + 2 * 4, "sp_size": 1}
    params = parse_params({
        "model": {"family": family, "path": str(model_dir)},
        "data": {"raw_dir": str(work_dir / "raw"), "tokenized_dir": str(work_dir / "tokenized"),
                 "packed_dir": str(work_dir / "packed")},
        "stages": {"stage1": stage, "stage2": stage,
                   "stage3": {**stage, "video_frames": {"num_frames": LONG_VIDEO_FRAMES}}},
        "eval": {"heldout_documents": 1},
    })
    trainable = np.arange(length) >= len(prompt.input_ids)
    # Three copies: one is held out, the two others fill the training row.
    write_tokenized(work_dir / "tokenized" / "stage3", "stage3", family, 0, [
        TokenizedDocument(DocumentEntry(id=f"chat{copy}", corpus="hand", video=clip), token_ids, trainable)
        for copy in range(3)
    ])
    pack_stage(params, "stage3")
    [row] = PackedShards(work_dir / "packed" / "stage3")
    assert row["doc_lens"].tolist() == [length, length]
    assert row["input_ids"][: 2 * length].tolist() == token_ids.tolist() * 2
    batch = collate([row], family=family, model_config=config, video_params=answerer.video)
    positions = language_model_positions(family, batch.position_ids, batch.doc_lens)
    return [positions[..., start : start + length] for start in (0, length)]


def _reference_greedy(answerer: ModelAnswerer, question: Question) -> list[int]:
    prompt = answerer.prompt(question)
    video = {} if prompt.video is None else dict(prompt.video.pieces[0])
    ids = prompt.input_ids
    for _ in range(NEW_TOKENS):
        positions = position_ids_for_document(answerer.model.config, ids, video.get("video_grid_thw"),
                                              video.get("second_per_grid_ts"))
        with torch.no_grad():
            logits = answerer.model(input_ids=ids[None], position_ids=positions.unsqueeze(-2), **video).logits
        ids = torch.cat([ids, logits[0, -1].argmax().reshape(1)])
    return ids[len(prompt.input_ids):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_video", [False, True], ids=["text", "video"])
def test_greedy_tokens_equal_the_reference(tiny_model_dir, video_file, family, with_video):
    answerer = ModelAnswerer(tiny_model_dir(family), VideoTokenParams())
    video = VideoQuery(video_file, FrameSampling(num_frames=7)) if with_video else None
    question = Question([{"role": "user", "content": "Which digit is shown, and in what colour?"}], video, NEW_TOKENS)
    prompt = answerer.prompt(question)
    ours = answerer.generate(answerer.embeddings(prompt), prompt.position_ids, NEW_TOKENS, stop_ids=set())
    assert len(ours) == NEW_TOKENS
    assert ours == _reference_greedy(answerer, question)


def test_answer_decodes_text_and_stops_at_the_end_of_turn(tiny_model_dir):
    answerer = ModelAnswerer(tiny_model_dir("qwen2_5_vl"), VideoTokenParams())
    question = Question([{"role": "user", "content": "Say something."}], max_new_tokens=4)
    prompt = answerer.prompt(question)
    tokens = answerer.generate(answerer.embeddings(prompt), prompt.position_ids, 4)
    assert not set(tokens) & answerer.stop_ids
    assert answerer.answer(question) == answerer.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forced_argmax_equals_greedy_decoding_on_its_own_output(tiny_model_dir, video_file, family):
    """Fed its own greedy answer, the model's argmax at every answer position is that answer."""
    answerer = ModelAnswerer(tiny_model_dir(family), VideoTokenParams())
    question = Question([{"role": "user", "content": "What happens?"}], VideoQuery(video_file, FrameSampling(num_frames=6)))
    prompt = answerer.prompt(question)
    embeds = answerer.embeddings(prompt)
    greedy = answerer.generate(embeds, prompt.position_ids, NEW_TOKENS, stop_ids=set())
    assert answerer.teacher_forced_argmax(embeds, prompt.position_ids, greedy) == greedy
    other = [(token + 1) % 100 + 10 for token in greedy]
    assert answerer.teacher_forced_argmax(embeds, prompt.position_ids, other)[0] == greedy[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_positions_equal_those_training_gives_the_answer(tiny_model_dir, long_video_file, tmp_path, family):
    """After a video whose time range outlasts the question after it, `generate` feeds the decoder
    the prompt, then each decoded token, and teacher-forces the answer at the positions training
    gives the same tokens when the chat (prompt and answer) is one packed document."""
    answerer = ModelAnswerer(tiny_model_dir(family), VideoTokenParams())
    prompt = answerer.prompt(long_video_question(long_video_file))
    embeds = answerer.embeddings(prompt)
    with fed_positions(answerer) as decoding:
        answer = answerer.generate(embeds, prompt.position_ids, NEW_TOKENS, stop_ids=set())
    with fed_positions(answerer) as teacher_forcing:
        answerer.teacher_forced_argmax(embeds, prompt.position_ids, answer)
    length = len(prompt.input_ids)
    assert len(answer) == NEW_TOKENS and len(decoding) == NEW_TOKENS  # the prompt, then all but the last token
    for training in training_positions(tiny_model_dir(family), answerer, prompt, answer, long_video_file, tmp_path):
        assert torch.equal(decoding[0], training[..., :length])
        assert torch.equal(torch.cat(decoding[1:], dim=-1), training[..., length : length + NEW_TOKENS - 1])
        [whole] = teacher_forcing
        assert torch.equal(whole, training)
    if family == "qwen2_5_vl":  # the case the rule decides: the video's time range outlasts its side and the text after it
        config = answerer.model.config
        video = (prompt.input_ids == config.video_token_id).nonzero()[:, 0]
        start = int(prompt.position_ids[0, video[0]])
        side = int(prompt.video.pieces[0]["video_grid_thw"][0, 1:].max()) // config.vision_config.spatial_merge_size
        assert int(prompt.position_ids[:, video].max()) - start > side + (length - 1 - int(video[-1]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_video", [False, True], ids=["text", "video"])
def test_training_trains_the_answer_after_the_prompt_generate_feeds(tiny_model_dir, video_file, tmp_path, family,
                                                                     with_video):
    """A chat prepared for training holds, before its answer, exactly the tokens `generate` feeds
    for the same question (the family's published generation prompt), and then the answer's tokens
    as teacher-forcing scores them, predicted alike by the model on the training document."""
    answerer = ModelAnswerer(tiny_model_dir(family), VideoTokenParams())
    tokenizer, config = answerer.tokenizer, answerer.model.config
    question_text, answer_text = "What happens?", "It rains."
    sampling = FrameSampling(num_frames=6)
    question = Question([{"role": "user", "content": question_text}],
                        VideoQuery(video_file, sampling) if with_video else None)
    messages = [Message(role="user", content=question_text), Message(role="assistant", content=answer_text)]
    if with_video:
        token_id = video_token_id(family, config)
        context = VideoContext(family, config, answerer.video, sampling, token_id, tmp_path)
        record = VideoRecord(id="chat", video=video_file.name, messages=messages)
        token_ids, trainable, _ = video_document(tokenizer, record, video_file.parent, context)
        token_ids, trainable = token_ids.tolist(), trainable.tolist()
    else:
        token_ids, trainable = chat_document(tokenizer, messages, with_video=False)
    prompt = answerer.prompt(question)
    length = len(prompt.input_ids)

    assert tokenizer.decode(answerer.chat_ids(question.messages, with_video)) == PUBLISHED_PROMPTS[family, with_video]
    assert token_ids[:length] == prompt.input_ids.tolist()
    answer_ids = tokenizer.encode(answer_text, add_special_tokens=False)  # as V-NIAH teacher-forces an answer
    assert trainable.index(True) == length
    assert [t for t, trained in zip(token_ids, trainable) if trained] == answer_ids + [tokenizer.eos_token_id]

    video = {} if prompt.video is None else dict(prompt.video.pieces[0])
    document = torch.tensor(token_ids)
    positions = position_ids_for_document(config, document, video.get("video_grid_thw"),
                                          video.get("second_per_grid_ts"))
    with torch.no_grad():
        logits = answerer.model(input_ids=document[None], position_ids=positions.unsqueeze(-2), **video).logits
    predicted_in_training = logits[0, length - 1 : length - 1 + len(answer_ids)].argmax(-1).tolist()
    teacher_forced = answerer.teacher_forced_argmax(answerer.embeddings(prompt), prompt.position_ids, answer_ids)
    assert teacher_forced == predicted_in_training
