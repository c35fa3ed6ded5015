"""LoRA fine-tuning (PEFT) of the language model, and the merged weights a LoRA stage hands on."""

from __future__ import annotations

from pathlib import Path

import torch

from omnilong.config import LoraParams
from omnilong.models.lora_targets import target_pattern


def add_lora(model, lora: LoraParams):
    from peft import LoraConfig, get_peft_model

    # peft matches a string target against each module's full name with re.fullmatch.
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=target_pattern(lora.target_modules).pattern)
    return get_peft_model(model, config)


def save_merged(peft_model, state: dict[str, torch.Tensor], init_dir: Path, model_dir: Path, out_dir: Path) -> None:
    """Write merged weights to `model_dir` and the adapter alone to `out_dir/adapter` (rank 0 only)."""
    from peft import get_peft_model

    from omnilong import atomic
    from omnilong.models.loading import load_model

    # A plain (not partitioned) copy of the base model on rank 0 receives the gathered weights.
    base = load_model(init_dir, dtype=next(iter(state.values())).dtype)
    plain = get_peft_model(base, peft_model.peft_config["default"])
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or any("lora_" in key for key in missing):
        raise RuntimeError(f"LoRA export: gathered weights do not fit the model (unexpected {unexpected[:5]})")
    with atomic.atomic_dir(out_dir / "adapter") as adapter_dir:
        plain.save_pretrained(adapter_dir)
    plain.merge_and_unload().save_pretrained(model_dir, safe_serialization=True)
