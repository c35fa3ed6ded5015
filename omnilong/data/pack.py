"""`omnilong prepare`, second half: tokenized documents -> fixed-length rows in packed shards.

Each row holds `seq_len` tokens: whole documents back to back, then padding. Per row:

- `input_ids` [L]; padding is the tokenizer's pad id.
- `labels` [L], UNSHIFTED: labels[i] = input_ids[i] where token i is trainable, else -100.
  Training shifts them (position i predicts labels[i + 1]) on the FULL sequence before it is
  sharded across sequence-parallel ranks, so no rank needs a neighbour's tokens to build its
  targets. The first token of every document is -100 too: nothing of its own document precedes
  it, and after the shift it would be predicted from the previous document's last token. This
  makes a row's loss the sum of its documents' losses computed one at a time. Padding is -100.
- `position_ids` [L] restarting at 0 for each document, or [3, L] for Qwen2.5-VL video rows
  (mRoPE computed on each document alone, as the model would see it unpacked). Padding gets
  positions restarting at 0 as well.
- document boundaries (`doc_lens`), and for a video stage the row's video manifest.

Packing is best-fit decreasing (longest piece first, into the fullest row it fits), which is
deterministic; rows are then put in an order shuffled with `params.seed`, so a reader going
through the shards in order sees long and short documents mixed. See `shards.py` for the layout.

Held-out documents (`eval.heldout_documents`) are drawn with `params.seed` before anything is
packed, and packed apart, into `heldout/` at the stage's `seq_len`: every length of a context
schedule is packed from the same documents and a long one is cut across rows, so no set of
packed rows could be held out without its documents reaching training through other rows.

With a mixture (`stages.<stage>.mixture`), each length is packed instead from the training
documents drawn for it (omnilong/data/mixture.py), and its index records the draw.

Packing again from the inputs the stage's `inputs.json` records writes nothing
(omnilong/data/pack_inputs.py).
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig

from omnilong import atomic
from omnilong.config import STAGE_KIND, EvalParams, FrameSampling, PackedSet, Params, StageName, StageParams
from omnilong.data.checksum import FileChecksum, file_checksum
from omnilong.data.mixture import MixtureError, draw_mixture
from omnilong.data.pack_inputs import INPUTS_FILE, pack_inputs, packed_from
from omnilong.data.prepare import TokenizedStage, load_tokenized, tokenized_dir
from omnilong.data.shards import (
    INDEX_FILE,
    SHARDS_DIR,
    HeldoutSplit,
    MixtureDraw,
    PackedIndex,
    PackStats,
    ShardEntry,
    VideoClip,
)
from omnilong.models.positions import position_ids_for_document

IGNORE_INDEX = -100
# Rows per shard default to about 16M tokens (64 MiB per int32 array): few files, cheap to memmap.
DEFAULT_TOKENS_PER_SHARD = 1 << 24


class PackError(ValueError):
    """Documents that cannot be packed with the stage's parameters; the message says what to change."""


class Piece(NamedTuple):
    """Tokens [start, start + length) of tokenized document `doc`."""

    doc: int
    start: int
    length: int


def split_heldout(tokenized: TokenizedStage, eval_params: EvalParams, seed: int, stage: StageName) -> HeldoutSplit:
    """Draw the stage's held-out documents, `eval.heldout_documents` of them, with `seed`."""
    num_documents = tokenized.index.num_documents
    count = eval_params.heldout_count(num_documents)
    if count >= num_documents:
        raise PackError(
            f"eval.heldout_documents = {eval_params.heldout_documents!r} holds out {count} of stage {stage}'s "
            f"{num_documents} documents, leaving none to train on; lower eval.heldout_documents or add "
            f"documents to stages.{stage}.corpora"
        )
    documents = np.sort(np.random.default_rng(seed).choice(num_documents, size=count, replace=False)).tolist()
    return HeldoutSplit(
        seed=seed,
        requested=eval_params.heldout_documents,
        training_documents=num_documents - count,
        heldout_documents=count,
        documents=documents,
        document_ids=[tokenized.index.documents[doc].id for doc in documents],
    )


def cut_documents(
    tokenized: TokenizedStage, documents: list[int], seq_len: int, stage: StageName, final_length: bool = True
) -> list[Piece]:
    """One piece per document of `documents` (numbers in `tokenized`); a text document longer than
    seq_len is cut into seq_len pieces.

    Each piece becomes a document of its own, positions restarting at 0: attention cannot reach
    the previous piece (it sits in another row), and restarting keeps every position below
    seq_len, the context this stage trains, instead of reaching ranges the model never attends
    over. A video document cannot be cut: its visual tokens belong together. At a shorter length
    of a context schedule (`final_length` False), an instruction chat longer than seq_len is
    left out rather than cut, which would part its answer from the context it is asked about:
    it is trained once the schedule reaches a length it fits.
    """
    kind = tokenized.index.kind
    doc_lengths = tokenized.doc_lengths
    pieces = []
    for doc in documents:
        length = int(doc_lengths[doc])
        if length > seq_len and kind == "video":
            entry = tokenized.index.documents[doc]
            raise PackError(
                f"video document {entry.id!r} (corpus {entry.corpus!r}) has {length} tokens, more than "
                f"stages.{stage}.seq_len = {seq_len}, and a video cannot be split; raise "
                f"stages.{stage}.seq_len or sample fewer frames (stages.{stage}.video_frames, or the "
                f"context_schedule entry's for this length)"
            )
        if length > seq_len and kind == "instruct" and not final_length:
            continue
        pieces += [Piece(doc, start, min(seq_len, length - start)) for start in range(0, length, seq_len)]
    if not pieces and not final_length:
        raise PackError(
            f"stages.{stage}.context_schedule: no {kind} document of stage {stage} fits in seq_len = {seq_len} "
            f"(the shortest has {int(doc_lengths[documents].min())} tokens); start the schedule at a longer length"
        )
    return pieces


def plan_rows(pieces: list[Piece], seq_len: int) -> list[list[Piece]]:
    """Best-fit decreasing: each piece, longest first, goes into the row with the least room that fits it."""
    rows: list[list[Piece]] = []
    free_sizes: list[int] = []  # sorted distinct free room of the open rows
    rows_by_free: dict[int, list[int]] = {}
    for piece in sorted(pieces, key=lambda p: (-p.length, p.doc, p.start)):
        at = bisect.bisect_left(free_sizes, piece.length)
        if at == len(free_sizes):
            row, free = len(rows), seq_len
            rows.append([])
        else:
            free = free_sizes[at]
            row = rows_by_free[free].pop()
            if not rows_by_free[free]:
                del rows_by_free[free]
                free_sizes.pop(at)
        rows[row].append(piece)
        free -= piece.length
        if free:
            if free not in rows_by_free:
                bisect.insort(free_sizes, free)
                rows_by_free[free] = []
            rows_by_free[free].append(row)
    return rows


def _document_positions(
    token_ids: np.ndarray, clip: VideoClip | None, mrope_config: PretrainedConfig | None
) -> np.ndarray:
    """Positions of one document alone: [n], or [3, n] mRoPE when `mrope_config` is given."""
    if mrope_config is None:
        return np.arange(len(token_ids))
    grid = None if clip is None else torch.tensor([clip.grid_thw])
    seconds = None if clip is None else torch.tensor([clip.second_per_grid_t])
    positions = position_ids_for_document(
        mrope_config,
        torch.from_numpy(token_ids.astype(np.int64)),
        video_grid_thw=grid,
        second_per_grid_ts=seconds,
    )
    return positions.numpy()


def _write_shard(
    shard_dir: Path,
    rows: list[list[Piece]],
    tokenized: TokenizedStage,
    seq_len: int,
    pad_token_id: int,
    mrope_config: PretrainedConfig | None,
) -> tuple[list[list[VideoClip]], int, dict[str, FileChecksum]]:
    """Fill and save one shard's arrays; returns its rows' video manifests, trainable token count
    and the checksum of each file written."""
    num_rows = len(rows)
    input_ids = np.full((num_rows, seq_len), pad_token_id, dtype=np.int32)
    labels = np.full((num_rows, seq_len), IGNORE_INDEX, dtype=np.int32)
    position_shape = (num_rows, seq_len) if mrope_config is None else (num_rows, 3, seq_len)
    position_ids = np.empty(position_shape, dtype=np.int32)
    doc_lens, doc_index, doc_start, doc_offsets = [], [], [], [0]
    videos: list[list[VideoClip]] = []
    for r, row in enumerate(rows):
        cursor = 0
        row_videos = []
        for piece in row:
            end = cursor + piece.length
            token_ids, trainable = tokenized.document(piece.doc)
            token_ids = token_ids[piece.start : piece.start + piece.length]
            trainable = trainable[piece.start : piece.start + piece.length].copy()
            trainable[0] = False  # no target without context: see the module docstring
            input_ids[r, cursor:end] = token_ids
            labels[r, cursor:end] = np.where(trainable, token_ids, IGNORE_INDEX)
            clip = tokenized.index.documents[piece.doc].video
            position_ids[r, ..., cursor:end] = _document_positions(token_ids, clip, mrope_config)
            if clip is not None:
                row_videos.append(clip.model_copy(update={"token_offset": cursor + clip.token_offset}))
            doc_lens.append(piece.length)
            doc_index.append(piece.doc)
            doc_start.append(piece.start)
            cursor = end
        position_ids[r, ..., cursor:] = np.arange(seq_len - cursor)
        doc_offsets.append(len(doc_lens))
        videos.append(row_videos)
    shard_dir.mkdir(parents=True)
    arrays = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "doc_lens": np.asarray(doc_lens, dtype=np.int32),
        "doc_offsets": np.asarray(doc_offsets, dtype=np.int64),
        "doc_index": np.asarray(doc_index, dtype=np.int32),
        "doc_start": np.asarray(doc_start, dtype=np.int32),
    }
    files = {}
    for name, array in arrays.items():
        np.save(shard_dir / f"{name}.npy", array)
        files[f"{name}.npy"] = file_checksum(shard_dir / f"{name}.npy")
    return videos, int(np.count_nonzero(labels != IGNORE_INDEX)), files


def scheduled_dir(stage_dir: Path, seq_len: int, video_frames: FrameSampling | None = None) -> Path:
    """Where the training rows of one scheduled length live inside a stage's packed directory:
    `len<N>/`, or `len<N>-<frame setting's name>/` for frames other than the stage's own."""
    return stage_dir / (f"len{seq_len}" + (f"-{video_frames.name}" if video_frames else ""))


def heldout_dir(stage_dir: Path) -> Path:
    """Where the rows of the held-out documents live inside a stage's packed directory."""
    return stage_dir / "heldout"


def packed_set_dirs(stage_dir: Path, stage_params: StageParams) -> dict[PackedSet, Path]:
    """The shard set of each (length, frame setting) the stage trains on: the stage's own in its
    directory, the others of its context schedule in `scheduled_dir`s."""
    own = stage_params.video_frames
    return {
        packed: stage_dir if i == 0 else scheduled_dir(stage_dir, packed.seq_len,
                                                       None if packed.video_frames == own else packed.video_frames)
        for i, packed in enumerate(stage_params.packed_sets)  # the stage's own first
    }


def pack_stage(
    params: Params, stage: StageName, root: Path = Path("."), rows_per_shard: int | None = None
) -> None:
    """Pack `tokenized_dir/<stage>/` into `packed_dir/<stage>/`, replacing it atomically.

    The documents are split first (`eval.heldout_documents`). Training rows of the stage's
    `seq_len` fill the directory itself, its index recording the split; each other length of its
    `context_schedule` is packed from the same training documents into `len<seq_len>/` (for a
    phase sampling other frames, from the documents prepared with them, into
    `len<seq_len>-<frames>/`); the held-out documents are packed into `heldout/` at `seq_len`,
    and no frame setting trains on them. With a mixture, each length holds the training
    documents drawn for it instead.
    """
    stage_params = params.stages[stage]
    frame_settings = stage_params.frame_settings or [None]
    stage_dir = root / params.data.packed_dir / stage
    inputs = pack_inputs(params, stage, [tokenized_dir(params, stage, frames, root) for frames in frame_settings],
                         rows_per_shard)
    if packed_from(stage_dir, inputs, [*packed_set_dirs(stage_dir, stage_params).values(), heldout_dir(stage_dir)]):
        tqdm.write(f"pack {stage}: {stage_dir} was packed from these inputs already ({INPUTS_FILE}); left as it is")
        return
    by_frames = {video_frames: _load_prepared(params, stage, video_frames, root) for video_frames in frame_settings}
    tokenized = by_frames[stage_params.video_frames]
    mrope_config = None
    if params.model.family == "qwen2_5_vl" and STAGE_KIND[stage] == "video":
        mrope_config = AutoConfig.from_pretrained(root / params.model.path, trust_remote_code=False)

    split = split_heldout(tokenized, params.eval, params.seed, stage)
    heldout = set(split.documents)
    training = [doc for doc in range(tokenized.index.num_documents) if doc not in heldout]
    # The same records prepared with other frames: their held-out documents are found by corpus and id.
    heldout_records = {(tokenized.index.documents[doc].corpus, tokenized.index.documents[doc].id) for doc in heldout}
    training_by_frames = {
        video_frames: training if other is tokenized else [
            doc for doc, entry in enumerate(other.index.documents) if (entry.corpus, entry.id) not in heldout_records
        ]
        for video_frames, other in by_frames.items()
    }

    draws = {}
    if stage_params.mixture is not None:
        dp_size = params.parallel.world_size // stage_params.sp_size
        try:
            draws = draw_mixture(tokenized, training, stage_params, dp_size, params.seed, stage)
        except MixtureError as exc:
            raise PackError(str(exc)) from None

    def pack(target: Path, packed: PackedSet, documents: list[int], heldout_split: HeldoutSplit | None = None,
             mixture: MixtureDraw | None = None) -> None:
        _pack_rows(target, by_frames[packed.video_frames], documents, stage, packed.seq_len,
                   packed.seq_len == stage_params.seq_len, params.seed, mrope_config,
                   rows_per_shard or max(1, DEFAULT_TOKENS_PER_SHARD // packed.seq_len), heldout_split, mixture)

    with atomic.atomic_dir(stage_dir) as staging:
        for packed, target in packed_set_dirs(staging, stage_params).items():
            documents, mixture = draws.get(packed.seq_len, (training_by_frames[packed.video_frames], None))
            pack(target, packed, documents, split if target == staging else None, mixture)
        pack(heldout_dir(staging), stage_params.packed_sets[0], split.documents)
        atomic.write_text(staging / INPUTS_FILE, json.dumps(inputs, indent=1, sort_keys=True))


def _load_prepared(params: Params, stage: StageName, video_frames: FrameSampling | None, root: Path) -> TokenizedStage:
    directory = tokenized_dir(params, stage, video_frames, root)
    tokenized = load_tokenized(directory)
    if tokenized.index.family != params.model.family:
        raise PackError(
            f"{directory / INDEX_FILE}: tokenized for family {tokenized.index.family!r} but "
            f"model.family is {params.model.family!r}; run `omnilong prepare` again"
        )
    return tokenized


def _pack_rows(
    target: Path, tokenized: TokenizedStage, documents: list[int], stage: StageName, seq_len: int,
    final_length: bool, seed: int, mrope_config, rows_per_shard: int, heldout_split: HeldoutSplit | None,
    mixture: MixtureDraw | None,
) -> None:
    pieces = cut_documents(tokenized, documents, seq_len, stage, final_length)
    planned = plan_rows(pieces, seq_len)
    order = np.random.default_rng(seed).permutation(len(planned))
    rows = [planned[i] for i in order]

    shards, videos, trainable_tokens = [], [], 0
    for shard_no, row_start in enumerate(
        tqdm(range(0, len(rows), rows_per_shard), desc=f"pack {stage} ({seq_len} tokens)", unit="shard")
    ):
        shard_rows = rows[row_start : row_start + rows_per_shard]
        name = f"{shard_no:05d}"
        shard_videos, shard_trainable, shard_files = _write_shard(
            target / SHARDS_DIR / name,
            shard_rows,
            tokenized,
            seq_len,
            tokenized.index.pad_token_id,
            mrope_config,
        )
        shards.append(ShardEntry(name=name, row_start=row_start, row_end=row_start + len(shard_rows),
                                 files=shard_files))
        videos += shard_videos
        trainable_tokens += shard_trainable
    real_tokens = sum(piece.length for piece in pieces)
    packed_docs = {piece.doc for piece in pieces}
    deferred = [doc for doc in documents if doc not in packed_docs]
    # Zero token loss: every token of the documents lands in exactly one row, or its chat waits for a longer length.
    deferred_tokens = int(tokenized.doc_lengths[deferred].sum()) if deferred else 0
    document_tokens = int(tokenized.doc_lengths[documents].sum())
    assert real_tokens + deferred_tokens == document_tokens, (real_tokens, deferred_tokens, document_tokens)
    index = PackedIndex(
        stage=stage,
        kind=tokenized.index.kind,
        family=tokenized.index.family,
        seq_len=seq_len,
        pad_token_id=tokenized.index.pad_token_id,
        position_dims=1 if mrope_config is None else 3,
        num_rows=len(rows),
        num_shards=len(shards),
        rows_per_shard=rows_per_shard,
        shards=shards,
        stats=PackStats(
            real_tokens=real_tokens,
            padding_tokens=len(rows) * seq_len - real_tokens,
            trainable_tokens=trainable_tokens,
            documents=len(pieces),
            source_documents=tokenized.index.num_documents,
            split_documents=int(np.count_nonzero(tokenized.doc_lengths[documents] > seq_len)) - len(deferred),
            deferred_documents=len(deferred),
            skipped_documents=len(tokenized.index.skipped),
        ),
        videos=videos if tokenized.index.kind == "video" else None,
        heldout_split=heldout_split,
        mixture=mixture,
    )
    atomic.write_text(target / INDEX_FILE, index.model_dump_json(indent=1))
