"""Which modules LoRA adapts: the names `train.lora.target_modules` stand for, and the names a
model offers (checked before training by `omnilong config check`, applied by train/lora.py)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

# LoRA adapts only the language model's modules: the vision tower has modules of the same names.
_IN_LANGUAGE_MODEL = r".*language_model.*\."


def target_pattern(target_modules: list[str]) -> re.Pattern:
    """Matches (in full) the names of the modules LoRA adapts for `target_modules`."""
    return re.compile(_IN_LANGUAGE_MODEL + "(" + "|".join(map(re.escape, target_modules)) + ")")


def targetable_module_names(model_dir: Path) -> list[str]:
    """The full names of the language model's linear and embedding layers (those LoRA can adapt)
    in the model of `model_dir`, built from its config on the meta device (no weights read, no
    memory taken)."""
    from transformers import AutoConfig

    from omnilong.models.families import family_for_config

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = family_for_config(config).model_class._from_config(config)
    in_language_model = re.compile(_IN_LANGUAGE_MODEL)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding) and in_language_model.match(name)]
