"""Video metadata and frame sampling with decord: only the frames a sample needs are decoded.

Videos are never stored as frames: a packed video sample names a file and frame indices, and
the frames are decoded here at load time. Decoding goes through decord's default (numpy-like)
bridge; callers convert to tensors themselves.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import decord
import numpy as np

# Frames decoded per decord call: bounds the memory of one call whatever the sample asks for.
DECODE_BATCH = 32
# Data-loader workers parallelise across videos; one decoder thread each avoids oversubscription.
DECODE_THREADS = 1
# decord's messages start with a time and the C++ source line, e.g. "[16:10:25] video_reader.cc:151: ".
_DECORD_PREFIX = re.compile(r"^\[[\d:]+\]\s*\S+:\d+:\s*")


class VideoReadError(ValueError):
    """A video that cannot be used: missing, empty, corrupt, truncated or without frames."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int
    duration_s: float


def _decord_reason(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return _DECORD_PREFIX.sub("", lines[0]) if lines else type(exc).__name__


def _open(path: Path) -> decord.VideoReader:
    if not path.is_file():
        raise VideoReadError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes), expected a video")
    try:
        # decord asserts a positive frame count on opening, so a zero-frame video fails here too.
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=DECODE_THREADS)
    except (decord.DECORDError, RuntimeError, AssertionError) as exc:
        raise VideoReadError(
            f"{path}: cannot be read as a video (corrupt or truncated file, or no video stream with "
            f"frames): {_decord_reason(exc)}"
        ) from None
    if len(reader) <= 0:
        raise VideoReadError(f"{path}: the video stream has no frames")
    return reader


def _decode(reader: decord.VideoReader, path: Path, indices: Sequence[int]) -> np.ndarray:
    """uint8 [len(indices), H, W, 3]; a frame that fails to decode raises VideoReadError."""
    try:
        return reader.get_batch(list(indices)).asnumpy()
    except (decord.DECORDError, RuntimeError) as exc:
        raise VideoReadError(
            f"{path}: frames {indices[0]}..{indices[-1]} could not be decoded (corrupt or truncated "
            f"file): {_decord_reason(exc)}"
        ) from None


def video_info(path: str | Path) -> VideoInfo:
    """Frame count and rate from the container's index; decodes the first frame only, for its size."""
    path = Path(path)
    reader = _open(path)
    num_frames, fps = len(reader), reader.get_avg_fps()
    if not fps > 0:
        raise VideoReadError(f"{path}: the video stream reports no frame rate (got {fps})")
    _, height, width, _ = _decode(reader, path, [0]).shape
    return VideoInfo(num_frames=num_frames, fps=fps, height=height, width=width, duration_s=num_frames / fps)


def uniform_frame_indices(num_total: int, num_frames: int) -> list[int]:
    """The centre frame of each of `num_frames` equal segments of `num_total` frames.

    Sorted; distinct when `num_frames <= num_total`, and repeating frames when more are asked
    for than the video has. Integer arithmetic: `floor((i + 1/2) * num_total / num_frames)`.
    """
    if num_total < 1 or num_frames < 1:
        raise ValueError(f"expected num_total >= 1 and num_frames >= 1, given {num_total} and {num_frames}")
    return [(2 * i + 1) * num_total // (2 * num_frames) for i in range(num_frames)]


def frame_timestamps(info: VideoInfo, indices: Sequence[int]) -> list[float]:
    """Start time in seconds of each frame, at the video's average frame rate."""
    return [index / info.fps for index in indices]


def read_frames(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """uint8 [len(indices), H, W, 3] RGB frames at `indices` (in the given order, repeats allowed).

    The distinct indices are decoded in ascending order, `DECODE_BATCH` at a time, so decord
    seeks forward only and no call holds more than one batch of decoded frames.
    """
    path = Path(path)
    reader = _open(path)
    wanted = np.asarray(indices, dtype=np.int64)
    bad = wanted[(wanted < 0) | (wanted >= len(reader))]
    if bad.size:
        raise VideoReadError(f"{path}: frame index {int(bad[0])} is out of range for a video of {len(reader)} frames")
    if not wanted.size:
        raise VideoReadError(f"{path}: no frame indices given")
    distinct, position = np.unique(wanted, return_inverse=True)
    frames: np.ndarray | None = None  # uint8 [len(distinct), H, W, 3]
    for start in range(0, len(distinct), DECODE_BATCH):
        batch = _decode(reader, path, distinct[start : start + DECODE_BATCH].tolist())
        if frames is None:
            frames = np.empty((len(distinct), *batch.shape[1:]), dtype=np.uint8)
        frames[start : start + len(batch)] = batch
    assert frames is not None
    # Strictly increasing indices (uniform sampling of a long enough video) need no gathering copy.
    return frames if len(distinct) == len(wanted) and bool((np.diff(wanted) > 0).all()) else frames[position]
