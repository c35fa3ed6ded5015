"""Stage-3 videos: rendered scenes whose questions follow from what is drawn or said.

Each scene shows a seven-segment digit in the upper part that changes from segment to segment
of the video, and a shape in the lower part that moves horizontally across the frame and
changes colour half-way. Questions ask for the digit after another, the number of digits, the
shape, its direction and its colour at the beginning and the end.

Long videos play the same kind of scene over many more frames and come with an .srt file:
a keeper names animals one after another and, once, a gate code. Half of their questions are
about the frames, half only the subtitles answer (which animal comes first, which one follows
another, the code), so training on them needs both the frames and the subtitles.

Frames are drawn with PIL and encoded with PyAV (libx264, yuv420p). The encoder runs on one
thread with fixed options and a fixed time base, which makes the mp4 bytes depend only on the
frames.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from omnilong.config import VideoSynthParams
from omnilong.data.schemas import Message, VideoRecord
from omnilong.data.subtitles import Subtitle

# Saturated colours far apart in RGB, so they survive 4:2:0 chroma subsampling distinguishably.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 210, 220),
}
BACKGROUND = (24, 24, 24)
DIGIT_COLOUR = (240, 240, 240)
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left to right", "right to left")

# Segments a-g of a seven-segment display: a top, b top right, c bottom right, d bottom,
# e bottom left, f top left, g middle.
DIGIT_SEGMENTS: dict[int, str] = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}
MIN_DIGITS, MAX_DIGITS = 3, 5
# A keyframe every 16 frames bounds how much decord decodes to reach a frame of a long video.
ENCODER_OPTIONS = {"crf": "18", "preset": "medium", "g": "16", "threads": "1"}

Box = tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive as PIL draws rectangles

# Subtitles of a long video: this many lines, one per equal slot of the video, each shown for the
# first SUBTITLE_SHOWN_FRACTION of its slot (512 frames at 4 fps: 8.5 s of every 10.7 s).
SUBTITLE_LINES = 12
SUBTITLE_SHOWN_FRACTION = 0.8
ANIMALS = (
    "otter", "heron", "badger", "lynx", "walrus", "gecko", "bison", "koala", "marten", "puffin",
    "ibis", "tapir", "jackal", "okapi", "raven", "stoat", "wombat", "zebra", "moose", "beaver",
)


@dataclass(frozen=True)
class Scene:
    shape: str
    direction: str
    colour_start: str
    colour_end: str
    digits: tuple[int, ...]
    """Shown one after another, each for an equal share of the frames."""

    def digit_at(self, frame: int, num_frames: int) -> int:
        return self.digits[frame * len(self.digits) // num_frames]

    def colour_at(self, frame: int, num_frames: int) -> str:
        return self.colour_start if frame < num_frames // 2 else self.colour_end


def random_scene(rng: random.Random, num_frames: int) -> Scene:
    colour_start, colour_end = rng.sample(sorted(PALETTE), 2)
    # Distinct digits, so "the digit after d" has one answer; at least one frame per digit.
    num_digits = min(rng.randint(MIN_DIGITS, MAX_DIGITS), num_frames)
    return Scene(
        shape=rng.choice(SHAPES),
        direction=rng.choice(DIRECTIONS),
        colour_start=colour_start,
        colour_end=colour_end,
        digits=tuple(rng.sample(range(10), num_digits)),
    )


def digit_segment_boxes(height: int, width: int) -> dict[str, Box]:
    """Where each segment of the digit is drawn: a glyph centred in the upper 40% of the frame."""
    top, bottom = round(height * 0.06), round(height * 0.42)
    half_width = min(height * 0.1, width * 0.2)
    left, right = round(width * 0.5 - half_width), round(width * 0.5 + half_width)
    thick = max(2, round(height / 20))
    middle = (top + bottom) // 2
    half = thick // 2
    return {
        "a": (left, top, right, top + thick - 1),
        "b": (right - thick + 1, top, right, middle),
        "c": (right - thick + 1, middle, right, bottom),
        "d": (left, bottom - thick + 1, right, bottom),
        "e": (left, middle, left + thick - 1, bottom),
        "f": (left, top, left + thick - 1, middle),
        "g": (left, middle - half, right, middle - half + thick - 1),
    }


def shape_centre(scene: Scene, frame: int, params: VideoSynthParams) -> tuple[float, float]:
    """(x, y) of the shape: it crosses the lower part of the frame at constant speed."""
    size = shape_size(params)
    x_first, x_last = size / 2 + 2, params.width - size / 2 - 2
    progress = frame / max(params.num_frames - 1, 1)
    if scene.direction == "right to left":
        progress = 1 - progress
    return x_first + (x_last - x_first) * progress, params.height * 0.72


def shape_size(params: VideoSynthParams) -> int:
    return max(6, round(min(params.height, params.width) * 0.22))


def render_frame(scene: Scene, frame: int, params: VideoSynthParams) -> np.ndarray:
    """The RGB frame, uint8 (height, width, 3)."""
    image = Image.new("RGB", (params.width, params.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    boxes = digit_segment_boxes(params.height, params.width)
    for segment in DIGIT_SEGMENTS[scene.digit_at(frame, params.num_frames)]:
        draw.rectangle(boxes[segment], fill=DIGIT_COLOUR)
    x, y = shape_centre(scene, frame, params)
    half = shape_size(params) / 2
    colour = PALETTE[scene.colour_at(frame, params.num_frames)]
    if scene.shape == "circle":
        draw.ellipse((x - half, y - half, x + half, y + half), fill=colour)
    elif scene.shape == "square":
        draw.rectangle((x - half, y - half, x + half, y + half), fill=colour)
    else:
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=colour)
    return np.asarray(image)


def encode_mp4(frames: list[np.ndarray], path: Path, fps: int, faststart: bool = False) -> None:
    """Encode RGB frames as H.264 in mp4, reproducibly: one encoder thread, fixed options, each
    frame converted to YUV on its own. `faststart`: the index before the frame data."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=fps, options=ENCODER_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.time_base = Fraction(1, fps)
        for index, rgb in enumerate(frames):
            # Converted here, not by the stream: PyAV's encoder reuses one converter across frames,
            # and with it about one encode in fifteen came out with different bytes (PyAV 18,
            # FFmpeg 8), which broke the corpus's reproducibility under DVC.
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def scene_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs that the video answers, in a seeded order."""
    position = rng.randrange(len(scene.digits) - 1)
    questions = [
        ("Which shape moves across the video? Answer with one word.", scene.shape),
        (f"Which direction does the {scene.shape} move? Answer left to right or right to left.", scene.direction),
        (f"What colour is the {scene.shape} at the beginning? Answer with one word.", scene.colour_start),
        (f"What colour is the {scene.shape} at the end? Answer with one word.", scene.colour_end),
        (f"Which digit appears right after {scene.digits[position]}? Answer with the digit only.",
         str(scene.digits[position + 1])),
        ("How many different digits are shown? Answer with a number only.", str(len(scene.digits))),
    ]
    rng.shuffle(questions)
    return questions


@dataclass(frozen=True)
class Narration:
    """What a long video's subtitles say: animals named in turn, and a gate code once."""

    animals: tuple[str, ...]
    code: int
    code_line: int
    """Which subtitle line gives the code instead of an animal."""

    def lines(self) -> list[str]:
        animals = iter(self.animals)
        return [
            f"The gate code is {self.code}." if line == self.code_line else f"The keeper points at the {next(animals)}."
            for line in range(len(self.animals) + 1)
        ]


def random_narration(rng: random.Random) -> Narration:
    return Narration(
        animals=tuple(rng.sample(ANIMALS, SUBTITLE_LINES - 1)),
        code=rng.randrange(1000, 10_000),
        code_line=rng.randrange(SUBTITLE_LINES),
    )


def narration_subtitles(narration: Narration, num_frames: int, fps: int) -> list[Subtitle]:
    """One subtitle per equal slot of the video, times on whole milliseconds (as .srt writes them)."""
    duration_ms = num_frames * 1000 // fps
    lines = narration.lines()
    shown_ms = round(SUBTITLE_SHOWN_FRACTION * duration_ms / len(lines))
    subtitles = []
    for i, text in enumerate(lines):
        start_ms = i * duration_ms // len(lines)
        subtitles.append(Subtitle(start_s=start_ms / 1000, end_s=(start_ms + shown_ms) / 1000, text=text))
    return subtitles


def _srt_time(seconds: float) -> str:
    total_ms = round(seconds * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d},{rest % 1000:03d}"


def srt_text(subtitles: list[Subtitle]) -> str:
    """SubRip: numbered blocks of a time range and the text, separated by blank lines."""
    return "".join(
        f"{number}\n{_srt_time(sub.start_s)} --> {_srt_time(sub.end_s)}\n{sub.text}\n\n"
        for number, sub in enumerate(subtitles, start=1)
    )


def narration_questions(narration: Narration, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs that only the subtitles answer."""
    position = rng.randrange(len(narration.animals) - 1)
    return [
        ("Which animal do the subtitles name first? Answer with one word.", narration.animals[0]),
        (f"Which animal do the subtitles name right after the {narration.animals[position]}? Answer with one word.",
         narration.animals[position + 1]),
        ("What gate code do the subtitles give? Answer with the number only.", str(narration.code)),
    ]


def _chat(questions: list[tuple[str, str]]) -> list[Message]:
    messages = []
    for question, answer in questions:
        messages += [Message(role="user", content=question), Message(role="assistant", content=answer)]
    return messages


def synthesize_videos(params: VideoSynthParams, seed: int, video_dir: Path) -> Iterator[VideoRecord]:
    """Render and encode the short then the long videos into `video_dir` (with the long ones'
    .srt files); yield one multi-turn chat per video."""
    rng = random.Random(f"{seed}:video")
    for index in range(params.num_videos):
        scene = random_scene(rng, params.num_frames)
        name = f"video-{index:05d}"
        encode_mp4(
            [render_frame(scene, t, params) for t in range(params.num_frames)], video_dir / f"{name}.mp4", params.fps
        )
        yield VideoRecord(id=name, video=f"{name}.mp4", messages=_chat(scene_questions(scene, rng)))

    # A generator of their own: adding long videos leaves the short ones as they were.
    rng = random.Random(f"{seed}:long-video")
    # The short videos' size and rate with the long frame count, as the renderer reads them.
    long_params = params.model_copy(update={"num_frames": params.long.num_frames})
    for index in range(params.long.num_videos):
        scene, narration = random_scene(rng, long_params.num_frames), random_narration(rng)
        name = f"long-video-{index:05d}"
        encode_mp4(
            [render_frame(scene, t, long_params) for t in range(long_params.num_frames)],
            video_dir / f"{name}.mp4",
            params.fps,
        )
        subtitles = narration_subtitles(narration, long_params.num_frames, params.fps)
        (video_dir / f"{name}.srt").write_text(srt_text(subtitles), encoding="utf-8")
        questions = scene_questions(scene, rng)[:3] + narration_questions(narration, rng)
        rng.shuffle(questions)
        yield VideoRecord(id=name, video=f"{name}.mp4", subtitles=f"{name}.srt", messages=_chat(questions))
