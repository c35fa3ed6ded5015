"""Free disk space is checked before a checkpoint or an export is written.

The free-space reading is patched (`omnilong.train.disk_space.free_bytes`): no filesystem here
can be filled on demand. The engine is a stand-in holding ZeRO-3's partition attributes, whose
writes fail the test if they are reached.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from omnilong.train import checkpoint, disk_space, export
from omnilong.train.disk_space import DiskSpaceError
from tests.test_checkpoint import one_rank  # noqa: F401  (fixture)


class PartitionedEngine:
    """A 1000 x 1000 fp32 layer as ZeRO-3 holds it on one rank; writing anything fails."""

    def __init__(self):
        self.module = torch.nn.Linear(1000, 1000)
        for param in self.module.parameters():
            param.ds_tensor, param.ds_numel = param.data, param.numel()

    def save_checkpoint(self, *args, **kwargs):
        raise AssertionError("the checkpoint was written despite the missing space")

    def _zero3_consolidated_16bit_state_dict(self):
        raise AssertionError("the export went ahead despite the missing space")


WEIGHT_BYTES = (1000 * 1000 + 1000) * 4


def test_a_checkpoint_without_room_is_refused_before_writing(tmp_path, one_rank, monkeypatch):  # noqa: F811
    monkeypatch.setattr(disk_space, "free_bytes", lambda directory: 5_000_000)
    ckpt_dir = tmp_path / "checkpoints" / "stage1"
    needed = WEIGHT_BYTES * 3 + checkpoint.MODEL_STATE_BYTES  # fp32 master copy, AdamW's two moments
    with pytest.raises(DiskSpaceError, match=rf"{ckpt_dir}: a checkpoint \(every rank's shard\) needs about "
                                             rf"{needed:,} bytes .* but 5,000,000 bytes .* are free"):
        checkpoint.save(PartitionedEngine(), ckpt_dir, next_step=2, state={}, keep=2)
    assert not ckpt_dir.exists()


def test_an_export_without_room_is_refused_before_gathering(tmp_path, one_rank, monkeypatch):  # noqa: F811
    monkeypatch.setattr(disk_space, "free_bytes", lambda directory: WEIGHT_BYTES - 1)
    run = SimpleNamespace(out_dir=tmp_path / "runs" / "stage1", stage="stage1", init_dir=Path("models/init"))
    with pytest.raises(DiskSpaceError, match=rf"{run.out_dir}: the exported model needs about {WEIGHT_BYTES:,} "
                                             rf"bytes .* but {WEIGHT_BYTES - 1:,} bytes"):
        export.export_hf_model(PartitionedEngine(), run, params=None)
    assert not run.out_dir.exists()


def test_free_bytes_reads_the_nearest_existing_directory(tmp_path, monkeypatch):
    """A checkpoint directory is made by the write it precedes: its parent's filesystem counts."""
    asked = []
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: asked.append(path) or SimpleNamespace(free=7))
    assert disk_space.free_bytes(tmp_path / "not" / "yet" / "made") == 7
    assert asked == [tmp_path]
