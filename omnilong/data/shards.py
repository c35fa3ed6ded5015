"""Packed shards on disk: the `index.json` schema and a read-only dataset over the rows.

A packed shard set (written by `omnilong.data.pack`) holds

    index.json                  PackedIndex below
    shards/<NNNNN>/input_ids.npy    int32 [R, L]
    shards/<NNNNN>/labels.npy       int32 [R, L]      -100 where no loss is taken
    shards/<NNNNN>/position_ids.npy int32 [R, L] or [R, 3, L] (Qwen2.5-VL mRoPE rows)
    shards/<NNNNN>/doc_lens.npy     int32 [D]         lengths of the documents of all rows, row by row
    shards/<NNNNN>/doc_offsets.npy  int64 [R + 1]     row r's documents are doc_lens[off[r]:off[r+1]]
    shards/<NNNNN>/doc_index.npy    int32 [D]         which tokenized document each one comes from
    shards/<NNNNN>/doc_start.npy    int32 [D]         its first token's offset in that document

Documents sit at the start of a row, back to back; the row's tail beyond sum(doc_lens) is padding.
Arrays are memory-mapped. The index records each file's size and CRC-32 (omnilong/data/checksum.py);
opening a shard set reads every file once to verify them and refuses the first that differs.

A stage's packed directory is the shard set of its training rows at `seq_len`, with two kinds of
shard sets inside: `len<N>/`, its training rows at each shorter length of a context schedule, and
`heldout/`, the held-out documents at `seq_len` (see `pack.pack_stage`).
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omnilong.config import Family, StageName
from omnilong.data.checksum import FileChecksum, mismatch, older_format
from omnilong.data.schemas import CorpusKind

INDEX_FILE = "index.json"
SHARDS_DIR = "shards"
# 2: held-out documents split off before packing; 3: checksums of the shard files; 4: the stage-1 mixture.
FORMAT_VERSION = 4
READABLE_FORMATS = (3, 4)  # a format-3 index reads as one without a mixture, which it is
ROW_ARRAYS = ("input_ids", "labels", "position_ids")
DOC_ARRAYS = ("doc_lens", "doc_offsets", "doc_index", "doc_start")

NonNegativeInt = Annotated[int, Field(ge=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VideoClip(_Frozen):
    """A video shown to the model: which frames to decode at load time and the tokens standing for them.

    `token_offset` is where the run of `num_tokens` video placeholder tokens starts: within the
    document in the tokenized stage, within the row in a packed stage.
    """

    doc_id: str
    path: str
    """The video file, relative to the project root (absolute if it lies outside)."""
    frame_indices: list[NonNegativeInt]
    timestamps: list[float]
    """Seconds from the start of the video of each sampled frame."""
    fps: float
    """Frame rate of the video file."""
    sampled_fps: float
    """Frame rate the sampled frames play at (over the record's window, or the whole video): the
    `fps` to preprocess them with."""
    height: int
    width: int
    token_offset: NonNegativeInt
    num_tokens: Annotated[int, Field(gt=0)]
    grid_thw: list[int] | None = None
    """Qwen2.5-VL: (temporal, height, width) patch grid of the clip, as `video_grid_thw`."""
    second_per_grid_t: float | None = None
    """Qwen2.5-VL: seconds spanned by one temporal grid step, as `second_per_grid_ts`."""


class ShardEntry(_Frozen):
    name: str
    row_start: NonNegativeInt
    row_end: NonNegativeInt
    files: dict[str, FileChecksum]
    """Each array file of the shard (`input_ids.npy`, ...) by name."""


class HeldoutSplit(_Frozen):
    """The documents of a stage kept out of training (`eval.heldout_documents`), drawn before packing."""

    seed: int
    """`params.seed`, which drew them."""
    requested: int | float
    """`eval.heldout_documents` as set: a count, or a fraction of the stage's documents."""
    training_documents: NonNegativeInt
    heldout_documents: NonNegativeInt
    documents: list[NonNegativeInt]
    """The held-out documents' numbers in the tokenized stage (as `doc_index` in the shards), ascending."""
    document_ids: list[str]
    """Their ids, in the same order."""

    @model_validator(mode="after")
    def _consistent(self) -> HeldoutSplit:
        if not len(self.documents) == len(self.document_ids) == self.heldout_documents:
            raise ValueError(
                f"heldout_documents is {self.heldout_documents} but {len(self.documents)} documents "
                f"and {len(self.document_ids)} ids are listed"
            )
        return self


class PackStats(_Frozen):
    real_tokens: NonNegativeInt
    padding_tokens: NonNegativeInt
    trainable_tokens: NonNegativeInt
    """Tokens whose label is not -100."""
    documents: NonNegativeInt
    """Documents in the rows, counting each piece of a split document."""
    source_documents: NonNegativeInt
    """Documents of the tokenized stage, training and held-out ones together."""
    split_documents: NonNegativeInt
    """Source documents longer than seq_len, cut into pieces."""
    deferred_documents: NonNegativeInt = 0
    """Instruction chats longer than this shorter length of the context schedule, left to the
    longer lengths rather than cut (see `pack.cut_documents`)."""
    skipped_documents: NonNegativeInt
    """Records left out by prepare because a file they name cannot be read (listed, with the
    reason, under `skipped` in the tokenized stage's index.json)."""


class CorpusDraw(_Frozen):
    """What a mixture drew from one corpus for one shard set (omnilong/data/mixture.py)."""

    weight: float
    """The corpus's share of the tokens as set (`stages.<stage>.mixture`)."""
    share: float
    """Its share of the tokens drawn."""
    tokens: NonNegativeInt
    documents: NonNegativeInt
    """Documents drawn, a repeated one counted each time."""
    repeated_documents: NonNegativeInt
    """Draws of a document the stage had drawn before (at this or another length): the corpus ran out."""
    repeated_tokens: NonNegativeInt
    training_tokens: NonNegativeInt
    """Tokens of the corpus's training documents: what one pass through it holds."""
    training_documents: NonNegativeInt
    tokens_by_length: dict[str, NonNegativeInt]
    """Tokens drawn by the length of their whole document, in buckets (`mixture.LENGTH_BUCKETS`)."""
    long_tokens: NonNegativeInt | None = None
    """With long-document upsampling: tokens drawn from documents of at least its `min_tokens`."""
    training_long_tokens: NonNegativeInt | None = None
    """... and such tokens among the corpus's training documents: the share a plain draw would give."""


class MixtureDraw(_Frozen):
    """The documents a mixture drew for one shard set: target weights against what was drawn."""

    tokens_read: NonNegativeInt
    """Tokens the stage's steps read at this length (steps x tokens per step, padding included):
    the total the draw fills."""
    long_documents: dict[str, int | float] | None
    """`stages.<stage>.long_documents` as set."""
    corpora: dict[str, CorpusDraw]


class PackedIndex(_Frozen):
    format_version: Literal[3, 4] = FORMAT_VERSION
    stage: StageName
    kind: CorpusKind
    family: Family
    seq_len: Annotated[int, Field(gt=0)]
    pad_token_id: int
    position_dims: Literal[1, 3]
    num_rows: NonNegativeInt
    num_shards: NonNegativeInt
    rows_per_shard: Annotated[int, Field(gt=0)]
    shards: list[ShardEntry]
    stats: PackStats
    videos: list[list[VideoClip]] | None = None
    """Stage 3: the videos of each row, in row order."""
    heldout_split: HeldoutSplit | None = None
    """The stage's own index (its training rows at `seq_len`) only: which documents no training
    row of any length holds; they are in `heldout/`."""
    mixture: MixtureDraw | None = None
    """The training rows of a stage with a mixture: the documents drawn for them, corpus by corpus."""

    @model_validator(mode="after")
    def _consistent(self) -> PackedIndex:
        if self.num_shards != len(self.shards):
            raise ValueError(f"num_shards is {self.num_shards} but {len(self.shards)} shards are listed")
        expected_start = 0
        for shard in self.shards:
            if shard.row_start != expected_start or shard.row_end <= shard.row_start:
                raise ValueError(
                    f"shard {shard.name} covers rows [{shard.row_start}, {shard.row_end}); "
                    f"expected a non-empty range starting at {expected_start}"
                )
            expected_start = shard.row_end
        if expected_start != self.num_rows:
            raise ValueError(f"shards cover {expected_start} rows, num_rows is {self.num_rows}")
        if self.videos is not None and len(self.videos) != self.num_rows:
            raise ValueError(f"videos lists {len(self.videos)} rows, num_rows is {self.num_rows}")
        total = self.stats.real_tokens + self.stats.padding_tokens
        if total != self.num_rows * self.seq_len:
            raise ValueError(
                f"real + padding tokens ({total}) differ from num_rows x seq_len "
                f"({self.num_rows} x {self.seq_len})"
            )
        return self


class PackedShardsError(ValueError):
    """A packed stage directory that cannot be read; the message names the file."""


def read_index(stage_dir: Path) -> PackedIndex:
    path = Path(stage_dir) / INDEX_FILE
    if not path.is_file():
        raise PackedShardsError(f"{path}: not found; run `omnilong prepare` to pack this stage")
    text = path.read_text()
    if problem := older_format(path, text, READABLE_FORMATS, "packed", "run `omnilong data pack` to pack it again"):
        raise PackedShardsError(problem)
    try:
        return PackedIndex.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<index>'}: {e['msg']}" for e in exc.errors()
        )
        raise PackedShardsError(
            f"{path}: not a valid packed index ({problems}); run `omnilong data pack` to pack it again"
        ) from None


class PackedShards(torch.utils.data.Dataset):
    """Rows of a packed stage, as tensors.

    Item `i` is a dict: `input_ids` [L], `labels` [L] (unshifted, -100 where no loss is taken),
    `position_ids` [L] or [3, L], `doc_lens` [D] (its documents; the tail beyond their sum is
    padding) and, for a video stage, `videos`: the row's list of VideoClip.
    """

    def __init__(self, stage_dir: str | Path):
        self.stage_dir = Path(stage_dir)
        self.index = read_index(self.stage_dir)
        self._verify_files()
        self._row_starts = [shard.row_start for shard in self.index.shards]
        self._arrays: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.index.num_rows

    def _verify_files(self) -> None:
        for shard in self.index.shards:
            for name, expected in shard.files.items():
                if problem := mismatch(self.stage_dir / SHARDS_DIR / shard.name / name, expected):
                    raise PackedShardsError(
                        f"{problem} (recorded in {self.stage_dir / INDEX_FILE}); run `omnilong data pack` to pack it again"
                    )

    def _shard_arrays(self, shard_no: int) -> dict[str, np.ndarray]:
        if shard_no not in self._arrays:
            shard = self.index.shards[shard_no]
            shard_dir = self.stage_dir / SHARDS_DIR / shard.name
            arrays = {}
            for name in ROW_ARRAYS + DOC_ARRAYS:
                path = shard_dir / f"{name}.npy"
                try:
                    arrays[name] = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as exc:
                    raise PackedShardsError(f"{path}: cannot be read ({exc})") from None
            rows = shard.row_end - shard.row_start
            if arrays["input_ids"].shape != (rows, self.index.seq_len):
                raise PackedShardsError(
                    f"{shard_dir / 'input_ids.npy'}: shape {arrays['input_ids'].shape}, "
                    f"expected ({rows}, {self.index.seq_len}) from {self.stage_dir / INDEX_FILE}"
                )
            self._arrays[shard_no] = arrays
        return self._arrays[shard_no]

    def __getitem__(self, row: int) -> dict[str, Any]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows in {self.stage_dir}")
        shard_no = bisect.bisect_right(self._row_starts, row) - 1
        arrays = self._shard_arrays(shard_no)
        local = row - self._row_starts[shard_no]
        first_doc, end_doc = arrays["doc_offsets"][local : local + 2]
        item: dict[str, Any] = {
            name: torch.from_numpy(arrays[name][local].astype(np.int64)) for name in ROW_ARRAYS
        }
        item["doc_lens"] = torch.from_numpy(arrays["doc_lens"][first_doc:end_doc].astype(np.int64))
        if self.index.videos is not None:
            item["videos"] = self.index.videos[row]
        return item

