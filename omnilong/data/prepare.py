"""`omnilong prepare`, first half: corpora -> token ids + a trainable mask per document.

Each stage reads the records of its kind (`STAGE_KIND`) from the corpora it lists and tokenises
them with the model's own tokenizer:

- text: the text, then eos; every token trainable.
- instruct: the conversation rendered by the tokenizer's chat template; only what the template
  renders for assistant turns (the answer and its end-of-turn token) is trainable.
- video: like instruct, with the video shown before the first user turn's text; the template's
  single video placeholder token is expanded to as many copies as the model has video tokens for
  the sampled frames (`stages.<stage>.video_frames`, within the record's start/end window),
  computed from the video's metadata (no frame is decoded here). A record with an .srt gets the
  subtitles shown at the sampled frames' times, in time order, at the start of that text.
  A record whose video or .srt cannot be read is skipped, with a warning on stderr, and listed
  in the index's `skipped`; a stage of which every record is skipped is an error. A context
  schedule whose phases sample other frames (`context_schedule[i].video_frames`) prepares the
  stage once for each setting: `tokenized_dir/<stage>-<setting's name>/` beside the stage's own.

`tokenized_dir/<stage>/` holds, written atomically:

    tokens.bin      int32 (little-endian), all documents back to back
    trainable.bin   uint8 [same length], 1 where the token is a training target
    offsets.npy     int64 [N + 1], document i is tokens[offsets[i]:offsets[i+1]]
    index.json      TokenizedIndex: per document its id, corpus and, for video, its VideoClip;
                    the skipped records with the file and the reason; each file's size and
                    CRC-32, verified when `pack` opens the stage (omnilong/data/checksum.py)

The files are written as documents stream by (the index's per-document entries through a scratch
file), so memory stays flat whatever the number of documents; it follows the longest one.

Text and instruct records are encoded in batches of consecutive records of one file, each batch
in one call of the tokenizers library, by `data.prepare_workers` processes holding the tokenizer's
backend (omnilong/data/token_encoding.py, through omnilong/data/ordered_pool.py); this process
reads the records, renders the chat templates and writes the files. Batches come back in order,
so the files are byte-identical for any number of workers. Video records are prepared here, one
by one.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig

from omnilong import atomic
from omnilong.config import (
    STAGE_KIND,
    STAGE_NAMES,
    CorpusFields,
    Family,
    FrameSampling,
    Params,
    StageName,
    VideoTokenParams,
    corpus_path,
)
from omnilong.data.checksum import FileChecksum, file_checksum, mismatch, older_format
from omnilong.data.ordered_pool import OrderedPool
from omnilong.data.schemas import (
    CorpusKind,
    InstructRecord,
    Message,
    TextRecord,
    VideoRecord,
    corpus_files,
    corpus_layout,
    iter_records,
)
from omnilong.data.shards import VideoClip
from omnilong.data.subtitles import (
    SubtitleError,
    parse_srt,
    subtitle_text,
    subtitles_at,
)
from omnilong.data.token_encoding import (
    TOKEN_DTYPE,
    backend_json,
    encode_texts,
    load_backend,
)
from omnilong.data.video_frames import (
    FrameSample,
    VideoInfo,
    VideoReadError,
    sample_frames,
    video_info,
)
from omnilong.models.families import get_family
from omnilong.models.loading import load_tokenizer
from omnilong.models.video_inputs import (
    num_video_tokens,
    seconds_per_grid,
    video_grid_thw,
)

TOKENS_FILE = "tokens.bin"
TRAINABLE_FILE = "trainable.bin"
OFFSETS_FILE = "offsets.npy"
INDEX_FILE = "index.json"
FORMAT_VERSION = 2  # 2: the files' checksums
# Stands in for an answer to find where a template puts it; no template or answer contains it.
_SENTINEL = "\x00omnilong-answer\x00"
# How VideoMME's prompt introduces the subtitles in its with-subtitles setting.
SUBTITLES_INTRO = "This video's subtitles are listed below:\n"
# Records tokenised in one call and sent to a worker as one task: enough that the per-call and
# per-task costs vanish, few enough characters that a worker holds a few MiB at a time.
BATCH_RECORDS = 256
BATCH_CHARS = 1 << 20


class PrepareError(ValueError):
    """A corpus or tokenizer that cannot be prepared; the message names the file or document."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DocumentEntry(_Frozen):
    id: str
    corpus: str
    video: VideoClip | None = None


class SkippedDocument(_Frozen):
    """A record left out because a file it names cannot be read."""

    id: str
    corpus: str
    file: str
    """The unreadable video or subtitle file, relative to the project root (absolute if outside)."""
    reason: str


class TokenizedIndex(_Frozen):
    format_version: Literal[2] = FORMAT_VERSION
    stage: StageName
    kind: CorpusKind
    family: Family
    pad_token_id: int
    num_documents: Annotated[int, Field(ge=0)]
    num_tokens: Annotated[int, Field(ge=0)]
    trainable_tokens: Annotated[int, Field(ge=0)]
    documents: list[DocumentEntry]
    skipped: list[SkippedDocument]
    """Records left out because a file they name cannot be read."""
    files: dict[str, FileChecksum]
    """`tokens.bin`, `trainable.bin` and `offsets.npy` by name."""


@dataclass(frozen=True)
class TokenizedDocument:
    entry: DocumentEntry
    token_ids: np.ndarray  # int32 [n]
    trainable: np.ndarray  # bool [n]


@dataclass(frozen=True)
class TokenizedStage:
    """A prepared stage, memory-mapped: what `pack` reads."""

    index: TokenizedIndex
    tokens: np.ndarray  # int32 [T]
    trainable: np.ndarray  # uint8 [T]
    offsets: np.ndarray  # int64 [N + 1]

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.tokens[start:end], self.trainable[start:end].astype(bool)


@dataclass(frozen=True)
class PreparedStage:
    """What `write_tokenized` wrote: the index's totals, without its per-document list, which
    goes to `index.json` as documents stream by (held in memory, it would grow with the corpus)."""

    num_documents: int
    num_tokens: int
    trainable_tokens: int
    skipped: list[SkippedDocument]


def write_tokenized(
    stage_dir: Path,
    stage: StageName,
    family: Family,
    pad_token_id: int,
    documents: Iterable[TokenizedDocument | SkippedDocument],
) -> PreparedStage:
    """Stream documents into `stage_dir`, replacing it atomically once all are written; skipped
    ones are listed in the index. Memory stays flat in the number of documents: their index
    entries and offsets go to scratch files, spliced into `index.json` and `offsets.npy` at the end."""
    skipped: list[SkippedDocument] = []
    num_documents = num_tokens = trainable_tokens = 0
    with atomic.atomic_dir(stage_dir) as staging:
        with (open(staging / TOKENS_FILE, "wb") as tokens, open(staging / TRAINABLE_FILE, "wb") as masks,
              tempfile.TemporaryFile(dir=staging) as entries, tempfile.TemporaryFile(dir=staging) as offsets):
            offsets.write(np.int64(0).tobytes())
            for doc in documents:
                if isinstance(doc, SkippedDocument):
                    skipped.append(doc)
                    continue
                if len(doc.token_ids) != len(doc.trainable) or len(doc.token_ids) == 0:
                    raise PrepareError(
                        f"document {doc.entry.id!r} of corpus {doc.entry.corpus!r}: "
                        f"{len(doc.token_ids)} tokens and {len(doc.trainable)} mask entries"
                    )
                tokens.write(np.asarray(doc.token_ids, dtype=TOKEN_DTYPE).tobytes())
                masks.write(np.asarray(doc.trainable, dtype=np.uint8).tobytes())
                entries.write(b"," * (num_documents > 0) + doc.entry.model_dump_json().encode())
                num_documents += 1
                num_tokens += len(doc.token_ids)
                offsets.write(np.int64(num_tokens).tobytes())
                trainable_tokens += int(np.count_nonzero(doc.trainable))
            for handle in (tokens, masks):
                handle.flush()
                os.fsync(handle.fileno())
            if not num_documents:
                unreadable = f" ({len(skipped)} skipped: their files cannot be read)" if skipped else ""
                raise PrepareError(
                    f"stages.{stage}.corpora: no usable {STAGE_KIND[stage]} record in any of them{unreadable}"
                )
            _splice(staging / OFFSETS_FILE, _npy_header((num_documents + 1,), np.dtype(np.int64)), offsets)
            index = TokenizedIndex(
                stage=stage,
                kind=STAGE_KIND[stage],
                family=family,
                pad_token_id=pad_token_id,
                num_documents=num_documents,
                num_tokens=num_tokens,
                trainable_tokens=trainable_tokens,
                documents=[],
                skipped=skipped,
                files={name: file_checksum(staging / name) for name in (TOKENS_FILE, TRAINABLE_FILE, OFFSETS_FILE)},
            )
            # The index as `model_dump_json` writes it, its (empty) document list filled from the scratch file.
            head, empty_list, tail = index.model_dump_json().partition('"documents":[]')
            assert empty_list, "TokenizedIndex dumps its documents as a JSON list"
            _splice(staging / INDEX_FILE, f'{head}"documents":['.encode(), entries, f"]{tail}".encode())
    return PreparedStage(num_documents, num_tokens, trainable_tokens, skipped)


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The header `np.save` writes for an array of `shape` and `dtype`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return header.getvalue()


def _splice(path: Path, head: bytes, scratch: BinaryIO, tail: bytes = b"") -> None:
    """Write `path`: `head`, the scratch file's bytes (copied 64 KiB at a time), `tail`; synced."""
    scratch.flush()
    scratch.seek(0)
    with open(path, "wb") as out:
        out.write(head)
        shutil.copyfileobj(scratch, out)
        out.write(tail)
        out.flush()
        os.fsync(out.fileno())


def load_tokenized(stage_dir: Path) -> TokenizedStage:
    stage_dir = Path(stage_dir)
    index_path = stage_dir / INDEX_FILE
    if not index_path.is_file():
        raise PrepareError(f"{index_path}: not found; run `omnilong data prepare` first")
    text = index_path.read_text()
    if problem := older_format(index_path, text, FORMAT_VERSION, "tokenized", "run `omnilong data prepare` again"):
        raise PrepareError(problem)
    try:
        index = TokenizedIndex.model_validate_json(text)
    except ValidationError as exc:
        raise PrepareError(f"{index_path}: not a valid tokenized index ({exc.errors()[0]['msg']})") from None
    for name, expected in index.files.items():
        if problem := mismatch(stage_dir / name, expected):
            raise PrepareError(f"{problem} (recorded in {index_path}); run `omnilong data prepare` again")
    offsets = np.load(stage_dir / OFFSETS_FILE)
    if offsets.shape != (index.num_documents + 1,) or offsets[-1] != index.num_tokens:
        raise PrepareError(
            f"{stage_dir / OFFSETS_FILE}: shape {offsets.shape} ending at {offsets[-1]}, expected "
            f"({index.num_documents + 1},) ending at {index.num_tokens} from {index_path}"
        )
    arrays = {}
    for name, dtype in ((TOKENS_FILE, TOKEN_DTYPE), (TRAINABLE_FILE, np.dtype(np.uint8))):
        path = stage_dir / name
        size = path.stat().st_size if path.is_file() else None
        if size != index.num_tokens * dtype.itemsize:
            raise PrepareError(f"{path}: {size} bytes, expected {index.num_tokens} tokens of {dtype}")
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=(index.num_tokens,))
    return TokenizedStage(index, arrays[TOKENS_FILE], arrays[TRAINABLE_FILE], offsets)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def text_document(tokenizer: Any, record: TextRecord) -> tuple[list[int], list[bool]]:
    """One text document, encoded alone: the plain reference of the batched path (`tokenize_batch`)."""
    if tokenizer.eos_token_id is None:
        raise PrepareError("the tokenizer has no eos token; text documents need one to end")
    token_ids = _encode(tokenizer, record.text) + [tokenizer.eos_token_id]
    return token_ids, [True] * len(token_ids)


def template_messages(messages: list[Message], with_video: bool) -> list[dict[str, Any]]:
    """Messages as multimodal chat templates take them: content as a list of typed parts."""
    rendered = []
    first_user = next(i for i, m in enumerate(messages) if m.role == "user")
    for i, message in enumerate(messages):
        parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
        if with_video and i == first_user:
            parts.insert(0, {"type": "video"})
        rendered.append({"role": message.role, "content": parts})
    return rendered


def chat_segments(tokenizer: Any, messages: list[Message], with_video: bool) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trainable) segments.

    Templates of real models (Qwen, LLaVA) have no `{% generation %}` markers, so each assistant
    turn is found by rendering growing prefixes: what `messages[:i+1]` adds to `messages[:i]` is
    turn i. From the answer's first character through the end-of-turn token is trained. The
    answer's start is measured on the same turn rendered with a sentinel answer, so an answer
    that also occurs in the header ("a" in "assistant") is not mistaken for it.

    The masked header before each answer is the template's generation prompt, not the header the
    template writes for an assistant turn of a conversation: the model is trained on the prompt
    `generate` gives it. The two differ in LLaVA-OneVision's published template (`assistant\n`
    as generation prompt, as in its original training; `assistant \n` in a conversation).
    Whitespace after the end-of-turn token is not trained either: the model stops at that token.
    """
    chat = template_messages(messages, with_video)

    def render(prefix: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = render(chat[:i])
        prompt = render(chat[:i], generation_prompt=True)
        with_answer = render(chat[: i + 1])
        sentinel_turn = {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}
        with_sentinel = render(chat[:i] + [sentinel_turn])
        prefixes = ((before, rendered), (prompt, before), (with_answer, before), (with_sentinel, before))
        if not all(text.startswith(prefix) for text, prefix in prefixes):
            raise PrepareError(
                f"the chat template does not render conversations prefix by prefix (at message {i}); "
                f"assistant turns cannot be located in it"
            )
        turn = with_answer[len(before) :]
        answer_start = with_sentinel.find(_SENTINEL, len(before)) - len(before)
        if answer_start < 0 or not turn[answer_start:].startswith(message.content):
            raise PrepareError(
                f"the chat template did not render the text of message {i} ({message.role}) verbatim in "
                f"its turn; it must accept content given as a list of {{'type': 'text', 'text': ...}} parts"
            )
        trained_end = len(turn.rstrip())
        segments += [
            (prompt[len(rendered) :], False),
            (turn[answer_start:trained_end], True),
            (turn[trained_end:], False),
        ]
        rendered = with_answer
    return [(text, trainable) for text, trainable in segments if text]


def chat_document(
    tokenizer: Any, messages: list[Message], with_video: bool
) -> tuple[list[int], list[bool]]:
    token_ids: list[int] = []
    trainable: list[bool] = []
    for text, is_trained in chat_segments(tokenizer, messages, with_video):
        segment = _encode(tokenizer, text)
        token_ids += segment
        trainable += [is_trained] * len(segment)
    return token_ids, trainable


@dataclass(frozen=True)
class VideoContext:
    """What turning a video record into tokens needs beyond the tokenizer (the probe's synthetic
    video rows use it too: omnilong/train/synthetic_rows.py)."""

    family: Family
    model_config: PretrainedConfig
    video: VideoTokenParams
    video_frames: FrameSampling
    video_token_id: int
    root: Path


def _project_relative(path: Path, root: Path) -> str:
    resolved, project = path.resolve(), root.resolve()
    return str(resolved.relative_to(project) if resolved.is_relative_to(project) else resolved)


def video_clip(
    context: VideoContext, doc_id: str, video_path: Path, info: VideoInfo, sample: FrameSample, token_offset: int
) -> VideoClip:
    num_frames = len(sample.indices)
    num_tokens = num_video_tokens(
        context.family, context.model_config, context.video, num_frames, info.height, info.width
    )
    grid_thw = second_per_grid_t = None
    if context.family == "qwen2_5_vl":
        grid_thw = list(video_grid_thw(context.model_config, context.video, num_frames, info.height, info.width))
        second_per_grid_t = seconds_per_grid(context.model_config, sample.sampled_fps)
    return VideoClip(
        doc_id=doc_id,
        path=_project_relative(video_path, context.root),
        frame_indices=sample.indices,
        timestamps=sample.timestamps,
        fps=info.fps,
        sampled_fps=sample.sampled_fps,
        height=info.height,
        width=info.width,
        token_offset=token_offset,
        num_tokens=num_tokens,
        grid_thw=grid_thw,
        second_per_grid_t=second_per_grid_t,
    )


def _with_subtitles(messages: list[Message], subtitles_path: Path, timestamps: list[float]) -> list[Message]:
    """The chat with the subtitles shown at `timestamps` leading the first user turn's text."""
    if not subtitles_path.is_file():
        raise SubtitleError(f"{subtitles_path}: no such subtitle file")
    shown = subtitles_at(parse_srt(subtitles_path), timestamps)
    if not shown:  # none is on screen at a sampled frame: nothing to list
        return messages
    first_user = next(i for i, m in enumerate(messages) if m.role == "user")
    user = messages[first_user]
    intro = f"{SUBTITLES_INTRO}{subtitle_text(shown)}\n"
    with_intro = user.model_copy(update={"content": intro + user.content})
    return [*messages[:first_user], with_intro, *messages[first_user + 1 :]]


def video_document(
    tokenizer: Any, record: VideoRecord, video_dir: Path, context: VideoContext
) -> tuple[np.ndarray, np.ndarray, VideoClip]:
    """The chat (with its subtitles, if any) with its one video placeholder expanded to the clip's
    token count. Raises VideoReadError or SubtitleError when a file the record names is unreadable."""
    video_path = video_dir / record.video
    info = video_info(video_path)
    try:
        sample = sample_frames(info, context.video_frames, record.start_s, record.end_s)
    except ValueError as exc:  # the record's window does not fit its video: the record is wrong
        raise PrepareError(f"{video_path}: {exc}") from None
    messages = record.messages
    if record.subtitles is not None:
        messages = _with_subtitles(messages, video_dir / record.subtitles, sample.timestamps)
    token_ids, trainable = chat_document(tokenizer, messages, with_video=True)
    placeholders = [i for i, token in enumerate(token_ids) if token == context.video_token_id]
    if len(placeholders) != 1:
        raise PrepareError(
            f"video document {record.id!r}: expected one video placeholder token in the rendered chat, "
            f"found {len(placeholders)} (does a message's or subtitle's text contain the placeholder itself?)"
        )
    at = placeholders[0]
    clip = video_clip(context, record.id, video_path, info, sample, token_offset=at)
    ids, mask = np.asarray(token_ids, dtype=TOKEN_DTYPE), np.asarray(trainable, dtype=bool)
    video_ids = np.full(clip.num_tokens, context.video_token_id, dtype=TOKEN_DTYPE)
    ids = np.concatenate([ids[:at], video_ids, ids[at + 1 :]])
    mask = np.concatenate([mask[:at], np.zeros(clip.num_tokens, dtype=bool), mask[at + 1 :]])
    return ids, mask, clip


def _skipped(
    path: Path, record: VideoRecord, corpus: str, video_dir: Path, exc: VideoReadError | SubtitleError, root: Path
) -> SkippedDocument:
    """The record of an unreadable file, announced on stderr: a dataset never loses one silently."""
    unreadable = video_dir / (record.video if isinstance(exc, VideoReadError) else record.subtitles)
    tqdm.write(f"warning: {path}: record {record.id!r} skipped: {exc}", file=sys.stderr)
    return SkippedDocument(id=record.id, corpus=corpus, file=_project_relative(unreadable, root), reason=str(exc))


@dataclass(frozen=True)
class RecordBatch:
    """Consecutive text or instruct records of one file, encoded together."""

    path: Path
    corpus: str
    records: list[TextRecord | InstructRecord]


def record_batches(
    path: Path, kind: CorpusKind, corpus: str, fields: CorpusFields | None = None
) -> Iterator[RecordBatch]:
    """The records of `path` (read through the corpus's field mapping, if any) in batches of
    BATCH_RECORDS, or fewer that reach BATCH_CHARS."""
    records: list[TextRecord | InstructRecord] = []
    chars = 0
    for record in iter_records(path, kind, fields):
        records.append(record)
        chars += len(record.text) if isinstance(record, TextRecord) else sum(len(m.content) for m in record.messages)
        if len(records) == BATCH_RECORDS or chars >= BATCH_CHARS:
            yield RecordBatch(path, corpus, records)
            records, chars = [], 0
    if records:
        yield RecordBatch(path, corpus, records)


# What a batch's texts to encode are cut from: None for text records (one text each), the
# (text, trainable) segments of each chat for instruct records.
_Chats = list[list[tuple[str, bool]]] | None


def encoding_task(tokenizer: Any, batch: RecordBatch) -> tuple[tuple[RecordBatch, _Chats], list[str]]:
    """The batch with its chats' segments (templates are rendered here, in this process), and the
    texts a worker encodes for it."""
    if isinstance(batch.records[0], TextRecord):
        return (batch, None), [record.text for record in batch.records]
    chats = []
    for record in batch.records:
        try:
            chats.append(chat_segments(tokenizer, record.messages, with_video=False))
        except PrepareError as exc:
            raise PrepareError(f"{batch.path}: record {record.id!r}: {exc}") from None
    return (batch, chats), [text for segments in chats for text, _ in segments]


def batch_documents(batch: RecordBatch, chats: _Chats, encoded: list[np.ndarray], eos: int | None):
    """The batch's documents from the encoded texts of its `encoding_task`."""
    if chats is None:
        if eos is None:
            raise PrepareError(
                f"{batch.path}: record {batch.records[0].id!r}: the tokenizer has no eos token; text documents need one"
            )
        for record, token_ids in zip(batch.records, encoded, strict=True):
            token_ids = np.append(token_ids, np.asarray(eos, TOKEN_DTYPE))
            yield TokenizedDocument(DocumentEntry(id=record.id, corpus=batch.corpus), token_ids,
                                    np.ones(len(token_ids), dtype=bool))
        return
    segment_ids = iter(encoded)
    for record, segments in zip(batch.records, chats, strict=True):
        pieces = [(next(segment_ids), is_trained) for _, is_trained in segments]
        yield TokenizedDocument(
            DocumentEntry(id=record.id, corpus=batch.corpus),
            np.concatenate([ids for ids, _ in pieces] or [np.zeros(0, TOKEN_DTYPE)]),
            np.concatenate([np.full(len(ids), is_trained) for ids, is_trained in pieces] or [np.zeros(0, bool)]),
        )


def _stage_files(params: Params, stage: StageName, root: Path) -> Iterator[tuple[str, Path, Path]]:
    """(corpus, its directory, file) of each record file of the stage, in order."""
    kind = STAGE_KIND[stage]
    for corpus in params.stages[stage].corpora:
        corpus_dir = corpus_path(root / params.data.raw_dir, corpus)
        files = corpus_files(corpus_dir, kind)
        if not files:
            raise PrepareError(f"stages.{stage}.corpora: corpus {corpus!r} holds no {kind} records "
                               f"(expected {corpus_layout(corpus_dir, kind)})")
        for path in files:
            yield corpus, corpus_dir, path


def _video_documents(
    params: Params, stage: StageName, video_frames: FrameSampling, tokenizer: Any, model_config: PretrainedConfig,
    root: Path,
) -> Iterator[TokenizedDocument | SkippedDocument]:
    """A video stage's documents with `video_frames`' frames, in this process: each reads its
    video's metadata and expands its placeholder; few enough that encoding them one by one costs little."""
    context = VideoContext(
        family=params.model.family,
        model_config=model_config,
        video=params.model.video,
        video_frames=video_frames,
        video_token_id=tokenizer.convert_tokens_to_ids(get_family(params.model.family).video_token),
        root=root,
    )
    for corpus, corpus_dir, path in _stage_files(params, stage, root):
        for record in iter_records(path, "video", params.data.fields.get(corpus)):
            try:
                token_ids, trainable, clip = video_document(tokenizer, record, corpus_dir / "video", context)
            except PrepareError as exc:
                raise PrepareError(f"{path}: record {record.id!r}: {exc}") from None
            except (VideoReadError, SubtitleError) as exc:
                yield _skipped(path, record, corpus, corpus_dir / "video", exc, root)
                continue
            yield TokenizedDocument(
                DocumentEntry(id=record.id, corpus=corpus, video=clip),
                np.asarray(token_ids, dtype=TOKEN_DTYPE),
                np.asarray(trainable, dtype=bool),
            )


def _stage_documents(
    params: Params, stage: StageName, pool: EncodingPool, model_config: PretrainedConfig | None, root: Path,
    video_frames: FrameSampling | None,
) -> Iterator[TokenizedDocument | SkippedDocument]:
    """The stage's documents in corpus, file and record order."""
    tokenizer = pool.tokenizer
    if STAGE_KIND[stage] == "video":
        assert model_config is not None and video_frames is not None, "a video stage needs the model's config"
        yield from _video_documents(params, stage, video_frames, tokenizer, model_config, root)
        return
    tasks = (
        encoding_task(tokenizer, batch)
        for corpus, _, path in _stage_files(params, stage, root)
        for batch in record_batches(path, STAGE_KIND[stage], corpus, params.data.fields.get(corpus))
    )
    for (batch, chats), encoded in pool.workers.map(encode_texts, tasks):
        yield from batch_documents(batch, chats, encoded, tokenizer.eos_token_id)


def _token_progress(
    documents: Iterator[TokenizedDocument | SkippedDocument], desc: str
) -> Iterator[TokenizedDocument | SkippedDocument]:
    """`documents`, counted on a progress bar in tokens (and tokens/s)."""
    with tqdm(desc=desc, unit="tok", unit_scale=True) as progress:
        for doc in documents:
            if isinstance(doc, TokenizedDocument):
                progress.update(len(doc.token_ids))
            yield doc


@dataclass(frozen=True)
class EncodingPool:
    """The model's tokenizer, and `data.prepare_workers` workers encoding with its backend."""

    tokenizer: Any
    workers: OrderedPool

    def __enter__(self) -> EncodingPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.workers.__exit__(*exc_info)


def encoding_pool(params: Params, tokenizer: Any) -> EncodingPool:
    """With one worker, this process encodes with `tokenizer`'s own backend."""
    load = partial(load_backend, backend_json(tokenizer), tokenizer.split_special_tokens)
    return EncodingPool(tokenizer, OrderedPool(params.data.prepare_workers, tokenizer.backend_tokenizer, load))


def tokenized_dir(params: Params, stage: StageName, video_frames: FrameSampling | None = None,
                  root: Path = Path(".")) -> Path:
    """Where a stage's documents are written: `data.tokenized_dir/<stage>/`, or for a frame setting
    of its context schedule other than the stage's own, `<stage>-<setting's name>/` beside it."""
    own = video_frames is None or video_frames == params.stages[stage].video_frames
    return root / params.data.tokenized_dir / (stage if own else f"{stage}-{video_frames.name}")


def prepare_stage(
    params: Params, stage: StageName, pool: EncodingPool, model_config: PretrainedConfig | None, root: Path = Path(".")
) -> PreparedStage:
    """Tokenise one stage's corpora (`model_config`: for a video stage), once for each of its frame
    settings; returns what the stage's own holds."""
    indexes = []
    for video_frames in params.stages[stage].frame_settings or [None]:
        stage_dir = tokenized_dir(params, stage, video_frames, root)
        desc = f"prepare {stage}" + (f" ({video_frames.name})" if video_frames else "")
        documents = _token_progress(_stage_documents(params, stage, pool, model_config, root, video_frames), desc)
        index = write_tokenized(stage_dir, stage, params.model.family, pool.tokenizer.pad_token_id, documents)
        if index.skipped:
            tqdm.write(
                f"warning: {desc}: {len(index.skipped)} of {len(index.skipped) + index.num_documents} "
                f"records skipped (unreadable files, listed under `skipped` in {stage_dir / INDEX_FILE})",
                file=sys.stderr,
            )
        indexes.append(index)
    return indexes[0]


def prepare_corpora(params: Params, root: Path = Path(".")) -> None:
    """Tokenise every stage's corpora into `data.tokenized_dir` (see the module docstring)."""
    model_dir = root / params.model.path
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token_id is None:
        raise PrepareError(f"{model_dir}: the tokenizer has no pad token; packing needs one")
    model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with encoding_pool(params, tokenizer) as pool:
        for stage in STAGE_NAMES:
            prepare_stage(params, stage, pool, model_config, root)
