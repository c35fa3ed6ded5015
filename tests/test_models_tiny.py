"""The tiny model directory: layout, save/load round trip, determinism, and a video training step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omnilong.config import TinyModelParams, VideoTokenParams
from omnilong.models.families import get_family
from omnilong.models.loading import load_image_processor, load_model, load_tokenizer
from omnilong.models.tiny import build_tiny_model
from omnilong.models.video_inputs import num_video_tokens, preprocess_video

FAMILIES = ["qwen2_5_vl", "llava_onevision"]
MODEL_DIR_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
}
# Parameters that must learn from a video sample: vision tower input and first block,
# the vision-to-language bridge, and the language model's ends.
TRAINED_BY_VIDEO = {
    "qwen2_5_vl": [
        "model.visual.patch_embed.proj.weight",
        "model.visual.blocks.0.attn.qkv.weight",
        "model.visual.merger.mlp.0.weight",
    ],
    "llava_onevision": [
        "model.vision_tower.embeddings.patch_embedding.weight",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.image_newline",
    ],
}
LANGUAGE_PARAMS = [
    "model.language_model.embed_tokens.weight",
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "lm_head.weight",
]


def moving_square_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: a bright square crossing a dark gradient, one step per frame."""
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    frames[..., 2] = np.linspace(0, 120, width, dtype=np.uint8)[None, None, :]
    side = min(height, width) // 4
    for t in range(num_frames):
        left = (t * 7) % (width - side)
        frames[t, height // 3 : height // 3 + side, left : left + side] = (250, 200, 30)
    return frames


@pytest.mark.parametrize("family", FAMILIES)
def test_model_dir_has_checkpoint_layout_and_consistent_token_ids(tiny_model_dir, family):
    model_dir = tiny_model_dir(family)
    assert MODEL_DIR_FILES <= {path.name for path in model_dir.iterdir()}
    spec = get_family(family)
    tokenizer = load_tokenizer(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == spec.model_type
    assert config["text_config"]["vocab_size"] == TinyModelParams().vocab_size >= len(tokenizer)
    assert config["text_config"]["hidden_size"] == TinyModelParams().hidden_size

    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in spec.special_tokens}
    # Each special token is one id after the learned vocabulary, as in the real tokenizers.
    assert sorted(token_ids.values()) == list(range(len(tokenizer) - len(spec.special_tokens), len(tokenizer)))
    for token, token_id in token_ids.items():
        assert tokenizer(token).input_ids == [token_id]
    model_config = load_model(model_dir).config
    assert model_config.image_token_id == token_ids[spec.image_token]
    assert model_config.video_token_id == token_ids[spec.video_token]
    if spec.vision_start_token is not None:
        assert model_config.vision_start_token_id == token_ids[spec.vision_start_token]
        assert model_config.vision_end_token_id == token_ids[spec.vision_end_token]
    assert tokenizer.eos_token == spec.eos_token and tokenizer.pad_token == spec.pad_token
    assert model_config.text_config.eos_token_id == tokenizer.eos_token_id

    image_processor = load_image_processor(model_dir)
    assert tuple(image_processor.image_mean) == pytest.approx(spec.pixel_mean)
    assert tuple(image_processor.image_std) == pytest.approx(spec.pixel_std)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_gives_back_the_saved_weights(tiny_model_dir, family, tmp_path):
    model_dir = tiny_model_dir(family)
    _, loading_info = get_family(family).model_class.from_pretrained(model_dir, output_loading_info=True)
    assert not any(loading_info.values()), loading_info  # nothing missing, unexpected or mismatched
    model = load_model(model_dir)
    assert model.dtype == torch.float32
    # Checkpoints store transformers' legacy key names, so compare through a second save.
    model.save_pretrained(tmp_path)
    saved, resaved = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert saved.keys() == resaved.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(resaved[name], tensor, rtol=0, atol=0, msg=name)
    reloaded = load_model(tmp_path).state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=0, msg=name)
    # A requested dtype is honoured (as for real bf16 checkpoints).
    assert load_model(model_dir, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_text_round_trips_through_the_tokenizer(tiny_model_dir, family):
    tokenizer = load_tokenizer(tiny_model_dir(family))
    text = "def fetch(url):\n    return {'ok': True, \"size\": 42}  # café ✓\n\tdone"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    # Code like the corpus's compresses well: BPE learned its common byte sequences.
    code = "    def decode(self, s):\n        return self.raw_decode(s)\n"
    assert len(tokenizer(code).input_ids) < len(code) / 3


def test_build_is_deterministic_and_seeded(tiny_model_dir, tiny_text_corpus, tmp_path):
    reference = tiny_model_dir("qwen2_5_vl")
    rebuilt, reseeded = tmp_path / "rebuilt", tmp_path / "reseeded"
    build_tiny_model("qwen2_5_vl", TinyModelParams(), VideoTokenParams(), tiny_text_corpus, rebuilt)
    build_tiny_model("qwen2_5_vl", TinyModelParams(seed=1), VideoTokenParams(), tiny_text_corpus, reseeded)
    for name in MODEL_DIR_FILES:
        assert (rebuilt / name).read_bytes() == (reference / name).read_bytes(), name
    assert (reseeded / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    assert (reseeded / "model.safetensors").read_bytes() != (reference / "model.safetensors").read_bytes()


def test_llava_build_is_deterministic(tiny_model_dir, tiny_text_corpus, tmp_path):
    reference = tiny_model_dir("llava_onevision")
    build_tiny_model("llava_onevision", TinyModelParams(), VideoTokenParams(), tiny_text_corpus, tmp_path / "m")
    for name in ("tokenizer.json", "model.safetensors"):
        assert (tmp_path / "m" / name).read_bytes() == (reference / name).read_bytes(), name


def test_failed_build_keeps_the_previous_model_dir(tmp_path):
    (tmp_path / "corpus" / "text").mkdir(parents=True)
    (tmp_path / "corpus" / "text" / "bad.jsonl").write_text('{"id": "a", "source": "s", "text": "ok"}\n{"id": "b"}\n')
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("previous")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a TextRecord"):
        build_tiny_model("llava_onevision", TinyModelParams(), VideoTokenParams(), tmp_path / "corpus", out)
    assert (out / "config.json").read_text() == "previous"
    with pytest.raises(FileNotFoundError, match="expected \\*.jsonl text records"):
        build_tiny_model("llava_onevision", TinyModelParams(), VideoTokenParams(), tmp_path, out)


@pytest.mark.parametrize("family", FAMILIES)
def test_video_training_step_reaches_vision_and_language_weights(tiny_model_dir, family):
    model_dir = tiny_model_dir(family)
    spec, video = get_family(family), VideoTokenParams()
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    model.train()
    frames = moving_square_frames(num_frames=6, height=64, width=64)
    video_inputs = preprocess_video(family, frames, model.config, video, fps=4.0)
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Where does the square go?"}]},
        {"role": "assistant", "content": "It moves to the right."},
    ]
    chat = tokenizer.apply_chat_template(messages, tokenize=False)
    placeholders = num_video_tokens(family, model.config, video, *frames.shape[:3])
    input_ids = tokenizer(spec.expand_video_placeholder(chat, placeholders), return_tensors="pt").input_ids
    assert (input_ids == model.config.video_token_id).sum() == placeholders
    extra = {}
    if family == "qwen2_5_vl":
        # 3-D mRoPE positions are only used when the token types are given.
        extra["mm_token_type_ids"] = (input_ids == model.config.video_token_id).int() * 2

    loss = model(input_ids=input_ids, labels=input_ids, **video_inputs, **extra).loss
    loss.backward()

    assert torch.isfinite(loss)
    # Untrained, the loss is near that of a uniform guess over the vocabulary.
    assert abs(loss.item() - np.log(model.config.text_config.vocab_size)) < 1.0
    params = dict(model.named_parameters())
    for name in TRAINED_BY_VIDEO[family] + LANGUAGE_PARAMS:
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
