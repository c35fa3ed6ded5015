"""VideoMME annotations and results: read either published layout, find the videos, write results.

Two layouts are in the wild, with different spellings of the same fields:
- the JSON (the benchmark's own, and its results template evaluation/output_test_template.json):
  a list of videos, each `video_id, duration_category, video_category, video_subcategory (or
  video_sub_category), url, questions[{question_id, task_type, question, choices, answer}]`;
- the Hugging Face parquet (lmms-lab/Video-MME, videomme/test-*.parquet): one row per question,
  `video_id, duration, domain, sub_category, url, videoID, question_id, task_type, question,
  options, answer`, where `video_id` is the benchmark's number ("001") and `videoID` the YouTube
  id the video and subtitle files are named by (data/<videoID>.mp4, subtitle/<videoID>.srt).
Both read into the same `VideommeVideo`s; a question may carry the model's `response`. Results
are written in the benchmark's JSON spelling, so its own script can score them too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlparse

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from omnilong import atomic

Duration = Literal["short", "medium", "long"]
DURATIONS: tuple[Duration, ...] = ("short", "medium", "long")
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm")
# The Hugging Face archives unpack to data/ and subtitle/; other copies use video/ or one folder.
VIDEO_SUBDIRS = ("", "data", "video", "videos")
SUBTITLE_SUBDIRS = ("subtitle", "subtitles", "", "data")


class VideommeDataError(ValueError):
    """An annotation or results file that cannot be used; the message names the file, entry and field."""


def _field(*spellings: str, written_as: str, **constraints: Any) -> Any:
    return Field(validation_alias=AliasChoices(*spellings), serialization_alias=written_as, **constraints)


class VideommeQuestion(BaseModel):
    # Files in the wild carry more fields (language, missing, ...): they are not ours to check.
    model_config = ConfigDict(extra="ignore", frozen=True)

    question_id: str
    task_type: str
    question: str
    options: list[str] = _field("options", "choices", written_as="choices", min_length=4, max_length=4)
    """The four options as written, normally with their labels ("A. Black.")."""
    answer: Literal["A", "B", "C", "D"]
    response: str | None = None
    """The model's reply, in a results file."""


class VideommeVideo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    video_id: str = _field("video_id", "videoID", written_as="video_id")
    youtube_id: str | None = Field(
        None, validation_alias=AliasChoices("videoID", "youtube_id"), serialization_alias="videoID"
    )
    url: str | None = None
    duration: Duration = _field("duration", "duration_category", written_as="duration_category")
    domain: str = _field("domain", "video_category", written_as="video_category")
    sub_category: str = _field(
        "sub_category", "video_sub_category", "video_subcategory", written_as="video_subcategory"
    )
    questions: Annotated[list[VideommeQuestion], Field(min_length=1)]

    @property
    def file_stems(self) -> list[str]:
        """Names the video's files may have, most specific first: the YouTube id, the
        benchmark's id, the id in the YouTube URL."""
        from_url = parse_qs(urlparse(self.url).query).get("v", []) if self.url else []
        return list(dict.fromkeys(s for s in [self.youtube_id, self.video_id, *from_url] if s))


# Every spelling of a field, for messages about a missing one.
_SPELLINGS = {
    name: list(field.validation_alias.choices)
    for model in (VideommeVideo, VideommeQuestion)
    for name, field in model.model_fields.items()
    if isinstance(field.validation_alias, AliasChoices)
}


def _describe(errors: list[dict[str, Any]], rows: Sequence[int] | None) -> str:
    lines = []
    for error in errors:
        loc = [str(part) for part in error["loc"]]
        if rows is not None and len(loc) >= 2 and loc[0] == "questions" and loc[1].isdigit():
            loc = [f"row {rows[int(loc[1])]}", *loc[2:]]
        name = loc[-1] if loc else ""
        if error["type"] == "missing" and len(_SPELLINGS.get(name, [])) > 1:
            loc[-1] = " or ".join(_SPELLINGS[name])
        where = ".".join(loc) or "<entry>"
        if error["type"] == "missing":
            lines.append(f"{where}: required field is missing")
        else:
            lines.append(f"{where}: {error['msg']} (given {error['input']!r})")
    return "; ".join(lines)


def _validate(path: Path, raw: Any, entry: str, rows: Sequence[int] | None = None) -> VideommeVideo:
    if not isinstance(raw, dict):
        raise VideommeDataError(
            f"{path}: {entry}: expected an object with the video's fields, given {type(raw).__name__}"
        )
    try:
        return VideommeVideo.model_validate(raw)
    except ValidationError as exc:
        video_id = raw.get("video_id", raw.get("videoID"))
        label = f"{entry} (video_id {video_id!r})" if video_id is not None else entry
        raise VideommeDataError(f"{path}: {label}: {_describe(exc.errors(), rows)}") from None


def _read_json(path: Path) -> list[VideommeVideo]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise VideommeDataError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise VideommeDataError(f"{path}: expected a JSON list of videos, given {type(raw).__name__}")
    return [_validate(path, entry, f"entry {i}") for i, entry in enumerate(raw)]


_VIDEO_COLUMNS = ("video_id", "videoID", "youtube_id", "url", "duration", "duration_category", "domain",
                  "video_category", "sub_category", "video_sub_category", "video_subcategory")


def _read_parquet(path: Path) -> list[VideommeVideo]:
    try:
        import pyarrow.parquet
    except ImportError:
        raise VideommeDataError(f"{path}: reading a parquet file needs pyarrow (pip install pyarrow)") from None
    rows = pyarrow.parquet.read_table(path).to_pylist()
    videos: dict[str, dict[str, Any]] = {}
    row_numbers: dict[str, list[int]] = {}
    for number, row in enumerate(rows):
        key = row.get("video_id", row.get("videoID"))
        if key is None:
            raise VideommeDataError(f"{path}: row {number}: video_id or videoID: required field is missing")
        fields = {name: row[name] for name in _VIDEO_COLUMNS if name in row}
        question = {name: value for name, value in row.items() if name not in fields}
        if key not in videos:
            videos[key], row_numbers[key] = {**fields, "questions": []}, []
        for name, value in fields.items():
            if videos[key][name] != value:
                raise VideommeDataError(
                    f"{path}: row {number}: {name} is {value!r}, but row {row_numbers[key][0]} of the same "
                    f"video ({key!r}) has {videos[key][name]!r}"
                )
        videos[key]["questions"].append(question)
        row_numbers[key].append(number)
    return [_validate(path, video, f"video {key!r}", row_numbers[key]) for key, video in videos.items()]


def load_videomme(path: str | Path) -> list[VideommeVideo]:
    """The videos and questions of an annotation or results file: `.parquet` is the Hugging
    Face layout (one row per question), anything else the JSON list of videos."""
    path = Path(path)
    if not path.is_file():
        raise VideommeDataError(f"{path}: no such VideoMME annotation file")
    videos = _read_parquet(path) if path.suffix == ".parquet" else _read_json(path)
    seen: dict[str, str] = {}
    for video in videos:
        for question in video.questions:
            if question.question_id in seen:
                raise VideommeDataError(
                    f"{path}: question_id {question.question_id!r} appears twice "
                    f"(videos {seen[question.question_id]!r} and {video.video_id!r})"
                )
            seen[question.question_id] = video.video_id
    return videos


def write_results(path: Path, videos: Sequence[VideommeVideo]) -> None:
    """The videos with their questions' responses, in the benchmark's JSON spelling."""
    entries = [video.model_dump(by_alias=True, exclude_none=True) for video in videos]
    atomic.write_text(path, json.dumps(entries, indent=1, ensure_ascii=False) + "\n")


def find_video(video_dir: Path, video: VideommeVideo) -> Path:
    """The video's file: <stem><suffix> in `video_dir` or its data/, video/ or videos/ folder."""
    candidates = [video_dir / sub / f"{stem}{suffix}" for stem in video.file_stems for sub in VIDEO_SUBDIRS
             for suffix in VIDEO_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = ", ".join(f"{stem}{{{','.join(VIDEO_SUFFIXES)}}}" for stem in video.file_stems)
    raise VideommeDataError(
        f"video {video.video_id!r}: no file {names} in {video_dir} or its {', '.join(VIDEO_SUBDIRS[1:])} folders"
    )


def find_subtitles(video_dir: Path, video: VideommeVideo) -> Path | None:
    """The video's .srt in `video_dir`'s subtitle/ folder, or beside the videos; None when it has none
    (the benchmark has no subtitles for some videos)."""
    for stem in video.file_stems:
        for sub in SUBTITLE_SUBDIRS:
            if (candidate := video_dir / sub / f"{stem}.srt").is_file():
                return candidate
    return None
