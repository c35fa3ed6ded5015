"""Packing: invariants on hand-made token documents, then on the real prepare output of a tiny corpus."""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from omnilong.config import Params, StageName, parse_params
from omnilong.data import pack
from omnilong.data.pack import IGNORE_INDEX, PackError, Piece, heldout_dir, pack_stage, plan_rows, scheduled_dir
from omnilong.data.prepare import (
    DocumentEntry,
    PrepareError,
    SkippedDocument,
    TokenizedDocument,
    write_tokenized,
)
from omnilong.data.shards import PackedShards, PackedShardsError, VideoClip
from omnilong.data.video_frames import read_frames
from omnilong.models.families import get_family
from omnilong.models.positions import position_ids_for_document
from omnilong.models.video_inputs import preprocess_video
from tests.test_prepare import as_trained

PAD = 0


def hand_params(tmp_path: Path, seq_len: int = 64, family: str = "llava_onevision", model_dir: Path | None = None) -> Params:
    stage = {"seq_len": seq_len, "sp_size": 1}
    return parse_params(
        {
            "model": {"family": family, "path": str(model_dir or tmp_path / "no-model")},
            "data": {
                "raw_dir": str(tmp_path / "raw"),
                "tokenized_dir": str(tmp_path / "tokenized"),
                "packed_dir": str(tmp_path / "packed"),
            },
            "stages": {"stage1": stage, "stage2": stage, "stage3": {**stage, "video_frames": {"num_frames": 4}}},
            "eval": {"heldout_documents": 1},  # the fewest a stage holds out: hand-made stages are small
        }
    )


def hand_documents(lengths: list[int], seed: int = 0) -> list[TokenizedDocument]:
    """Documents of random tokens (never the pad id) with a random prompt-like masked prefix."""
    rng = np.random.default_rng(seed)
    documents = []
    for i, length in enumerate(lengths):
        trainable = np.ones(length, dtype=bool)
        trainable[: rng.integers(0, length)] = False
        documents.append(
            TokenizedDocument(
                DocumentEntry(id=f"doc{i}", corpus="hand"),
                rng.integers(1, 1000, size=length).astype(np.int32),
                trainable,
            )
        )
    return documents


def write_hand_stage(params: Params, stage: StageName, documents: list[TokenizedDocument]) -> None:
    write_tokenized(Path(params.data.tokenized_dir) / stage, stage, params.model.family, PAD, documents)


def shard_sets(stage_dir: Path) -> list[Path]:
    """A stage's training rows at its seq_len and its held-out rows: every document is in one of them."""
    return [stage_dir, heldout_dir(stage_dir)]


def recovered_documents(*shard_dirs: Path) -> dict[int, list[tuple[int, np.ndarray, np.ndarray]]]:
    """(start, input_ids, labels) of every packed piece, per source document, read from the files directly."""
    pieces = defaultdict(list)
    for shard_dir in shard_dirs:
        for doc, doc_pieces in _recovered(shard_dir).items():
            pieces[doc] += doc_pieces
    return pieces


def _recovered(stage_dir: Path) -> dict[int, list[tuple[int, np.ndarray, np.ndarray]]]:
    index = json.loads((stage_dir / "index.json").read_text())
    pieces = defaultdict(list)
    for shard in index["shards"]:
        arrays = {
            path.stem: np.load(path) for path in (stage_dir / "shards" / shard["name"]).glob("*.npy")
        }
        for local in range(shard["row_end"] - shard["row_start"]):
            first, end = arrays["doc_offsets"][local : local + 2]
            cursor = 0
            for length, doc, start in zip(
                arrays["doc_lens"][first:end], arrays["doc_index"][first:end], arrays["doc_start"][first:end]
            ):
                row_slice = slice(cursor, cursor + length)
                pieces[int(doc)].append(
                    (int(start), arrays["input_ids"][local, row_slice], arrays["labels"][local, row_slice])
                )
                cursor += length
    return pieces


def test_plan_rows_keeps_every_piece_and_never_overfills():
    rng = np.random.default_rng(1)
    pieces = [Piece(doc, 0, int(n)) for doc, n in enumerate(rng.integers(1, 100, size=300))]
    rows = plan_rows(pieces, seq_len=100)
    assert sorted(p for row in rows for p in row) == sorted(pieces)
    assert all(sum(p.length for p in row) <= 100 for row in rows)
    # Best fit leaves little room: no two rows could have been merged.
    free = sorted(100 - sum(p.length for p in row) for row in rows)
    assert free[0] + free[1] < 100
    assert plan_rows(pieces, seq_len=100) == rows


def test_packed_rows_hold_every_token_with_masked_labels_and_restarting_positions(tmp_path):
    params = hand_params(tmp_path, seq_len=64)
    documents = hand_documents([5, 64, 30, 1, 17, 40, 63, 2, 33, 9, 50, 20])
    write_hand_stage(params, "stage2", documents)
    pack_stage(params, "stage2", rows_per_shard=3)

    sets = shard_sets(Path(params.data.packed_dir) / "stage2")
    datasets = [PackedShards(directory) for directory in sets]
    total = sum(len(d.token_ids) for d in documents)
    assert sum(dataset.index.stats.real_tokens for dataset in datasets) == total
    for dataset in datasets:
        stats = dataset.index.stats
        assert stats.real_tokens + stats.padding_tokens == len(dataset) * 64
        assert dataset.index.num_shards == -(-len(dataset) // 3)

    # Every document comes back whole, exactly once, from the boundaries alone.
    pieces = recovered_documents(*sets)
    assert sorted(pieces) == list(range(len(documents)))
    for doc, document in enumerate(documents):
        [(start, input_ids, labels)] = pieces[doc]
        assert start == 0
        np.testing.assert_array_equal(input_ids, document.token_ids)
        expected_labels = np.where(document.trainable, document.token_ids, IGNORE_INDEX)
        expected_labels[0] = IGNORE_INDEX  # nothing of the document precedes its first token
        np.testing.assert_array_equal(labels, expected_labels)

    for dataset in datasets:
        trainable = 0
        for item in dataset:
            used = int(item["doc_lens"].sum())
            assert used <= 64 and item["doc_lens"].min() > 0
            assert (item["input_ids"][used:] == PAD).all() and (item["labels"][used:] == IGNORE_INDEX).all()
            expected_positions = torch.cat([torch.arange(n) for n in item["doc_lens"].tolist() + [64 - used]])
            torch.testing.assert_close(item["position_ids"], expected_positions)
            trainable += int((item["labels"] != IGNORE_INDEX).sum())
        assert trainable == dataset.index.stats.trainable_tokens
        assert "videos" not in dataset[0]


def hand_video_document(doc_id: str, before: list[int], grid_thw: list[int], seconds: float, after: list[int],
                        video_token_id: int) -> TokenizedDocument:
    """A Qwen2.5-VL chat-like document around one video of grid `grid_thw` (merge 2); the clip is
    never decoded by packing, so its file need not exist."""
    num_tokens = grid_thw[0] * grid_thw[1] * grid_thw[2] // 4
    clip = VideoClip(doc_id=doc_id, path="unused.mp4", frame_indices=list(range(2 * grid_thw[0])),
                     timestamps=[0.0] * (2 * grid_thw[0]), fps=4.0, sampled_fps=4.0, height=56, width=56,
                     token_offset=len(before), num_tokens=num_tokens, grid_thw=grid_thw, second_per_grid_t=seconds)
    token_ids = np.array(before + [video_token_id] * num_tokens + after, dtype=np.int32)
    return TokenizedDocument(DocumentEntry(id=doc_id, corpus="hand", video=clip), token_ids,
                             np.ones(len(token_ids), dtype=bool))


def test_packed_mrope_positions_restart_at_0_for_each_document(tmp_path, tiny_model_dir):
    """Two video documents and padding in one row; the ids by hand from the rule in
    `omnilong.models.positions.mrope_position_ids` (the tiny model: merge 2, 2 tokens per second)."""
    model_dir = tiny_model_dir("qwen2_5_vl")
    params = hand_params(tmp_path, seq_len=20, family="qwen2_5_vl", model_dir=model_dir)
    video = AutoConfig.from_pretrained(model_dir).video_token_id
    write_hand_stage(params, "stage3", [
        hand_video_document("a", [5, 6], [2, 2, 4], 2.0, [7, 8], video),  # merged 2 x 1 x 2, offsets 0, 4
        hand_video_document("b", [5], [1, 4, 2], 1.0, [7, 8, 9], video),  # merged 1 x 2 x 1
        hand_video_document("b-copy", [5], [1, 4, 2], 1.0, [7, 8, 9], video),  # one of the b's is held out
    ])
    pack_stage(params, "stage3")
    packed = PackedShards(Path(params.data.packed_dir) / "stage3")
    assert packed.index.heldout_split.document_ids in (["b"], ["b-copy"])
    [row] = packed
    assert row["doc_lens"].tolist() == [8, 6]
    assert row["position_ids"].tolist() == [
        # document a: text 0, 1; video at 2; text after its largest id, 6 | document b | padding
        [0, 1, 2, 2, 6, 6, 7, 8] + [0, 1, 1, 3, 4, 5] + [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 2, 2, 2, 7, 8] + [0, 1, 2, 3, 4, 5] + [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 2, 3, 7, 8] + [0, 1, 1, 3, 4, 5] + [0, 1, 2, 3, 4, 5],
    ]


def test_skipped_records_are_counted_in_the_packed_index(tmp_path):
    params = hand_params(tmp_path)
    skipped = [
        SkippedDocument(id=f"gone{i}", corpus="hand", file=f"video/gone{i}.mp4", reason="corrupt") for i in range(2)
    ]
    documents = hand_documents([10, 20])
    write_hand_stage(params, "stage2", [skipped[0], documents[0], skipped[1], documents[1]])
    pack_stage(params, "stage2")
    index = PackedShards(Path(params.data.packed_dir) / "stage2").index
    assert index.stats.skipped_documents == 2
    assert index.stats.source_documents == 2


def test_packing_is_deterministic(tmp_path):
    params = hand_params(tmp_path)
    write_hand_stage(params, "stage1", hand_documents([int(n) for n in np.arange(1, 120, 7)]))
    packed = Path(params.data.packed_dir) / "stage1"
    pack_stage(params, "stage1", rows_per_shard=4)
    first = {p.relative_to(packed): p.read_bytes() for p in sorted(packed.rglob("*")) if p.is_file()}
    shutil.rmtree(packed)  # else the second pack finds its inputs unchanged and writes nothing
    pack_stage(params, "stage1", rows_per_shard=4)
    second = {p.relative_to(packed): p.read_bytes() for p in sorted(packed.rglob("*")) if p.is_file()}
    assert first == second


def test_long_text_documents_are_cut_into_seq_len_pieces(tmp_path):
    params = hand_params(tmp_path, seq_len=32)
    documents = hand_documents([80, 10, 32])
    write_hand_stage(params, "stage1", documents)
    pack_stage(params, "stage1")
    sets = shard_sets(Path(params.data.packed_dir) / "stage1")
    stats = [PackedShards(directory).index.stats for directory in sets]
    assert sum(s.split_documents for s in stats) == 1
    assert sum(s.documents for s in stats) == 3 + 2

    pieces = sorted(recovered_documents(*sets)[0], key=lambda piece: piece[0])
    assert [(start, len(ids)) for start, ids, _ in pieces] == [(0, 32), (32, 32), (64, 16)]
    np.testing.assert_array_equal(np.concatenate([ids for _, ids, _ in pieces]), documents[0].token_ids)
    # Each piece is a document of its own: no target for its first token.
    assert all(labels[0] == IGNORE_INDEX for _, _, labels in pieces)


def test_instruct_chats_wait_for_a_scheduled_length_they_fit(tmp_path):
    raw = hand_params(tmp_path, seq_len=64).model_dump(mode="json")
    raw["stages"]["stage2"]["context_schedule"] = [{"from_step": 0, "seq_len": 32}, {"from_step": 4, "seq_len": 64}]
    params = parse_params(raw)
    documents = hand_documents([20, 24, 40, 64, 100])
    write_hand_stage(params, "stage2", documents)
    pack_stage(params, "stage2")
    stage_dir = Path(params.data.packed_dir) / "stage2"
    [heldout] = PackedShards(stage_dir).index.heldout_split.documents
    fitting = {0, 1} - {heldout}

    short = PackedShards(scheduled_dir(stage_dir, 32))
    assert short.index.stats.documents == len(fitting) and short.index.stats.deferred_documents == 4 - len(fitting)
    assert short.index.stats.split_documents == 0
    assert set(recovered_documents(short.stage_dir)) == fitting
    for doc in fitting:
        np.testing.assert_array_equal(recovered_documents(short.stage_dir)[doc][0][1], documents[doc].token_ids)

    # At the stage's own seq_len nothing waits: a chat longer than it is cut, as before.
    full, held = (PackedShards(directory) for directory in shard_sets(stage_dir))
    assert full.index.stats.deferred_documents == held.index.stats.deferred_documents == 0
    assert full.index.stats.split_documents + held.index.stats.split_documents == 1
    assert sorted(recovered_documents(full.stage_dir)) == sorted({0, 1, 2, 3, 4} - {heldout})


def test_a_scheduled_length_no_chat_fits_is_refused(tmp_path):
    params = hand_params(tmp_path, seq_len=64)
    raw = params.model_dump(mode="json")
    raw["stages"]["stage2"]["context_schedule"] = [{"from_step": 0, "seq_len": 16}, {"from_step": 4, "seq_len": 64}]
    params = parse_params(raw)
    write_hand_stage(params, "stage2", hand_documents([20, 40, 20]))
    with pytest.raises(PackError) as error:
        pack_stage(params, "stage2")
    for expected in ("stages.stage2.context_schedule", "seq_len = 16", "shortest has 20 tokens"):
        assert expected in str(error.value)
    assert not (Path(params.data.packed_dir) / "stage2").exists()


def test_heldout_documents_reach_no_training_row_of_any_length(tmp_path):
    """Every length of a context schedule is packed from the same documents and long ones are cut
    across rows: holding out packed rows of one length would leave their documents in training."""
    raw = hand_params(tmp_path, seq_len=64).model_dump(mode="json")
    raw["stages"]["stage1"]["context_schedule"] = [{"from_step": 0, "seq_len": 32}, {"from_step": 4, "seq_len": 64}]
    raw["eval"]["heldout_documents"] = 4
    params = parse_params(raw)
    documents = hand_documents([150, 70, 40, 100, 20, 65, 33, 90, 10, 64, 31, 130])
    write_hand_stage(params, "stage1", documents)
    pack_stage(params, "stage1", rows_per_shard=2)

    stage_dir = Path(params.data.packed_dir) / "stage1"
    split = PackedShards(stage_dir).index.heldout_split
    ids = [document.entry.id for document in documents]
    heldout = {ids.index(doc_id) for doc_id in split.document_ids}
    assert len(heldout) == split.heldout_documents == 4
    assert split.training_documents == len(documents) - 4 and split.seed == params.seed
    for directory in (stage_dir, scheduled_dir(stage_dir, 32)):
        trained = set(recovered_documents(directory))
        assert not trained & heldout, directory
        assert trained == set(range(len(documents))) - heldout, directory

    # The held-out documents, whole, in their own shards at the stage's final length.
    heldout_set = PackedShards(heldout_dir(stage_dir))
    assert heldout_set.index.seq_len == 64
    pieces = recovered_documents(heldout_set.stage_dir)
    assert set(pieces) == heldout
    for doc in heldout:
        joined = np.concatenate([ids for _, ids, _ in sorted(pieces[doc], key=lambda piece: piece[0])])
        np.testing.assert_array_equal(joined, documents[doc].token_ids)


def test_heldout_split_is_a_seeded_fraction_of_each_stage(tmp_path):
    raw = hand_params(tmp_path).model_dump(mode="json")
    raw["eval"]["heldout_documents"] = 0.25
    splits = {}
    for seed in (0, 1):
        raw["seed"] = seed
        params = parse_params(raw)
        write_hand_stage(params, "stage1", hand_documents([30] * 12))
        write_hand_stage(params, "stage2", hand_documents([30] * 8))
        pack_stage(params, "stage1")
        pack_stage(params, "stage2")
        for stage in ("stage1", "stage2"):
            splits[seed, stage] = PackedShards(Path(params.data.packed_dir) / stage).index.heldout_split
    assert [len(splits[0, stage].document_ids) for stage in ("stage1", "stage2")] == [3, 2]
    assert splits[0, "stage1"].document_ids != splits[1, "stage1"].document_ids


def test_a_heldout_count_that_leaves_nothing_to_train_is_refused(tmp_path):
    raw = hand_params(tmp_path).model_dump(mode="json")
    raw["eval"]["heldout_documents"] = 3
    params = parse_params(raw)
    write_hand_stage(params, "stage1", hand_documents([10, 20, 30]))
    with pytest.raises(PackError) as error:
        pack_stage(params, "stage1")
    for expected in ("eval.heldout_documents", "3 documents", "stage1"):
        assert expected in str(error.value)


def test_video_document_longer_than_seq_len_is_refused(tmp_path):
    params = hand_params(tmp_path, seq_len=32)
    documents = hand_documents([20, 40])
    clip = VideoClip(
        doc_id="doc1", path="v.mp4", frame_indices=[0, 1, 2, 3], timestamps=[0, 1, 2, 3], fps=1.0,
        sampled_fps=1.0, height=32, width=32, token_offset=3, num_tokens=17,
    )
    documents = [
        TokenizedDocument(
            d.entry.model_copy(update={"video": clip.model_copy(update={"doc_id": d.entry.id})}),
            d.token_ids,
            d.trainable,
        )
        for d in documents
    ]
    write_hand_stage(params, "stage3", documents)
    with pytest.raises(PackError) as error:
        pack_stage(params, "stage3")
    message = str(error.value)
    for expected in ("'doc1'", "40 tokens", "seq_len = 32", "stages.stage3.video_frames"):
        assert expected in message
    assert not (Path(params.data.packed_dir) / "stage3").exists()


def test_failure_mid_pack_leaves_the_previous_output_intact(tmp_path, monkeypatch):
    params = hand_params(tmp_path)
    write_hand_stage(params, "stage1", hand_documents([60] * 10))
    packed = Path(params.data.packed_dir) / "stage1"
    pack_stage(params, "stage1", rows_per_shard=2)
    before = {p.relative_to(packed): p.read_bytes() for p in packed.rglob("*") if p.is_file()}

    write_hand_stage(params, "stage1", hand_documents([10] * 50, seed=3))
    written = []
    real_write_shard = pack._write_shard

    def write_then_fail(*args, **kwargs):
        if written:
            raise OSError("disk full")
        written.append(args[0])
        return real_write_shard(*args, **kwargs)

    monkeypatch.setattr(pack, "_write_shard", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        pack_stage(params, "stage1", rows_per_shard=2)
    assert written  # the failure came after a shard was written
    after = {p.relative_to(packed): p.read_bytes() for p in packed.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in packed.parent.iterdir()) == ["stage1"]


def test_packing_again_from_the_same_inputs_writes_nothing_and_a_changed_input_packs_again(tmp_path, capsys):
    """A training-only change (lr, the loss) leaves the rows; a damaged file, a packing parameter
    or other tokenized documents pack again."""
    params = hand_params(tmp_path)
    write_hand_stage(params, "stage1", hand_documents([60] * 10))
    packed = Path(params.data.packed_dir) / "stage1"

    def pack_with(**stage_changes) -> bool:
        """Packs; whether it wrote the stage anew (the atomic swap gives the directory a new inode)."""
        raw = params.model_dump(mode="json")
        for key, value in stage_changes.items():
            section, _, field = key.rpartition("__")
            (raw["stages"]["stage1"][section] if section else raw["stages"]["stage1"])[field] = value
        before = os.stat(packed).st_ino if packed.exists() else None
        pack_stage(parse_params(raw), "stage1", rows_per_shard=2)
        return os.stat(packed).st_ino != before

    assert pack_with()
    capsys.readouterr()
    assert not pack_with(train__lr=5e-4, train__warmup_steps=0, loss__z_loss=1e-4)
    assert "packed from these inputs already (inputs.json); left as it is" in capsys.readouterr().out
    shard = next((packed / "shards").glob("*/input_ids.npy"))
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 1]))
    assert pack_with()  # a damaged file
    PackedShards(packed)  # whole again
    assert pack_with(seq_len=128)
    assert pack_with(seq_len=128, train__max_steps=40)  # with a mixture, the tokens drawn depend on it
    write_hand_stage(params, "stage1", hand_documents([60] * 10, seed=1))
    assert pack_with(seq_len=128, train__max_steps=40)


def _packed_index(tmp_path) -> tuple[Path, dict]:
    """A small stage packed: its index file and what it holds, to be edited by the test."""
    params = hand_params(tmp_path)
    write_hand_stage(params, "stage1", hand_documents([10, 20]))
    pack_stage(params, "stage1")
    index_path = Path(params.data.packed_dir) / "stage1" / "index.json"
    return index_path, json.loads(index_path.read_text())


def test_unreadable_index_names_the_file(tmp_path):
    index_path, index = _packed_index(tmp_path)
    index["num_rows"] += 1
    index_path.write_text(json.dumps(index))
    with pytest.raises(PackedShardsError, match=str(index_path)):
        PackedShards(index_path.parent)
    with pytest.raises(PackedShardsError, match="not found"):
        PackedShards(tmp_path / "nowhere")


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last element's low bit: same size, same header, a different value
    path.write_bytes(bytes(data))


def test_a_corrupt_or_truncated_shard_file_is_refused_naming_it(tmp_path):
    params = hand_params(tmp_path)
    write_hand_stage(params, "stage1", hand_documents([60] * 4))  # 3 training rows: 3 shards
    pack_stage(params, "stage1", rows_per_shard=1)
    stage_dir = Path(params.data.packed_dir) / "stage1"
    PackedShards(stage_dir)  # verifies: intact

    labels = stage_dir / "shards" / "00001" / "labels.npy"
    _flip_a_byte(labels)
    with pytest.raises(PackedShardsError, match=rf"{labels}: CRC-32 [0-9a-f]{{8}}, expected [0-9a-f]{{8}}.*"
                                                 r"run `omnilong data pack`"):
        PackedShards(stage_dir)
    labels.write_bytes(labels.read_bytes()[:-4])
    with pytest.raises(PackedShardsError, match=rf"{labels}: \d+ bytes, expected \d+"):
        PackedShards(stage_dir)


def test_a_packed_index_without_checksums_is_refused(tmp_path):
    """An index of format 2 (before checksums): refused rather than read unchecked."""
    index_path, index = _packed_index(tmp_path)
    index["format_version"] = 2
    for shard in index["shards"]:
        del shard["files"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(PackedShardsError, match=rf"{index_path}: packed index format 2, this OmniLong reads "
                                                 r"format 3 .* run `omnilong data pack`"):
        PackedShards(index_path.parent)


def test_a_corrupt_tokenized_file_or_an_old_tokenized_index_is_refused_by_pack(tmp_path):
    params = hand_params(tmp_path)
    write_hand_stage(params, "stage1", hand_documents([10, 20, 30]))
    tokenized = Path(params.data.tokenized_dir) / "stage1"
    tokens = tokenized / "tokens.bin"
    _flip_a_byte(tokens)
    with pytest.raises(PrepareError, match=rf"{tokens}: CRC-32 .* run `omnilong data prepare` again"):
        pack_stage(params, "stage1")

    write_hand_stage(params, "stage1", hand_documents([10, 20, 30]))
    index_path = tokenized / "index.json"
    index = json.loads(index_path.read_text())
    index["format_version"] = 1
    del index["files"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(PrepareError, match=rf"{index_path}: tokenized index format 1, this OmniLong reads format 2"):
        pack_stage(params, "stage1")


# --- the real prepare output of a tiny synthesised corpus -------------------------------------------

FAMILIES = ["qwen2_5_vl", "llava_onevision"]


@pytest.fixture(params=FAMILIES)
def prepared(request, tiny_prepared):
    return tiny_prepared(request.param)


def raw_records(params: Params, root: Path, kind: str) -> list[dict]:
    corpus = root / params.data.raw_dir / "default"
    files = [corpus / "video" / "qa.jsonl"] if kind == "video" else sorted((corpus / kind).glob("*.jsonl"))
    return [json.loads(line) for path in files for line in path.read_text().splitlines() if line.strip()]


def reassembled(stage_dir: Path) -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
    """(input_ids, labels, piece starts) of each source document, in order, joined from its pieces
    in the training rows or the held-out ones."""
    documents = []
    by_doc = recovered_documents(*shard_sets(stage_dir))
    assert sorted(by_doc) == list(range(len(by_doc)))
    for doc in range(len(by_doc)):
        pieces = sorted(by_doc[doc], key=lambda piece: piece[0])
        starts = [start for start, _, _ in pieces]
        assert starts == list(np.cumsum([0] + [len(ids) for _, ids, _ in pieces[:-1]]))
        input_ids = np.concatenate([ids for _, ids, _ in pieces])
        labels = np.concatenate([piece_labels for _, _, piece_labels in pieces])
        documents.append((input_ids, labels, starts))
    return documents


def template_chat(record: dict, with_video: bool) -> list[dict]:
    """The record as the template takes it; the synthesised chats open with the user's turn."""
    chat = [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in record["messages"]
    ]
    if with_video:
        chat[0]["content"].insert(0, {"type": "video"})
    return chat


def test_text_stage_keeps_every_token_of_the_raw_corpus(prepared):
    params, root = prepared
    tokenizer = AutoTokenizer.from_pretrained(root / params.model.path)
    expected = [
        tokenizer.encode(record["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
        for record in raw_records(params, root, "text")
    ]
    stage_dir = root / params.data.packed_dir / "stage1"
    documents = reassembled(stage_dir)
    assert [ids.tolist() for ids, _, _ in documents] == expected
    # All text is trained on, except each piece's first token (no context precedes it).
    for ids, labels, starts in documents:
        expected_labels = ids.copy()
        expected_labels[starts] = IGNORE_INDEX
        np.testing.assert_array_equal(labels, expected_labels)
    assert any(len(starts) > 1 for _, _, starts in documents)

    datasets = [PackedShards(directory) for directory in shard_sets(stage_dir)]
    for dataset in datasets:
        stats = dataset.index.stats
        assert stats.real_tokens + stats.padding_tokens == len(dataset) * params.stages.stage1.seq_len
    assert sum(dataset.index.stats.real_tokens for dataset in datasets) == sum(map(len, expected))
    assert sum(dataset.index.stats.split_documents for dataset in datasets) == sum(
        len(ids) > params.stages.stage1.seq_len for ids in expected)


def test_instruct_stage_trains_only_on_answers(prepared):
    params, root = prepared
    tokenizer = AutoTokenizer.from_pretrained(root / params.model.path)
    records = raw_records(params, root, "instruct")
    documents = reassembled(root / params.data.packed_dir / "stage2")
    assert len(documents) == len(records)
    for record, (ids, labels, _) in zip(records, documents):
        rendered = tokenizer.apply_chat_template(template_chat(record, False), tokenize=False)
        assert tokenizer.decode(ids) == as_trained(rendered)
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        runs = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)
        answers = [m["content"] + tokenizer.eos_token for m in record["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(ids[run]) for run in runs] == answers
        np.testing.assert_array_equal(labels[trained], ids[trained])


def test_video_rows_hold_their_clips_and_per_document_positions(prepared):
    params, root = prepared
    family = params.model.family
    model_dir = root / params.model.path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model_config = AutoConfig.from_pretrained(model_dir)
    video_token_id = tokenizer.convert_tokens_to_ids(get_family(family).video_token)
    seq_len = params.stages.stage3.seq_len
    records = {record["id"]: record for record in raw_records(params, root, "video")}

    training, heldout = (PackedShards(directory) for directory in shard_sets(root / params.data.packed_dir / "stage3"))
    assert training.index.position_dims == heldout.index.position_dims == (3 if family == "qwen2_5_vl" else 1)
    seen = []
    for item in [*training, *heldout]:
        ids, positions = item["input_ids"], item["position_ids"]
        starts = np.cumsum([0] + item["doc_lens"].tolist())
        assert len(item["videos"]) == len(item["doc_lens"])
        for clip, start, end in zip(item["videos"], starts[:-1], starts[1:]):
            seen.append(clip.doc_id)
            run = slice(clip.token_offset, clip.token_offset + clip.num_tokens)
            assert start < run.start and run.stop < end
            assert (ids[start:end] == video_token_id).sum() == clip.num_tokens
            assert (ids[run] == video_token_id).all() and (item["labels"][run] == IGNORE_INDEX).all()
            # The document is the template's rendering as trained, with its placeholder expanded.
            collapsed = torch.cat([ids[start : run.start + 1], ids[run.stop : end]])
            chat = template_chat(records[clip.doc_id], True)
            assert tokenizer.decode(collapsed) == as_trained(tokenizer.apply_chat_template(chat, tokenize=False))

            frames = read_frames(root / clip.path, clip.frame_indices)
            assert len(frames) == params.stages.stage3.video_frames.num_frames
            inputs = preprocess_video(family, frames, model_config, params.model.video, fps=clip.sampled_fps)
            document_ids = ids[start:end]
            if family == "qwen2_5_vl":
                # The rule (checked by hand in tests/test_models_positions.py) on this document
                # alone, with the grid of the frames the loader decodes.
                assert clip.grid_thw == inputs["video_grid_thw"][0].tolist()
                expected = position_ids_for_document(
                    model_config, document_ids, inputs["video_grid_thw"], inputs["second_per_grid_ts"]
                )
                torch.testing.assert_close(positions[:, start:end], expected)
            else:
                torch.testing.assert_close(positions[start:end], torch.arange(end - start))
        padding = positions[..., starts[-1] :]
        torch.testing.assert_close(padding, torch.arange(seq_len - starts[-1]).expand_as(padding))
    assert sorted(seen) == sorted(records)
    assert any(len(item["videos"]) > 1 for item in training)

