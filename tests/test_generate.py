"""`omnilong generate`'s decoding equals transformers' own greedy `generate` on the same prompt.

Ours: the prompt's embeddings through the training path (omnilong/parallel/vision.py), mRoPE
ids computed on the whole prompt, then a KV-cached greedy loop. Theirs: `model.generate` with
the pixel values, deriving positions itself. Random tiny models rarely stop early, so both
produce the full number of tokens (stopping is switched off for the comparison).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnilong.config import FrameSampling, VideoTokenParams
from omnilong.data.synth.video import encode_mp4
from omnilong.eval.answering import Question, VideoQuery
from omnilong.infer.generate import ModelAnswerer
VIDEO = 2  # transformers mm_token_type_ids value for video tokens
from tests.test_models_video_inputs import random_frames

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("generate") / "clip.mp4"
    encode_mp4(list(random_frames(12, 64, 96, seed=5)), path, fps=4)
    return path


def _transformers_greedy(answerer: ModelAnswerer, question: Question) -> list[int]:
    prompt = answerer.prompt(question)
    kwargs = {}
    if prompt.video is not None:
        kwargs = dict(prompt.video.pieces[0])
        if answerer.family == "qwen2_5_vl":
            kwargs["mm_token_type_ids"] = ((prompt.input_ids == answerer.model.config.video_token_id).int() * VIDEO)[None]
    output = answerer.model.generate(
        prompt.input_ids[None], attention_mask=torch.ones(1, len(prompt.input_ids), dtype=torch.long),
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kwargs,
    )
    return output[0, len(prompt.input_ids):].tolist()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("with_video", [False, True], ids=["text", "video"])
def test_greedy_tokens_equal_transformers_generate(tiny_model_dir, video_file, family, with_video):
    answerer = ModelAnswerer(tiny_model_dir(family), VideoTokenParams())
    video = VideoQuery(video_file, FrameSampling(num_frames=7)) if with_video else None
    question = Question([{"role": "user", "content": "Which digit is shown, and in what colour?"}], video, NEW_TOKENS)
    prompt = answerer.prompt(question)
    ours = answerer.generate(answerer.embeddings(prompt), prompt.position_ids, NEW_TOKENS, stop_ids=set())
    assert len(ours) == NEW_TOKENS
    assert ours == _transformers_greedy(answerer, question)


def test_answer_decodes_text_and_stops_at_the_end_of_turn(tiny_model_dir):
    answerer = ModelAnswerer(tiny_model_dir("qwen2_5_vl"), VideoTokenParams())
    question = Question([{"role": "user", "content": "Say something."}], max_new_tokens=4)
    prompt = answerer.prompt(question)
    tokens = answerer.generate(answerer.embeddings(prompt), prompt.position_ids, 4)
    assert not set(tokens) & answerer.stop_ids
    assert answerer.answer(question) == answerer.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
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
