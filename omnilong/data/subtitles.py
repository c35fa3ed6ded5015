""".srt subtitles, and the ones shown at a video's sampled frames.

VideoMME's subtitle setting gives the model, for each sampled frame, the subtitle on screen at
that frame's time; `subtitles_at` is that alignment, with each subtitle once and in time order.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# HH:MM:SS,mmm (a "." before the milliseconds is common too); hours may have more digits.
_TIME = r"(\d+):([0-5]\d):([0-5]\d)[,.](\d{3})"
_TIMING = re.compile(rf"^{_TIME}\s*-->\s*{_TIME}(?:\s.*)?$")
# Formatting that players render rather than show: <i>, </b>, <font color="...">, {\an8}.
_TAG = re.compile(r"</?[A-Za-z][^<>]*>|\{\\[^{}]*\}")


@dataclass(frozen=True)
class Subtitle:
    start_s: float
    end_s: float
    """Shown during [start_s, end_s)."""
    text: str
    """One line: the cue's lines joined by spaces, formatting tags removed."""


class SubtitleError(ValueError):
    """A malformed .srt file; the message names the file and line."""


def parse_srt(path: str | Path) -> list[Subtitle]:
    """The cues of an .srt file, sorted by start (then end) time.

    A cue is a number line, a timing line `HH:MM:SS,mmm --> HH:MM:SS,mmm` and text lines, cues
    separated by blank lines. Tolerated: a UTF-8 byte-order mark, CRLF line ends, no blank line
    at the end, `.` before the milliseconds, and text after the end time (position hints).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SubtitleError(f"{path}: cannot read the subtitle file ({exc.strerror})") from None
    # Split on \n alone (str.splitlines also splits on \u2028 and others, which subtitle text
    # may hold), so line numbers are those an editor shows.
    try:
        lines = [line.removesuffix("\r") for line in data.decode("utf-8-sig").split("\n")]
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SubtitleError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    subtitles = []
    first = 0  # of the next cue's lines, 0-based; messages give line numbers from 1
    while first < len(lines):
        if not lines[first].strip():
            first += 1
            continue
        end = first
        while end < len(lines) and lines[end].strip():
            end += 1
        subtitles.append(_parse_cue(path, lines, first, end))
        first = end
    return sorted(subtitles, key=lambda subtitle: (subtitle.start_s, subtitle.end_s))


def _parse_cue(path: Path, lines: list[str], first: int, end: int) -> Subtitle:
    """The cue in lines[first:end] (non-blank lines)."""
    number = lines[first].strip()
    if not (number.isascii() and number.isdigit()):
        raise SubtitleError(f"{path}:{first + 1}: expected a cue number, found {number!r}")
    if first + 1 == end:
        raise SubtitleError(f"{path}:{first + 2}: expected the timing line of cue {number} after line {first + 1}")
    timing = _TIMING.match(lines[first + 1].strip())
    if timing is None:
        raise SubtitleError(
            f"{path}:{first + 2}: expected a timing line 'HH:MM:SS,mmm --> HH:MM:SS,mmm', "
            f"found {lines[first + 1].strip()!r}"
        )
    fields = [int(field) for field in timing.groups()]
    start_s, end_s = _seconds(*fields[:4]), _seconds(*fields[4:])
    if end_s < start_s:
        raise SubtitleError(
            f"{path}:{first + 2}: cue {number} ends ({end_s:.3f} s) before it starts ({start_s:.3f} s)"
        )
    text = " ".join(_TAG.sub("", line).strip() for line in lines[first + 2 : end])
    return Subtitle(start_s=start_s, end_s=end_s, text=" ".join(text.split()))


def _seconds(hours: int, minutes: int, seconds: int, milliseconds: int) -> float:
    # One correctly rounded division: 01:02:03,004 is the float nearest 3723.004, as written.
    return (((hours * 60 + minutes) * 60 + seconds) * 1000 + milliseconds) / 1000


def subtitles_at(subtitles: Sequence[Subtitle], timestamps: Sequence[float]) -> list[Subtitle]:
    """The subtitles on screen at some of `timestamps` (a start <= t < end), each once, by start time.

    `timestamps` are the sampled frames' times in seconds; a subtitle shown only between two
    sampled frames is left out, as the model sees no frame of it.
    """
    times = sorted(timestamps)

    def shown(subtitle: Subtitle) -> bool:
        first_at_or_after_start = bisect_left(times, subtitle.start_s)
        return first_at_or_after_start < len(times) and times[first_at_or_after_start] < subtitle.end_s

    return sorted(filter(shown, subtitles), key=lambda subtitle: (subtitle.start_s, subtitle.end_s))


def subtitle_text(subtitles: Sequence[Subtitle]) -> str:
    """The subtitles' text, one line per subtitle, in the given order."""
    return "\n".join(subtitle.text for subtitle in subtitles)
