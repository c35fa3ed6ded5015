"""Resume: a checkpoint is resumed only for the inputs it was written for; otherwise it is set aside, the
changed inputs named. (tests/test_train_stage.py runs it under torchrun.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist

from omnilong.config import parse_params
from omnilong.data.pack import pack_stage, scheduled_dir
from omnilong.train import checkpoint
from omnilong.train.checkpoint import changed_inputs, resume, resume_inputs
from tests.test_pack import hand_documents, hand_params, write_hand_stage

INIT = Path("models/init")


@pytest.fixture
def packed(tmp_path):
    """Raw params of a stage packed at two lengths of a context schedule; repack(raw) packs again."""
    raw = hand_params(tmp_path, seq_len=64).model_dump(mode="json")
    raw["stages"]["stage1"]["context_schedule"] = [{"from_step": 0, "seq_len": 32}, {"from_step": 4, "seq_len": 64}]
    write_hand_stage(parse_params(raw), "stage1", hand_documents([150, 70, 40, 100, 20, 65, 33, 90]))

    def repack(raw):
        pack_stage(parse_params(raw), "stage1")

    repack(raw)
    return raw, repack


def changed_by(raw: dict, edit, world_size: int = 2) -> list[str]:
    before = resume_inputs(parse_params(raw), "stage1", INIT, world_size=2)
    edited = json.loads(json.dumps(raw))
    edit(edited)
    return changed_inputs(before, resume_inputs(parse_params(edited), "stage1", INIT, world_size))


def test_seed_parallel_layout_and_world_size_are_resume_inputs(packed):
    raw, _ = packed
    assert changed_by(raw, lambda raw: None) == []
    assert changed_by(raw, lambda raw: raw.update(seed=99)) == ["seed changed: 1234 -> 99"]
    assert changed_by(raw, lambda raw: raw["parallel"].update(nproc_per_node=4)) == [
        "parallel.nproc_per_node changed: 2 -> 4"]
    # How long a collective waits does not change the weights: a stage that timed out resumes with a longer one.
    assert changed_by(raw, lambda raw: raw["parallel"].update(timeout_s=60)) == []
    # Nor where the nodes meet: a restarted job of several nodes may meet elsewhere.
    assert changed_by(raw, lambda raw: raw["parallel"].update(nnodes=2, rdzv_endpoint="node0:29400")) == [
        "parallel.nnodes changed: 1 -> 2"]
    assert changed_by(raw, lambda raw: raw["parallel"].update(rdzv_endpoint="node0:29400", rdzv_id="job-2")) == []
    assert changed_by(raw, lambda raw: raw["stages"]["stage1"].update(sp_size=2)) == [
        "stages.stage1.sp_size changed: 1 -> 2"]
    assert changed_by(raw, lambda raw: None, world_size=1) == ["world_size changed: 2 -> 1"]


def test_heldout_split_and_every_scheduled_length_are_resume_inputs(packed):
    raw, repack = packed
    stage_dir = Path(raw["data"]["packed_dir"]) / "stage1"
    before = resume_inputs(parse_params(raw), "stage1", INIT, world_size=2)

    # A shorter length's packing alone.
    short_index = scheduled_dir(stage_dir, 32) / "index.json"
    index = json.loads(short_index.read_text())
    short_index.write_text(json.dumps({**index, "rows_per_shard": index["rows_per_shard"] + 1}))
    changed = changed_inputs(before, resume_inputs(parse_params(raw), "stage1", INIT, world_size=2))
    assert [line.split(" changed")[0] for line in changed] == ["packed.len32"]

    raw["eval"]["heldout_documents"] = 2
    repack(raw)
    changed = changed_inputs(before, resume_inputs(parse_params(raw), "stage1", INIT, world_size=2))
    names = {line.split(" changed")[0] for line in changed}
    assert {"heldout_split.heldout_documents", "heldout_split.documents", "packed.len32", "packed.len64"} <= names
    assert "heldout_split.heldout_documents changed: 1 -> 2" in changed


class RecordingEngine:
    """What `resume` asks of a DeepSpeed engine: load a tag (this rank's client state back)."""

    def __init__(self):
        self.loaded = []

    def load_checkpoint(self, directory, tag):
        self.loaded.append(tag)
        return directory, {"next_step": int(tag.removeprefix("step")), "rng": f"rng of {tag}"}


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def write_checkpoint(ckpt_dir: Path, manifest: dict, step: int = 2, complete: bool = True) -> Path:
    """A checkpoint of two ranks' files as DeepSpeed writes them; published (its manifest) if `complete`."""
    tag_dir = ckpt_dir / f"step{step:07d}"
    tag_dir.mkdir(parents=True)
    for rank in range(2):
        (tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"x" * (10 + rank))
    if complete:
        checkpoint._publish(tag_dir, {**manifest, "next_step": step})
    return tag_dir


def test_changed_inputs_set_the_checkpoints_aside_and_name_the_change(tmp_path, one_rank, capsys):
    inputs = {"seed": 1234, "world_size": 2}
    ckpt_dir = tmp_path / "checkpoints" / "stage1"
    write_checkpoint(ckpt_dir, {"resume_inputs": inputs})
    engine = RecordingEngine()
    resumed = resume(engine, ckpt_dir, inputs=inputs)
    assert resumed["next_step"] == 2 and resumed["rng"] == "rng of step0000002"
    assert engine.loaded == ["step0000002"]

    for attempt in (1, 2):
        assert resume(engine, ckpt_dir, inputs={**inputs, "seed": 1235}) is None
        stale = tmp_path / "checkpoints" / f"stage1.stale-{attempt}"
        assert (stale / "step0000002" / checkpoint.MANIFEST).is_file() and not ckpt_dir.exists()
        assert f"set aside as {stale}: seed changed: 1234 -> 1235" in capsys.readouterr().out
        write_checkpoint(ckpt_dir, {"resume_inputs": inputs})
    assert (tmp_path / "checkpoints" / "stage1.stale-1").is_dir()  # an earlier set-aside is kept
    assert engine.loaded == ["step0000002"]

    # A checkpoint of an older OmniLong stored only a hash of its inputs.
    ckpt_dir.rename(tmp_path / "kept")
    write_checkpoint(ckpt_dir, {"fingerprint": "0123456789abcdef"})
    assert resume(engine, ckpt_dir, inputs=inputs) is None
    assert "records no inputs" in capsys.readouterr().out


def test_resume_passes_over_incomplete_and_damaged_checkpoints(tmp_path, one_rank, capsys):
    """Only a published checkpoint whose files are all there at their sizes is resumed: the newest
    such one, each newer one named with what is wrong."""
    inputs = {"seed": 1234}
    ckpt_dir = tmp_path / "checkpoints"
    write_checkpoint(ckpt_dir, {"resume_inputs": inputs}, step=2)
    truncated = write_checkpoint(ckpt_dir, {"resume_inputs": inputs}, step=4)
    (truncated / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"x")
    unpublished = write_checkpoint(ckpt_dir, {"resume_inputs": inputs}, step=6, complete=False)
    (ckpt_dir / "latest").write_text(unpublished.name)  # as DeepSpeed writes it before its last barrier
    engine = RecordingEngine()
    assert resume(engine, ckpt_dir, inputs=inputs)["next_step"] == 2
    assert engine.loaded == ["step0000002"]
    out = capsys.readouterr().out
    assert f"{ckpt_dir}: resuming from step0000002, passing over: {unpublished}: incomplete (no complete.json" in out
    assert (f"{truncated}: zero_pp_rank_1_mp_rank_00_model_states.pt has 1 bytes, complete.json says 11") in out

    for tag_dir in (truncated, unpublished):
        shutil.rmtree(tag_dir)
    (ckpt_dir / "step0000002" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    assert resume(engine, ckpt_dir, inputs=inputs) is None
    assert "zero_pp_rank_0_mp_rank_00_model_states.pt is missing" in capsys.readouterr().out


def test_publishing_keeps_the_newest_complete_checkpoints(tmp_path, one_rank):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        write_checkpoint(ckpt_dir, {}, step=step)
    write_checkpoint(ckpt_dir, {}, step=8, complete=False)
    checkpoint._prune(ckpt_dir, keep=2)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step0000004", "step0000006"]
    assert (ckpt_dir / "latest").read_text() == "step0000006"
