"""Load a model directory (the tiny one or real downloaded weights) with transformers' own loaders.

The tokenizer and image processor load separately: `AutoProcessor` would also build the families'
video processors, which need torchvision; OmniLong preprocesses video itself (`video_inputs`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    BaseImageProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from omnilong.models.families import family_for_config


def _model_dir(path: str | Path, needed: str) -> Path:
    path = Path(path)
    if not (path / needed).is_file():
        where = "no such directory" if not path.is_dir() else f"no {needed} there"
        raise FileNotFoundError(f"{path}: expected a local model directory with {needed} ({where})")
    return path


def load_model(
    path: str | Path, dtype: torch.dtype | str | None = None, rope_theta: float | None = None
) -> PreTrainedModel:
    """The family's `...ForConditionalGeneration`; `dtype=None` keeps the checkpoint's dtype.

    `rope_theta` replaces the language model's RoPE base (long-context training raises it); the
    model saved afterwards carries the new value in its config.
    """
    path = _model_dir(path, "config.json")
    config = AutoConfig.from_pretrained(path)
    if rope_theta is not None:
        text_config = getattr(config, "text_config", config)
        text_config.rope_parameters = {**text_config.rope_parameters, "rope_theta": rope_theta}
    return family_for_config(config).model_class.from_pretrained(path, config=config, dtype=dtype)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(_model_dir(path, "tokenizer_config.json"))


def load_image_processor(path: str | Path) -> BaseImageProcessor:
    return AutoImageProcessor.from_pretrained(_model_dir(path, "preprocessor_config.json"))
