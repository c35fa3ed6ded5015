"""DeepSpeed checkpoints for resume, and the HF-format model a stage hands on.

Checkpoints live in `checkpoints/<stage>/`, outside every DVC output (DVC deletes outputs before
re-running a stage), so a crashed or retried stage resumes from its last checkpoint. A
checkpoint is resumed only if it was written for the same inputs (`resume_inputs`): stored with
it by name, so that a changed input is named when the old checkpoints are set aside.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from omnilong.config import Params, StageName
from omnilong.data.pack import scheduled_dir
from omnilong.data.shards import read_index
from omnilong.digest import json_digest

KEEP_CHECKPOINTS = 2
ABSENT = "(absent)"


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """Nested settings as {dotted name: value}; a list is one value (its JSON)."""
    if isinstance(value, dict):
        return {name: leaf for key, item in value.items() for name, leaf in _flat(f"{prefix}.{key}", item).items()}
    if isinstance(value, list):
        return {prefix: json.dumps(value, sort_keys=True)}
    return {prefix: value}


def code_digest() -> str:
    """A hash of OmniLong's own code: a retry resumes, a code change retrains."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def resume_inputs(params: Params, stage: StageName, init_dir: Path, world_size: int) -> dict[str, Any]:
    """Everything a stage's trained weights depend on, by name: {dotted name: value or digest}.

    The stage's and the model's parameters, the model it starts from, `seed` (with the stage's
    `train.seed`, the row order), the parallel layout and the actual world size (they set which
    rank reads which rows), the held-out split, every scheduled length's packed index, and the code.
    """
    stage_params = params.stages[stage]
    packed_dir = Path(params.data.packed_dir) / stage
    split = read_index(packed_dir).heldout_split
    split_inputs = None if split is None else {
        **split.model_dump(mode="json", exclude={"documents", "document_ids"}),
        "documents": json_digest(split.document_ids),
    }
    packed = {
        f"len{seq_len}": json_digest(read_index(
            packed_dir if seq_len == stage_params.seq_len else scheduled_dir(packed_dir, seq_len)
        ).model_dump(mode="json"))
        for seq_len in stage_params.packed_lengths
    }
    return {
        "seed": params.seed,
        **_flat(f"stages.{stage}", stage_params.model_dump(mode="json")),
        **_flat("model", params.model.model_dump(mode="json")),
        "init": str(init_dir),
        **_flat("parallel", params.parallel.model_dump(mode="json")),
        "world_size": world_size,
        **_flat("heldout_split", split_inputs),
        **_flat("packed", packed),
        "code": code_digest(),
    }


def changed_inputs(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`name changed: old -> new` for each input that differs."""
    return [
        f"{name} changed: {stored.get(name, ABSENT)!r} -> {current.get(name, ABSENT)!r}"
        for name in sorted(stored.keys() | current.keys())
        if stored.get(name, ABSENT) != current.get(name, ABSENT)
    ]


def save(engine, ckpt_dir: Path, *, next_step: int, state: dict[str, Any]) -> None:
    """Write a checkpoint after which training continues at `next_step`; prune old ones."""
    tag = f"step{next_step:07d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**state, "next_step": next_step})
    if dist.get_rank() == 0:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def resume(engine, ckpt_dir: Path, *, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Load the latest checkpoint written for the same `inputs` (stored as `resume_inputs` in its
    client state); None to start from scratch, after setting aside any checkpoints written for
    other inputs with a message naming what changed.

    Collective: every rank calls it and comes to the same decision from the same files.
    """
    if not ckpt_dir.exists():
        return None
    reasons = ["no complete checkpoint (no `latest` file)"]
    if (ckpt_dir / "latest").is_file():
        tag = (ckpt_dir / "latest").read_text().strip()
        # Read the stored inputs before loading anything into the engine.
        stored = _client_state(ckpt_dir / tag).get("resume_inputs")
        if stored is None:
            reasons = [f"{tag} records no inputs (written by an older OmniLong)"]
        else:
            reasons = changed_inputs(stored, inputs)
        if not reasons:
            _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
            return client_state
    set_aside(ckpt_dir, reasons)
    return None


def _client_state(tag_dir: Path) -> dict[str, Any]:
    states = sorted(tag_dir.glob("*model_states.pt"))
    if not states:
        return {}
    saved = torch.load(states[0], map_location="cpu", weights_only=False)
    return {key: saved[key] for key in ("resume_inputs", "next_step", "mlflow_run_id") if key in saved}


def set_aside(ckpt_dir: Path, reasons: list[str]) -> None:
    """Move checkpoints that will not be resumed to the first free `<dir>.stale-<n>`, kept for
    inspection (never deleted), saying why.

    Collective: every rank calls it, once it has read the directory; only rank 0 moves it, so no
    rank can see it before and another after the move.
    """
    dist.barrier()
    if dist.get_rank() == 0:
        number = 1
        while (stale := ckpt_dir.with_name(f"{ckpt_dir.name}.stale-{number}")).exists():
            number += 1
        ckpt_dir.rename(stale)
        print(f"{ckpt_dir}: not resumed, set aside as {stale}: " + "; ".join(reasons), flush=True)
    dist.barrier()
