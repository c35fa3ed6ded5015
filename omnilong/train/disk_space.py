"""Free disk space, checked before a checkpoint or an export is written.

A write that runs out of space midway fails late (after the gather, in DeepSpeed's or
safetensors' own error) and can leave a partial file behind; checking first fails at once,
naming the directory, the bytes needed and the bytes free.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path


class DiskSpaceError(RuntimeError):
    """Too little free space for what is about to be written."""


def free_bytes(directory: Path) -> int:
    """Free bytes on the filesystem that holds `directory` (or would: its nearest existing parent).
    The one reading of free space: tests patch it."""
    return shutil.disk_usage(_nearest_existing(directory)).free


def _nearest_existing(directory: Path) -> Path:
    path = Path(directory).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Collective: raise on every rank if the least free space any rank sees for `directory` is
    below `needed` bytes, so that no rank goes on to a write the others have refused."""
    import torch  # here: the launcher's check before the ranks start needs no torch
    import torch.distributed as dist

    free = torch.tensor([free_bytes(directory)], dtype=torch.float64)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    _refuse_if_short(directory, needed, int(free.item()), what)


def _refuse_if_short(directory: Path, needed: int, free: int, what: str) -> None:
    if free < needed:
        raise DiskSpaceError(
            f"{directory}: {what} needs about {needed:,} bytes ({needed / 2**30:.2f} GiB) but "
            f"{free:,} bytes ({free / 2**30:.2f} GiB) are free; free some space or point it at a larger disk"
        )


def check_room_for_stage(model_dir: Path, finetune: str, out_dir: Path, ckpt_dir: Path) -> None:
    """Before any rank starts: room for one checkpoint in `ckpt_dir` and the exported model in
    `out_dir`, estimated from the starting model's safetensors (as `checkpoint.shard_bytes` and
    the export count them: full fine-tuning keeps an fp32 master copy and AdamW's two moments of
    every weight, LoRA the frozen weights as stored). Both on one filesystem: their sum."""
    numel, stored = _stored_weights(model_dir)
    checkpoint = numel * 3 * 4 if finetune == "full" else stored
    needs = [(ckpt_dir, checkpoint, "a checkpoint"), (out_dir, stored, "the exported model")]
    if _filesystem(ckpt_dir) == _filesystem(out_dir):
        needs = [(ckpt_dir, checkpoint + stored, f"a checkpoint and the exported model (in {out_dir})")]
    for directory, needed, what in needs:
        _refuse_if_short(directory, needed, free_bytes(directory), what)


def _stored_weights(model_dir: Path) -> tuple[int, int]:
    """(number of weights, bytes on disk) of the safetensors files in `model_dir`, from their headers."""
    numel = stored = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        numel += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
        stored += path.stat().st_size
    return numel, stored


def _filesystem(directory: Path) -> int:
    return _nearest_existing(directory).stat().st_dev
