"""The JSONL record of each corpus kind, shared by the synthesiser, `data add` and `prepare`.

A corpus directory holds `text/*.jsonl`, `instruct/*.jsonl` and `video/qa.jsonl` (+ the
videos and .srt subtitle files it names, relative to `video/`); a corpus may hold only some of the kinds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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


class RecordError(ValueError):
    """A corpus line that does not match its kind's schema; names file, line and field."""


def corpus_files(corpus_dir: Path, kind: CorpusKind) -> list[Path]:
    """The JSONL files of one kind in a corpus directory, in a stable order."""
    if kind == "video":
        qa = corpus_dir / "video" / "qa.jsonl"
        return [qa] if qa.is_file() else []
    return sorted((corpus_dir / kind).glob("*.jsonl"))


def iter_records(path: Path, kind: CorpusKind) -> Iterator[_Record]:
    """Yield validated records of `path`; the first bad line raises RecordError."""
    record_type = RECORD_TYPES[kind]
    # Bytes decoded line by line, so a line that is not UTF-8 is named like any other bad line.
    with open(path, "rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecordError(f"{path}:{line_no}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                  "expected one JSON record per line, encoded as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield record_type.model_validate(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                  "expected one JSON record per line") from None
            except ValidationError as exc:
                problems = "; ".join(
                    f"field {'.'.join(str(p) for p in e['loc']) or '<record>'}: {e['msg']}"
                    for e in exc.errors()
                )
                raise RecordError(f"{path}:{line_no}: not a valid {kind} record ({problems})") from None
