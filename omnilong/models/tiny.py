"""The tiny random-initialised model of the embedded demo, built from the family's real config class.

The directory it writes has the layout of a downloaded checkpoint (config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
chat_template.jinja, preprocessor_config.json), so everything downstream loads it exactly as it
would load real weights. The processor itself is not saved: transformers cannot build the
families' processors without their torchvision-only video processors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import ValidationError
from transformers import (
    GenerationConfig,
    LlavaOnevisionConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from omnilong.atomic import atomic_dir
from omnilong.config import TinyModelParams, VideoTokenParams
from omnilong.data.schemas import TextRecord
from omnilong.models.families import FamilySpec, get_family
from omnilong.models.tokenizer import train_tokenizer

ROPE_THETA = 1_000_000.0  # both families' Qwen2 language models
PATCH_SIZE = 14  # both families' vision towers
# SigLIP input side of the tiny LLaVA-OneVision: a 3x3 patch grid, odd like the real 27x27
# (384 / 14), so the 2x2 pooling rounds up the same way; 4 tokens per frame.
LLAVA_TINY_IMAGE_SIZE = 3 * PATCH_SIZE


def build_tiny_model(
    family: str,
    tiny: TinyModelParams,
    video: VideoTokenParams,
    corpus_dir: Path,
    out_dir: Path,
) -> None:
    """Train a tokenizer on `corpus_dir/text/*.jsonl`, build a seeded random model, save to `out_dir`.

    Deterministic: the same corpus and params give byte-identical files.
    """
    spec = get_family(family)
    tokenizer = train_tokenizer(_corpus_texts(Path(corpus_dir)), spec, tiny.vocab_size)
    if family == "qwen2_5_vl":
        config = _qwen2_5_vl_config(tiny, spec, tokenizer)
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=video.qwen2_5_vl.min_pixels,
            max_pixels=video.qwen2_5_vl.max_pixels,
            patch_size=config.vision_config.patch_size,
            temporal_patch_size=config.vision_config.temporal_patch_size,
            merge_size=config.vision_config.spatial_merge_size,
            image_mean=list(spec.pixel_mean),
            image_std=list(spec.pixel_std),
        )
    else:
        config = _llava_onevision_config(tiny, spec, tokenizer)
        side = config.vision_config.image_size
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": side, "width": side},
            image_grid_pinpoints=config.image_grid_pinpoints,
            image_mean=list(spec.pixel_mean),
            image_std=list(spec.pixel_std),
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = spec.model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )

    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        image_processor.save_pretrained(staging)


def _corpus_texts(corpus_dir: Path) -> Iterator[str]:
    files = sorted((corpus_dir / "text").glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{corpus_dir / 'text'}: expected *.jsonl text records, found none")
    for path in files:
        with path.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    yield TextRecord.model_validate_json(line).text
                except ValidationError as exc:
                    raise ValueError(f"{path}:{line_number}: not a TextRecord: {exc}") from None


def _token_ids(tokenizer: PreTrainedTokenizerFast, spec: FamilySpec) -> dict[str, int]:
    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "image_token_id": tokenizer.convert_tokens_to_ids(spec.image_token),
        "video_token_id": tokenizer.convert_tokens_to_ids(spec.video_token),
    }
    if spec.vision_start_token is not None:
        ids["vision_start_token_id"] = tokenizer.convert_tokens_to_ids(spec.vision_start_token)
        ids["vision_end_token_id"] = tokenizer.convert_tokens_to_ids(spec.vision_end_token)
    return ids


def _text_sizes(tiny: TinyModelParams) -> dict[str, int]:
    return {
        "vocab_size": tiny.vocab_size,
        "hidden_size": tiny.hidden_size,
        "intermediate_size": tiny.intermediate_size,
        "num_hidden_layers": tiny.num_hidden_layers,
        "max_window_layers": tiny.num_hidden_layers,
        "num_attention_heads": tiny.num_attention_heads,
        "num_key_value_heads": tiny.num_key_value_heads,
    }


def _mrope_section(head_dim: int) -> list[int]:
    """Split of the rotary half-dimension into (temporal, height, width), in Qwen2.5-VL's 2:3:3 ratio.

    The real 7B model has head_dim 128 -> [16, 24, 24]; the sections must sum to head_dim // 2.
    """
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    width = half - temporal - height
    if head_dim % 2 or temporal == 0:
        raise ValueError(
            f"model.tiny: attention head dim hidden_size / num_attention_heads = {head_dim} must be "
            f"even and at least 8 for Qwen2.5-VL's 3-D rotary sections"
        )
    return [temporal, height, width]


def _qwen2_5_vl_config(
    tiny: TinyModelParams, spec: FamilySpec, tokenizer: PreTrainedTokenizerFast
) -> Qwen2_5_VLConfig:
    ids = _token_ids(tokenizer, spec)
    text_config = {
        **_text_sizes(tiny),
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
        "max_position_embeddings": 128_000,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": ROPE_THETA,
            "mrope_section": _mrope_section(tiny.hidden_size // tiny.num_attention_heads),
        },
    }
    vision_config = {
        "depth": tiny.vision_depth,
        "hidden_size": tiny.vision_hidden_size,
        "intermediate_size": 4 * tiny.vision_hidden_size,
        "num_heads": tiny.vision_num_heads,
        "out_hidden_size": tiny.hidden_size,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        # Like the real towers (full attention on every 8th block), the last block attends fully
        # and the others within windows, so both paths are exercised.
        "fullatt_block_indexes": [tiny.vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def _llava_onevision_config(
    tiny: TinyModelParams, spec: FamilySpec, tokenizer: PreTrainedTokenizerFast
) -> LlavaOnevisionConfig:
    ids = _token_ids(tokenizer, spec)
    text_config = Qwen2Config(
        **_text_sizes(tiny),
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        max_position_embeddings=32_768,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=tiny.vision_hidden_size,
        intermediate_size=4 * tiny.vision_hidden_size,
        num_hidden_layers=tiny.vision_depth,
        num_attention_heads=tiny.vision_num_heads,
        image_size=LLAVA_TINY_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    side = LLAVA_TINY_IMAGE_SIZE
    return LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=ids["image_token_id"],
        video_token_index=ids["video_token_id"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        # The real grid scaled to the tiny tower: 1x1 to 2x2 tiles of the input side.
        image_grid_pinpoints=[[side * rows, side * cols] for rows in (1, 2) for cols in (1, 2)],
        tie_word_embeddings=False,
        dtype="float32",
    )
