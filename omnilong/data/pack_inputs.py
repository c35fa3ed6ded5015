"""What a stage's packed rows are made from, recorded beside them, so that packing again from the
same inputs writes nothing.

DVC runs `pack` again whenever any parameter of the stage's block changes, `lr` included:
dvc.yaml cannot list only the keys packing reads, since a key missing from params.yaml is an
error there, and most are left at their defaults. So the packer keeps its own record
(`inputs.json` in the stage's packed directory, which dvc.yaml marks `persist` so that DVC leaves
it in place for the re-run): when the inputs are the ones recorded and every packed file still
matches its checksum, the rows are left as they are.

The stage's parameters count except those listed as training-only below: a new parameter counts
until it is listed, so it packs again rather than keep rows that may be stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omnilong.config import Params, StageName
from omnilong.data.checksum import file_checksum
from omnilong.data.prepare import INDEX_FILE as TOKENIZED_INDEX
from omnilong.data.shards import PackedShards, PackedShardsError
from omnilong.digest import code_digest

INPUTS_FILE = "inputs.json"

TRAINING_ONLY: dict[str, Any] = {
    "loss": True,
    # max_steps, micro_batch_size and grad_accum_steps stay: a mixture's draw reads them.
    "train": {
        "finetune", "lora", "lr", "min_lr_ratio", "weight_decay", "warmup_steps", "grad_clip", "max_nonfinite_steps",
        "precision", "offload_optimizer", "offload_params", "activation_checkpointing", "offload_activations",
        "tiled_mlp", "checkpoint_every", "keep_checkpoints", "seed",
    },
}


def pack_inputs(
    params: Params, stage: StageName, tokenized_dirs: list[Path], rows_per_shard: int | None
) -> dict[str, Any]:
    """Everything the packer reads for `stage`: its parameters (but the training-only ones), the
    model's, the seed, the world size, the held-out count, each tokenized set's index (which
    holds its files' checksums), the rows per shard asked for and the code."""
    return {
        "rows_per_shard": rows_per_shard,
        "stage": params.stages[stage].model_dump(mode="json", exclude=TRAINING_ONLY),
        "model": params.model.model_dump(mode="json"),
        "seed": params.seed,
        "world_size": params.parallel.world_size,
        "heldout_documents": params.eval.heldout_documents,
        # None where nothing is prepared yet: then nothing matches, and loading names what is missing.
        "tokenized": {directory.name: file_checksum(directory / TOKENIZED_INDEX).model_dump(mode="json")
                      if (directory / TOKENIZED_INDEX).is_file() else None for directory in tokenized_dirs},
        "code": code_digest(),
    }


def packed_from(stage_dir: Path, inputs: dict[str, Any], shard_sets: list[Path]) -> bool:
    """Whether `stage_dir` holds rows packed from `inputs`, every file of `shard_sets` intact."""
    recorded = stage_dir / INPUTS_FILE
    if not recorded.is_file() or json.loads(recorded.read_text()) != inputs:
        return False
    try:
        for shard_set in shard_sets:
            PackedShards(shard_set)  # verifies every file's size and checksum
    except PackedShardsError:
        return False
    return True
