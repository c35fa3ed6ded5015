"""Load a model directory (the tiny one or real downloaded weights) with transformers' own loaders.

Safe by default: no code shipped with a model is run (`trust_remote_code=False`: the two families
are transformers' own classes) and weights are read from safetensors only (a pickled
`pytorch_model.bin` can run code when unpickled).

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
from transformers.models.auto.modeling_auto import MODEL_MAPPING

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
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if rope_theta is not None:
        text_config = getattr(config, "text_config", config)
        text_config.rope_parameters = {**text_config.rope_parameters, "rope_theta": rope_theta}
    _import_part_classes(config)
    return family_for_config(config).model_class.from_pretrained(
        path, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False
    )


def _import_part_classes(config) -> None:
    """Import the classes a composite model builds its parts from (LLaVA-OneVision's language
    model is `AutoModel.from_config(text_config)`) before `from_pretrained` runs. A class first
    imported inside ZeRO-3's `zero.Init` loses the constructor transformers' kernel hub gave it
    (`use_kernelized_func`) when DeepSpeed restores the constructors it patched: every later
    instance then fails with "object has no attribute '_kernel_funcs'" (a second engine in the
    same process, tests/test_tiling_zero3.py)."""
    for part in (getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if part is not None and type(part) in MODEL_MAPPING:
            MODEL_MAPPING[type(part)]  # the lazy mapping imports the class's module


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(_model_dir(path, "tokenizer_config.json"), trust_remote_code=False)


def load_image_processor(path: str | Path) -> BaseImageProcessor:
    return AutoImageProcessor.from_pretrained(_model_dir(path, "preprocessor_config.json"), trust_remote_code=False)
