""".srt parsing and alignment of subtitles to sampled frame times."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from omnilong.data.subtitles import (
    Subtitle,
    SubtitleError,
    parse_srt,
    subtitle_text,
    subtitles_at,
)

# Cues out of order, overlapping (2 starts before 1 ends; 4 starts as 2 ends), multi-line,
# with tags, a "." before the milliseconds, a position hint, two blank lines between cues and
# none at the end.
SRT = """1
00:00:01,000 --> 00:00:04,000
<i>Welcome</i> to the
video.

3
00:00:10,500 --> 00:00:12,000
The fox jumps.


2
00:00:03,000 --> 00:00:06.250
Overlapping: a second
  speaker.

4
00:00:06,250 --> 00:00:08,000 X1:40 X2:600 Y1:20 Y2:50
<b>Bold</b> {\\an8}<font color="#ffff00">on top</font>

6
01:02:03,004 --> 01:02:05,000
An hour in.

5
00:00:20,000 --> 00:00:21,000
Never sampled."""

WELCOME = Subtitle(1.0, 4.0, "Welcome to the video.")
OVERLAP = Subtitle(3.0, 6.25, "Overlapping: a second speaker.")
BOLD = Subtitle(6.25, 8.0, "Bold on top")
FOX = Subtitle(10.5, 12.0, "The fox jumps.")
NEVER = Subtitle(20.0, 21.0, "Never sampled.")
HOUR = Subtitle(3723.004, 3725.0, "An hour in.")
IN_TIME_ORDER = [WELCOME, OVERLAP, BOLD, FOX, NEVER, HOUR]


def write(tmp_path: Path, content: str | bytes, name: str = "video.srt") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_parse_srt_sorts_cues_and_cleans_text(tmp_path):
    assert parse_srt(write(tmp_path, SRT)) == IN_TIME_ORDER


def test_parse_srt_tolerates_bom_and_crlf(tmp_path):
    windows = b"\xef\xbb\xbf" + SRT.replace("\n", "\r\n").encode("utf-8") + b"\r\n\r\n"
    assert parse_srt(write(tmp_path, windows)) == IN_TIME_ORDER
    assert parse_srt(write(tmp_path, "", "empty.srt")) == []


@pytest.mark.parametrize(
    "timestamps,expected",
    [
        # At 3.0 s two subtitles are on screen; at 6.25 s one ends (end excluded) as another starts.
        ([11.0, 0.5, 3.0, 6.25, 30.0], [WELCOME, OVERLAP, BOLD, FOX]),
        ([4.0], [OVERLAP]),
        ([1.0, 1.5, 2.0, 2.999], [WELCOME]),  # each once, however many frames show it
        ([0.0, 8.0, 12.0, 19.999, 21.0], []),  # only between subtitles, or at their ends
        ([20.0, 3724.0], [NEVER, HOUR]),
        ([], []),
    ],
)
def test_subtitles_at_sampled_frame_times(tmp_path, timestamps, expected):
    subtitles = parse_srt(write(tmp_path, SRT))
    assert subtitles_at(subtitles, timestamps) == expected
    assert subtitles_at(list(reversed(subtitles)), timestamps) == expected  # in time order whatever the input's


def test_subtitle_text_is_one_line_per_subtitle():
    assert subtitle_text([WELCOME, OVERLAP]) == "Welcome to the video.\nOverlapping: a second speaker."
    assert subtitle_text([]) == ""


@pytest.mark.parametrize(
    "content,line,message",
    [
        ("1\n00:00:01,000 --> 00:00:02,000\nhi\n\nx\n00:00:03,000 --> 00:00:04,000\nyo\n", 5,
         "expected a cue number, found 'x'"),
        ("1\n00:00:01 --> 00:00:02\nhi\n", 2, "expected a timing line 'HH:MM:SS,mmm --> HH:MM:SS,mmm', found"),
        ("\n\n1\n00:61:00,000 --> 01:02:00,000\nhi\n", 4, "expected a timing line"),
        ("1\n00:00:01,000 -> 00:00:02,000\nhi\n", 2, "expected a timing line"),
        ("1\n00:00:05,000 --> 00:00:02,000\nhi\n", 2, r"cue 1 ends \(2\.000 s\) before it starts \(5\.000 s\)"),
        ("1\n00:00:01,000 --> 00:00:02,000\nhi\n\n2\n", 6, "expected the timing line of cue 2 after line 5"),
        ("1\r\n00:00:01,000 --> 00:00:02,000\r\nhi\r\n\r\n2\r\nnot a time\r\n", 6, "expected a timing line"),
        ("1\n00:00:01,000 --> 00:00:02,000\nline\u2028same line\n\n2\n00:00:03,000 --> 00:00:0x,000\n", 6,
         "expected a timing line"),
        (b"1\n00:00:01,000 --> 00:00:02,000\ncaf\xe9\n", 3, "not UTF-8 text"),
    ],
)
def test_malformed_srt_names_file_and_line(tmp_path, content, line, message):
    path = write(tmp_path, content)
    with pytest.raises(SubtitleError, match=f"^{re.escape(str(path))}:{line}: {message}"):
        parse_srt(path)


def test_missing_srt_names_the_file(tmp_path):
    path = tmp_path / "missing.srt"
    with pytest.raises(SubtitleError, match=f"^{re.escape(str(path))}: cannot read the subtitle file"):
        parse_srt(path)
