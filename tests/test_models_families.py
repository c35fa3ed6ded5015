"""Family registry: chat templates render like the real ones; placeholder expansion; lookups."""

from __future__ import annotations

import pytest
from transformers import Qwen2_5_VLConfig

from omnilong.models.families import family_for_config, get_family
from omnilong.models.loading import load_tokenizer

VIDEO_QUESTION = [
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What colour?"}]},
    {"role": "assistant", "content": "Blue."},
]
EXPECTED_CHAT = {
    "qwen2_5_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\nBlue.<|im_end|>\n"
    ),
    "llava_onevision": (
        "<|im_start|>user <video>\nWhat colour?<|im_end|>\n"
        "<|im_start|>assistant \nBlue.<|im_end|>\n"
    ),
}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_chat_template_renders_like_the_family(tiny_model_dir, family):
    tokenizer = load_tokenizer(tiny_model_dir(family))
    assert tokenizer.apply_chat_template(VIDEO_QUESTION, tokenize=False) == EXPECTED_CHAT[family]

    as_string = [{"role": "user", "content": "Hi there"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    rendered = tokenizer.apply_chat_template(as_string, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(as_parts, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")

    with pytest.raises(Exception, match="unknown content part type: audio"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio"}]}], tokenize=False
        )


def test_qwen_template_keeps_a_given_system_turn(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir("qwen2_5_vl"))
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *VIDEO_QUESTION], tokenize=False
    )
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "helpful assistant" not in rendered


def test_llava_template_puts_videos_before_text(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir("llava_onevision"))
    text_first = [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "video"}]}]
    assert tokenizer.apply_chat_template(text_first, tokenize=False) == "<|im_start|>user <video>\nQ<|im_end|>\n"


def test_expand_video_placeholder():
    spec = get_family("qwen2_5_vl")
    expanded = spec.expand_video_placeholder(EXPECTED_CHAT["qwen2_5_vl"], 5)
    assert expanded.count("<|video_pad|>") == 5
    assert "<|vision_start|>" + "<|video_pad|>" * 5 + "<|vision_end|>" in expanded
    with pytest.raises(ValueError, match="exactly one"):
        spec.expand_video_placeholder("no video here", 5)
    with pytest.raises(ValueError, match="positive"):
        spec.expand_video_placeholder("<|video_pad|>", 0)


def test_lookups_name_what_is_supported():
    assert family_for_config(Qwen2_5_VLConfig()) is get_family("qwen2_5_vl")
    with pytest.raises(ValueError, match="unknown model family 'llama'.*llava_onevision"):
        get_family("llama")
