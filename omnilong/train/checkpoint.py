"""DeepSpeed checkpoints for resume, and the HF-format model a stage hands on.

Checkpoints live in `checkpoints/<stage>/`, outside every DVC output (DVC deletes outputs before
re-running a stage), so a crashed or retried stage resumes from its last checkpoint. A
checkpoint is resumed only if it was written for the same inputs: a fingerprint of the stage's
parameters, the initial model and the packed data is stored with it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

KEEP_CHECKPOINTS = 2


def fingerprint(*parts: Any) -> str:
    """A hash of the inputs and of OmniLong's own code: a retry resumes, a code change retrains."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    package = Path(__file__).resolve().parents[1]
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def save(engine, ckpt_dir: Path, *, next_step: int, state: dict[str, Any]) -> None:
    """Write a checkpoint after which training continues at `next_step`; prune old ones."""
    tag = f"step{next_step:07d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**state, "next_step": next_step})
    if dist.get_rank() == 0:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def resume(engine, ckpt_dir: Path, *, expected_fingerprint: str) -> dict[str, Any] | None:
    """Load the latest checkpoint written for the same inputs; None to start from scratch."""
    if not (ckpt_dir / "latest").is_file():
        return None
    tag = (ckpt_dir / "latest").read_text().strip()
    # Read the stored fingerprint before loading anything into the engine.
    client_state = _client_state(ckpt_dir / tag)
    if client_state is None or client_state.get("fingerprint") != expected_fingerprint:
        return None
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    return client_state


def _client_state(tag_dir: Path) -> dict[str, Any] | None:
    states = sorted(tag_dir.glob("*model_states.pt"))
    if not states:
        return None
    saved = torch.load(states[0], map_location="cpu", weights_only=False)
    return {key: saved[key] for key in ("fingerprint", "next_step", "mlflow_run_id") if key in saved}


def discard(ckpt_dir: Path) -> None:
    """Set aside checkpoints written for other inputs (kept for inspection, never resumed).

    Collective: every rank calls it; only rank 0 looks at the directory, so no rank can see it
    before and another after the move.
    """
    if dist.get_rank() == 0 and ckpt_dir.exists():
        stale = ckpt_dir.with_name(ckpt_dir.name + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        ckpt_dir.rename(stale)
    dist.barrier()
