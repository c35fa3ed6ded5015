"""The record of each corpus kind, shared by the synthesiser, `data add` and `prepare`.

A corpus directory holds `text/` and `instruct/` (JSONL, plain or compressed, Parquet, or
`datasets` folders: omnilong/data/readers.py) and `video/` (the videos and .srt subtitle files,
and their questions as `qa` in any of those formats, naming them relative to `video/`); a
corpus may hold only some of the kinds. Our
own records are read as they are; a user corpus with a field mapping (`data.fields` in the
parameters) is read through it, so its data needs no rewriting.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from omnilong.config import CorpusFields
from omnilong.data.readers import FORMATS, RecordError, Row, iter_rows, source_stem, sources_in

CorpusKind = Literal["text", "instruct", "video"]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextRecord(_Record):
    """One document of continual-pretraining text."""

    id: NonEmptyStr
    source: NonEmptyStr
    text: NonEmptyStr


class Message(_Record):
    role: Literal["system", "user", "assistant"]
    content: NonEmptyStr


class _Conversation(_Record):
    messages: Annotated[list[Message], Field(min_length=2)]

    @model_validator(mode="after")
    def _has_user_and_assistant(self) -> _Conversation:
        roles = [m.role for m in self.messages]
        if "user" not in roles or "assistant" not in roles:
            raise ValueError("messages need at least one user and one assistant turn")
        if roles[-1] != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        return self


class InstructRecord(_Conversation):
    """A chat; only assistant turns are trained on."""

    id: NonEmptyStr


class VideoRecord(_Conversation):
    """A chat about a video; the video (and its subtitles, if any) come before the first user turn's text."""

    id: NonEmptyStr
    video: NonEmptyStr
    """Path of the video file, relative to the corpus's `video/` directory."""
    start_s: Annotated[float, Field(ge=0)] | None = None
    end_s: Annotated[float, Field(gt=0)] | None = None
    """The window of the video the chat is about, in seconds; unset: from its start, to its end."""
    subtitles: NonEmptyStr | None = None
    """Path of an .srt subtitle file, relative to the corpus's `video/` directory."""

    @field_validator("end_s")
    @classmethod
    def _after_start(cls, end_s: float | None, info: ValidationInfo) -> float | None:
        start_s = info.data.get("start_s")
        if end_s is not None and start_s is not None and end_s <= start_s:
            raise ValueError(f"end_s must be greater than start_s ({start_s}), given {end_s}")
        return end_s


RECORD_TYPES: dict[CorpusKind, type[_Record]] = {
    "text": TextRecord,
    "instruct": InstructRecord,
    "video": VideoRecord,
}


VIDEO_QUESTIONS = "qa"
"""The name of a video corpus's questions beside its videos: `qa.jsonl`, `qa.parquet`, ... or a
`qa/` `datasets` folder."""


def video_questions(video_dir: Path) -> list[Path]:
    """The sources of a video corpus's questions (`qa` in any format), by name."""
    return [source for source in sources_in(video_dir) if source_stem(source) == VIDEO_QUESTIONS]


def corpus_files(corpus_dir: Path, kind: CorpusKind) -> list[Path]:
    """The sources of one kind in a corpus directory, in a stable order: `video/qa.*`, or the
    files and `datasets` folders of `text/` or `instruct/`, in any format of omnilong/data/readers.py."""
    return video_questions(corpus_dir / "video") if kind == "video" else sources_in(corpus_dir / kind)


def corpus_layout(corpus_dir: Path, kind: CorpusKind) -> str:
    """Where a corpus keeps its records of `kind`, for messages that find none."""
    if kind == "video":
        return (f"{corpus_dir / 'video'}/ holding the videos and their questions as {VIDEO_QUESTIONS} "
                f"in one of {FORMATS}")
    return f"{corpus_dir / kind}/ holding {FORMATS}"


def iter_records(path: Path, kind: CorpusKind, fields: CorpusFields | None = None) -> Iterator[_Record]:
    """Yield validated records of the source `path`, streamed; the first bad row raises RecordError.

    `fields`: the corpus's field mapping, None for our own records (validated as they are)."""
    record_type = RECORD_TYPES[kind]
    columns = None if fields is None else _mapped_columns(kind, fields)
    for row in iter_rows(path, columns):
        value = row.value if fields is None else _mapped(row, path, kind, fields)
        try:
            yield record_type.model_validate(value)
        except ValidationError as exc:
            problems = "; ".join(
                f"field {'.'.join(str(p) for p in e['loc']) or '<record>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise RecordError(f"{row.location}: not a valid {kind} record ({problems})") from None


# What video records hold besides their id and messages; named as they are, not mapped.
_VIDEO_KEYS = ("video", "start_s", "end_s", "subtitles")


def _mapped_columns(kind: CorpusKind, fields: CorpusFields) -> list[str]:
    named = {"text": [fields.text_field, fields.source_field], "instruct": [fields.messages_field],
             "video": [fields.messages_field, *_VIDEO_KEYS]}[kind]
    return [name for name in (fields.id_field, *named) if name is not None]


def _mapped(row: Row, path: Path, kind: CorpusKind, fields: CorpusFields) -> dict[str, Any]:
    """A row of a corpus with a field mapping as the record it holds (in our field names)."""
    if not isinstance(row.value, dict):
        raise RecordError(f"{row.location}: not a record (expected a JSON object), given {type(row.value).__name__}")

    def required(container: dict, key: str, setting: str, within: str = "") -> Any:
        value = container.get(key)
        if value is None:
            raise RecordError(f"{row.location}: not a valid {kind} record (field {within}{key}, the mapping's "
                              f"{setting}: missing or null)")
        return value

    record: dict[str, Any] = {}
    if fields.id_field is None:
        record["id"] = f"{path.name}:{row.number}"
    else:
        record_id = required(row.value, fields.id_field, "id_field")
        # Integer ids are common in tables; ours are strings.
        record["id"] = str(record_id) if isinstance(record_id, int) and not isinstance(record_id, bool) else record_id
    if kind == "text":
        record["text"] = required(row.value, fields.text_field, "text_field")
        record["source"] = path.name if fields.source_field is None else required(
            row.value, fields.source_field, "source_field")
        return record
    messages = required(row.value, fields.messages_field, "messages_field")
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        turns = []
        for i, message in enumerate(messages):
            within = f"{fields.messages_field}.{i}."
            role = required(message, fields.role_field, "role_field", within)
            content = required(message, fields.content_field, "content_field", within)
            turns.append({"role": fields.roles.get(role, role) if isinstance(role, str) else role, "content": content})
        messages = turns  # anything else is left to the schema to refuse
    record["messages"] = messages
    if kind == "video":
        record.update((key, row.value[key]) for key in _VIDEO_KEYS if row.value.get(key) is not None)
    return record
