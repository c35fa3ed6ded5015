"""`omnilong data add`: bring a user's own corpus under `data/raw/user/<name>/`, tracked by DVC.

User corpora live outside every stage's outputs (DVC deletes those when a stage re-runs) and
are versioned with `dvc add`, so a real corpus goes through exactly the path the default does.
Everything is validated before anything is copied: a bad corpus changes nothing on disk. The
sources are copied as they are (any format of omnilong/data/readers.py, the user's own field
names read through `data.fields.<name>`), so a corpus is never rewritten.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

from omnilong import atomic
from omnilong.config import CorpusFields, corpus_path
from omnilong.data.readers import FORMATS, check_source, is_arrow_dataset, source_stem, sources_in
from omnilong.data.schemas import VIDEO_QUESTIONS, CorpusKind, RecordError, VideoRecord, iter_records, video_questions

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CorpusError(ValueError):
    """A user corpus that cannot be added; the message names the file and the problem."""


def _sources(path: Path, kind: CorpusKind) -> list[Path]:
    if kind == "video":
        questions = video_questions(path) if path.is_dir() else []
        if len(questions) != 1:
            found = f" (found {', '.join(q.name for q in questions)})" if questions else ""
            raise CorpusError(f"{path}: a video corpus is a directory holding the videos and one source of their "
                              f"questions, {VIDEO_QUESTIONS} in one of {FORMATS}{found}")
        return questions
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if path.is_dir() and not is_arrow_dataset(path) and (sources := sources_in(path)):
        return sources
    try:  # one file, or one `datasets` folder; else the message says what was expected
        check_source(path)
    except RecordError as exc:
        raise CorpusError(str(exc)) from None
    return [path]


def validate_corpus(path: Path, kind: CorpusKind, fields: CorpusFields | None = None) -> list[Path]:
    """Check every record, read through the corpus's field mapping if it has one (and, for video,
    that each named video decodes, its window lies within it and its subtitles parse); return the
    sources (files and `datasets` folders)."""
    sources = _sources(path, kind)
    for source in sources:
        count = 0
        try:
            for record in iter_records(source, kind, fields):
                count += 1
                if isinstance(record, VideoRecord):
                    _check_video_record(path, record)
        except RecordError as exc:
            raise CorpusError(str(exc)) from None
        except ValueError as exc:  # VideoReadError, SubtitleError, a window past the video's end
            raise CorpusError(f"{source}: record {record.id!r}: {exc}") from None
        if count == 0:
            raise CorpusError(f"{source}: holds no record; expected one JSON record per line or one row per record")
    return sources


def _check_video_record(video_dir: Path, record: VideoRecord) -> None:
    """The video decodes, its window (if any) lies within it, its subtitles (if any) parse."""
    from omnilong.data.subtitles import parse_srt
    from omnilong.data.video_frames import video_info, window_bounds

    info = video_info(video_dir / record.video)
    window_bounds(info, record.start_s, record.end_s)
    if record.subtitles is not None:
        parse_srt(video_dir / record.subtitles)


def add_user_corpus(
    path: Path, kind: str, name: str | None, raw_dir: Path, fields: dict[str, CorpusFields] | None = None
) -> Path:
    """Validate, copy into `raw_dir/user/<name>/<kind>/` and `dvc add` the corpus directory.
    `fields`: the field mappings by corpus name (`data.fields`); this corpus's is applied."""
    if kind not in get_args(CorpusKind):
        raise CorpusError(f"--kind: expected one of {', '.join(get_args(CorpusKind))}, given {kind!r}")
    path = Path(path)
    name = name or source_stem(path)
    if not _NAME.match(name) or name == "default":
        raise CorpusError(
            f"--name: expected letters, digits, '_', '.', '-' (and not 'default'), given {name!r}"
        )
    sources = validate_corpus(path, kind, (fields or {}).get(name))

    corpus_dir = corpus_path(raw_dir, name)
    with atomic.atomic_dir(corpus_dir / kind) as staging:
        if kind == "video":
            shutil.copytree(path, staging, dirs_exist_ok=True)
        else:
            for source in sources:  # as they are: the formats and fields they came in are read in place
                if source.is_dir():
                    shutil.copytree(source, staging / source.name)
                else:
                    shutil.copy2(source, staging / source.name)

    result = subprocess.run([sys.executable, "-m", "dvc", "add", str(corpus_dir)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CorpusError(f"dvc add {corpus_dir} failed:\n{result.stdout}{result.stderr}")
    return corpus_dir
