"""The stage's hand-off: an HF-format model directory that plain transformers loads.

Under ZeRO-3 no rank holds the whole model; the weights are gathered onto rank 0 (16-bit when
training in bf16) and written with `save_pretrained`, beside the tokenizer, chat template and
image processor of the model the stage started from. A LoRA stage writes the merged weights
there and the adapter alone in `adapter/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from omnilong import atomic
from omnilong.config import Params
from omnilong.train.disk_space import check_free_space

# Files of a model directory that are not weights or config: carried over from the initial model.
PREPROCESSING_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "vocab.json", "merges.txt",
    "added_tokens.json", "generation_config.json",
)


def _copy_preprocessing(init_dir: Path, out_dir: Path) -> None:
    for name in PREPROCESSING_FILES:
        if (init_dir / name).is_file():
            shutil.copy2(init_dir / name, out_dir / name)


def export_hf_model(engine, run, params: Params) -> None:
    """Gather the trained weights and write `run.out_dir/model` (and `adapter/` for LoRA) atomically,
    once the disk has room for them (each weight once, in its training dtype)."""
    needed = sum(p.ds_numel * p.element_size() for p in engine.module.parameters())
    check_free_space(run.out_dir, needed, "the exported model")
    # Collective: every rank takes part in gathering the partitions.
    state = engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() == 0:
        model_state = {
            key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")
        }
        trained = engine.module.model
        # Rank 0 writes plain weights: transformers must stop treating new models as ZeRO-3 ones
        # (with it on, save_pretrained renames the keys of a given state dict).
        unset_hf_deepspeed_config()
        with atomic.atomic_dir(run.out_dir / "model") as staging:
            if params.stages[run.stage].train.finetune == "lora":
                from omnilong.train.lora import save_merged

                save_merged(trained, model_state, run.init_dir, staging, run.out_dir)
            else:
                with torch.device("meta"):  # no second copy of the weights: they come from the gather
                    plain = type(trained)(trained.config)
                plain.load_state_dict(model_state, strict=True, assign=True)
                plain.tie_weights()  # assign=True replaced the shared tensor of a tied head
                plain.save_pretrained(staging, safe_serialization=True)
            _copy_preprocessing(run.init_dir, staging)
    dist.barrier()
