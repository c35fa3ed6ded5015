"""DeepSpeed checkpoints for resume, and the HF-format model a stage hands on.

Checkpoints live in `checkpoints/<stage>/`, outside every DVC output (DVC deletes outputs before
re-running a stage), so a crashed or retried stage resumes from its last complete checkpoint.
A checkpoint is complete once rank 0 has written its manifest (`complete.json`: every file with
its size, the resume inputs, the step to continue at) after every rank wrote its files; resume
verifies it and passes over anything newer that is not. A checkpoint is resumed only if it was
written for the same inputs (`resume_inputs`): stored in the manifest by name, so that a changed
input is named when the old checkpoints are set aside.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from omnilong import atomic
from omnilong.config import Params, StageName
from omnilong.data.pack import packed_set_dirs
from omnilong.data.shards import read_index
from omnilong.digest import code_digest, json_digest
from omnilong.train import rng
from omnilong.train.disk_space import check_free_space
from omnilong.train.faults import kill_job_before_publishing_if_asked

ABSENT = "(absent)"


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """Nested settings as {dotted name: value}; a list is one value (its JSON)."""
    if isinstance(value, dict):
        return {name: leaf for key, item in value.items() for name, leaf in _flat(f"{prefix}.{key}", item).items()}
    if isinstance(value, list):
        return {prefix: json.dumps(value, sort_keys=True)}
    return {prefix: value}


def resume_inputs(params: Params, stage: StageName, init_dir: Path, world_size: int) -> dict[str, Any]:
    """Everything a stage's trained weights depend on, by name: {dotted name: value or digest}.

    The stage's and the model's parameters, the model it starts from, `seed` (with the stage's
    `train.seed`, the row order), the parallel layout and the actual world size (they set which
    rank reads which rows), the held-out split, every packed set's index, and the code.
    """
    stage_params = params.stages[stage]
    packed_dir = Path(params.data.packed_dir) / stage
    split = read_index(packed_dir).heldout_split
    split_inputs = None if split is None else {
        **split.model_dump(mode="json", exclude={"documents", "document_ids"}),
        "documents": json_digest(split.document_ids),
    }
    packed = {
        # The stage's own set is named for its length, as the other sets are by their directories.
        (f"len{stage_params.seq_len}" if directory == packed_dir else directory.name):
            json_digest(read_index(directory).model_dump(mode="json"))
        for directory in packed_set_dirs(packed_dir, stage_params).values()
    }
    return {
        "seed": params.seed,
        # How many checkpoints are kept does not change the weights.
        **_flat(f"stages.{stage}", stage_params.model_dump(mode="json", exclude={"train": {"keep_checkpoints"}})),
        **_flat("model", params.model.model_dump(mode="json")),
        "init": str(init_dir),
        # How long a collective waits, and where the nodes meet, do not change the weights: raising
        # the wait resumes a stage that timed out, and a restarted job may meet elsewhere.
        **_flat("parallel", params.parallel.model_dump(mode="json", exclude={"timeout_s", "rdzv_endpoint", "rdzv_id"})),
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


MODEL_STATE_BYTES = 2**20
"""Allowance for a rank's model-state file: client state, config, scheduler, buffers (34 KB on
the tiny default)."""


def shard_bytes(engine) -> int:
    """About what this rank writes in a checkpoint: of its ZeRO-3 partition of the trainable
    parameters the fp32 master copy and AdamW's two moments (4 bytes each), of the frozen ones the
    partition itself, and its model-state file. (The tiny default's stage 1 on 2 ranks: about
    10.4 MB estimated, 8,418,712 bytes written, of which 12 bytes a weight in the optimizer-state
    files.)"""
    params = list(engine.module.parameters())
    optimizer = sum(p.ds_tensor.numel() for p in params if p.requires_grad) * 3 * 4
    frozen = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params if not p.requires_grad)
    return optimizer + frozen + MODEL_STATE_BYTES


MANIFEST = "complete.json"
"""Written in a checkpoint's directory by rank 0 once every rank's files are: its presence makes
the checkpoint complete. DeepSpeed's own `latest` is written before its last barrier, while
another rank may still be writing, so resume never trusts it; ours is rewritten after the
manifest, for DeepSpeed's tools (zero_to_fp32)."""


def save(engine, ckpt_dir: Path, *, next_step: int, state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint after which training continues at `next_step`, publish it, and keep the
    newest `keep` complete ones. `state` (JSON: the resume inputs, the MLflow run) goes into the
    manifest; each rank's RNG states go into its own file.

    Returns the checkpoint's directory once it is committed: every rank's files written and
    the manifest published, so a crash from here on loses no step before `next_step`.

    Collective. Refused before anything is written if the disk lacks room for every rank's shard
    (the old checkpoints are pruned only after the new one is complete)."""
    needed = torch.tensor([float(shard_bytes(engine))], dtype=torch.float64)
    dist.all_reduce(needed)
    check_free_space(ckpt_dir, int(needed.item()), "a checkpoint (every rank's shard)")
    tag = f"step{next_step:07d}"
    tag_dir = ckpt_dir / tag
    if dist.get_rank() == 0 and tag_dir.exists():
        # Left by a write that crashed, or past the checkpoint a retry resumed from: rewritten whole.
        _remove(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                           client_state={"next_step": next_step, "rng": rng.capture()})
    # save_checkpoint ends with a barrier: every rank's files are written.
    kill_job_before_publishing_if_asked(next_step)
    if dist.get_rank() == 0:
        _publish(tag_dir, {**state, "next_step": next_step})
        _prune(ckpt_dir, keep)
    dist.barrier()
    return tag_dir


def _publish(tag_dir: Path, state: dict[str, Any]) -> None:
    files = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file()):
        with path.open("rb") as file:
            os.fsync(file.fileno())  # on disk before the manifest says they are
        files[path.relative_to(tag_dir).as_posix()] = path.stat().st_size
    atomic.write_text(tag_dir / MANIFEST, json.dumps({**state, "files": files}, indent=1, sort_keys=True))
    atomic.write_text(tag_dir.parent / "latest", tag_dir.name)


def _remove(tag_dir: Path) -> None:
    """Delete a checkpoint, its manifest first: never a manifest over missing files."""
    (tag_dir / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (incomplete ones too)."""
    kept = [tag_dir for tag_dir, _ in complete_checkpoints(ckpt_dir)][:keep]
    for tag_dir in _newest_first(ckpt_dir):
        if tag_dir not in kept:
            _remove(tag_dir)


def verify(tag_dir: Path) -> dict[str, Any]:
    """The manifest of a checkpoint whose files are all there at their recorded sizes.

    Raises ValueError naming the checkpoint and what is missing or wrong."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"{tag_dir}: incomplete (no {MANIFEST}: its writing never finished)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{tag_dir / MANIFEST}: not valid JSON ({error})") from None
    for name, size in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            raise ValueError(f"{tag_dir}: {name} is missing (listed in {MANIFEST})")
        if path.stat().st_size != size:
            raise ValueError(f"{tag_dir}: {name} has {path.stat().st_size:,} bytes, {MANIFEST} says {size:,}")
    return manifest


def _newest_first(ckpt_dir: Path) -> list[Path]:
    return sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), reverse=True)


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, manifest) of each complete checkpoint that verifies, newest first."""
    found = []
    for tag_dir in _newest_first(ckpt_dir):
        with contextlib.suppress(ValueError):
            found.append((tag_dir, verify(tag_dir)))
    return found


def resume(engine, ckpt_dir: Path, *, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Load the newest complete checkpoint, if it was written for the same `inputs`: its manifest
    with this rank's `rng` states (to restore with omnilong.train.rng.restore once the data
    loader is iterating). None to start from scratch, after setting aside any checkpoints
    written for other inputs, or none complete, with a message naming why.

    Newer incomplete or damaged checkpoints are passed over, each named; the next save of their
    step replaces them.

    Collective: every rank calls it and comes to the same decision from the same files.
    """
    if not ckpt_dir.exists():
        return None
    passed_over = []
    for tag_dir in _newest_first(ckpt_dir):
        try:
            manifest = verify(tag_dir)
        except ValueError as error:
            passed_over.append(str(error))
            continue
        stored = manifest.get("resume_inputs")
        reasons = changed_inputs(stored, inputs) if stored is not None else [
            f"{tag_dir.name} records no inputs (written by an older OmniLong)"]
        if reasons:
            break
        if passed_over and dist.get_rank() == 0:
            print(f"{ckpt_dir}: resuming from {tag_dir.name}, passing over: " + "; ".join(passed_over), flush=True)
        _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag_dir.name)
        return {**manifest, "rng": client_state["rng"]}
    else:
        reasons = ["no complete checkpoint (no step*/" + MANIFEST + ")", *passed_over]
    set_aside(ckpt_dir, reasons)
    return None


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
