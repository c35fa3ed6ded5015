"""`omnilong data add`: bring a user's own corpus under `data/raw/user/<name>/`, tracked by DVC.

User corpora live outside every stage's outputs (DVC deletes those when a stage re-runs) and
are versioned with `dvc add`, so a real corpus goes through exactly the path the default does.
Everything is validated before anything is copied: a bad corpus changes nothing on disk.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

from omnilong import atomic
from omnilong.config import corpus_path
from omnilong.data.schemas import CorpusKind, RecordError, VideoRecord, iter_records

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CorpusError(ValueError):
    """A user corpus that cannot be added; the message names the file and the problem."""


def _jsonl_files(path: Path, kind: CorpusKind) -> list[Path]:
    if kind == "video":
        qa = path / "qa.jsonl"
        if not path.is_dir() or not qa.is_file():
            raise CorpusError(f"{path}: a video corpus is a directory holding qa.jsonl and the videos it names")
        return [qa]
    if path.is_file():
        if path.suffix != ".jsonl":
            raise CorpusError(f"{path}: expected a .jsonl file")
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if files:
            return files
        raise CorpusError(f"{path}: directory holds no .jsonl file")
    raise CorpusError(f"{path}: no such file or directory")


def validate_corpus(path: Path, kind: CorpusKind) -> list[Path]:
    """Check every record (and, for video, that each named video decodes, its window lies within
    it and its subtitles parse); return the JSONL files."""
    files = _jsonl_files(path, kind)
    for jsonl in files:
        count = 0
        try:
            for record in iter_records(jsonl, kind):
                count += 1
                if isinstance(record, VideoRecord):
                    _check_video_record(path, record)
        except RecordError as exc:
            raise CorpusError(str(exc)) from None
        except ValueError as exc:  # VideoReadError, SubtitleError, a window past the video's end
            raise CorpusError(f"{jsonl}: record {record.id!r}: {exc}") from None
        if count == 0:
            raise CorpusError(f"{jsonl}: holds no record; expected one JSON record per line")
    return files


def _check_video_record(video_dir: Path, record: VideoRecord) -> None:
    """The video decodes, its window (if any) lies within it, its subtitles (if any) parse."""
    from omnilong.data.subtitles import parse_srt
    from omnilong.data.video_frames import video_info, window_bounds

    info = video_info(video_dir / record.video)
    window_bounds(info, record.start_s, record.end_s)
    if record.subtitles is not None:
        parse_srt(video_dir / record.subtitles)


def add_user_corpus(path: Path, kind: str, name: str | None, raw_dir: Path) -> Path:
    """Validate, copy into `raw_dir/user/<name>/<kind>/` and `dvc add` the corpus directory."""
    if kind not in get_args(CorpusKind):
        raise CorpusError(f"--kind: expected one of {', '.join(get_args(CorpusKind))}, given {kind!r}")
    path = Path(path)
    name = name or path.stem
    if not _NAME.match(name) or name == "default":
        raise CorpusError(
            f"--name: expected letters, digits, '_', '.', '-' (and not 'default'), given {name!r}"
        )
    files = validate_corpus(path, kind)

    corpus_dir = corpus_path(raw_dir, name)
    with atomic.atomic_dir(corpus_dir / kind) as staging:
        if kind == "video":
            shutil.copytree(path, staging, dirs_exist_ok=True)
        else:
            for jsonl in files:
                shutil.copy2(jsonl, staging / jsonl.name)

    result = subprocess.run([sys.executable, "-m", "dvc", "add", str(corpus_dir)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CorpusError(f"dvc add {corpus_dir} failed:\n{result.stdout}{result.stderr}")
    return corpus_dir
