"""Video metadata, frame sampling and decoding: only the frames a sample needs are decoded.

Videos are never stored as frames: a packed video sample names a file and frame indices, and
the frames are decoded here at load time, with decord, or with PyAV for the videos decord
decodes wrongly (see `_open`). Frames come back as uint8 numpy arrays; callers convert to
tensors themselves.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from omnilong.config import FrameSampling

if TYPE_CHECKING:  # the decoders are imported where frames are decoded: text stages need neither
    import av
    import decord

# Frames decoded per decoder call: bounds the memory of one call whatever the sample asks for.
DECODE_BATCH = 32
# Data-loader workers parallelise across videos; one decoder thread each avoids oversubscription.
DECODE_THREADS = 1
# decord's messages start with a time and the C++ source line, e.g. "[16:10:25] video_reader.cc:151: ".
_DECORD_PREFIX = re.compile(r"^\[[\d:]+\]\s*\S+:\d+:\s*")
# Times in seconds times a frame rate are a frame position up to float error (0.1 * 30 is
# 3.0000000000000004); positions this close to a whole frame count as that frame.
_FRAME_TOLERANCE = 1e-6


class VideoReadError(ValueError):
    """A video that cannot be used: missing, empty, corrupt, truncated or without frames."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int
    duration_s: float


@dataclass(frozen=True)
class FrameSample:
    indices: list[int]
    """Sorted frame indices into the video."""
    timestamps: list[float]
    """Seconds from the start of the video, one per index (index / the video's fps)."""
    sampled_fps: float
    """The rate the sampled frames play at (Qwen2.5-VL's fps for second_per_grid_ts)."""


def _decord_reason(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return _DECORD_PREFIX.sub("", lines[0]) if lines else type(exc).__name__


def _unreadable(path: Path, reason: str) -> VideoReadError:
    return VideoReadError(
        f"{path}: cannot be read as a video (corrupt or truncated file, or no video stream with frames): {reason}"
    )


def _undecodable(path: Path, indices: Sequence[int], reason: str) -> VideoReadError:
    return VideoReadError(
        f"{path}: frames {indices[0]}..{indices[-1]} could not be decoded (corrupt or truncated file): {reason}"
    )


def _stop_decoding_ahead(reader: decord.VideoReader) -> None:
    """decord 0.6 bug (dmlc/decord#157, #208): after a read returns, its decoder thread goes on
    decoding the rest of the video into RGB frames held in memory, as fast as it can, until the
    next read. While we resize a batch it would fill memory with frames nobody asked for (the
    whole rest of the video, given time) and take a core. A seek stops that thread; the next
    read seeks to its frame anyway."""
    reader.seek(0)


class _DecordVideo:
    def __init__(self, path: Path, reader: decord.VideoReader, height: int, width: int):
        self.path, self._reader = path, reader
        self.num_frames, self.fps = len(reader), reader.get_avg_fps()
        self.height, self.width = height, width

    def decode(self, indices: list[int]) -> np.ndarray:
        """uint8 [len(indices), H, W, 3] for ascending `indices`."""
        import decord
        from torch.utils.dlpack import from_dlpack  # here: reading a video's metadata needs no torch

        try:
            # Zero-copy through DLPack: asnumpy() copies the batch, which at least doubles the
            # memory a batch of full-size frames takes.
            frames = from_dlpack(self._reader.get_batch(indices).to_dlpack()).numpy()
            _stop_decoding_ahead(self._reader)
        except (decord.DECORDError, RuntimeError) as exc:
            raise _undecodable(self.path, indices, _decord_reason(exc)) from None
        return frames


class _PyAVVideo:
    """Frames by index with PyAV, numbered as decord numbers them: the video stream's packets
    sorted by presentation time (decord's index of the file, built the same way on opening).

    Each wanted frame is decoded forward from the last one, or from the keyframe at or before it
    when that keyframe lies beyond the last frame decoded (a seek then skips the frames between).
    """

    def __init__(self, path: Path):
        import av

        self.path = path
        try:
            self._container = av.open(str(path))
            self._stream = self._container.streams.video[0]
            self._stream.codec_context.thread_count = DECODE_THREADS
            # demux ends with an empty flush packet, which has no pts.
            packets = [(p.pts, p.is_keyframe) for p in self._container.demux(self._stream) if p.pts is not None]
        except (av.FFmpegError, IndexError) as exc:
            raise _unreadable(path, str(exc) or type(exc).__name__) from None
        self._frame_pts = sorted(pts for pts, _ in packets)
        self._keyframe_pts = sorted(pts for pts, is_keyframe in packets if is_keyframe)
        self.num_frames = len(self._frame_pts)
        self.fps = float(self._stream.average_rate or 0)
        self.height, self.width = self._stream.codec_context.height, self._stream.codec_context.width
        self._frames: Iterator[av.VideoFrame] | None = None
        self._last_pts = -math.inf

    def decode(self, indices: list[int]) -> np.ndarray:
        """uint8 [len(indices), H, W, 3] for ascending `indices`."""
        import av

        frames = np.empty((len(indices), self.height, self.width, 3), dtype=np.uint8)
        try:
            for slot, index in enumerate(indices):
                frames[slot] = self._decode_frame(index)
        except av.FFmpegError as exc:
            raise _undecodable(self.path, indices, str(exc)) from None
        return frames

    def _decode_frame(self, index: int) -> np.ndarray:
        target = self._frame_pts[index]
        keyframes_at_or_before = bisect_right(self._keyframe_pts, target)
        keyframe = self._keyframe_pts[keyframes_at_or_before - 1] if keyframes_at_or_before else self._frame_pts[0]
        if self._frames is None or keyframe > self._last_pts:
            # Backward to the keyframe at or before `keyframe` (PyAV's default), decoder flushed.
            self._container.seek(keyframe, stream=self._stream)
            self._frames = self._container.decode(self._stream)
        for frame in self._frames:
            if frame.pts == target:
                self._last_pts = target
                return frame.to_ndarray(format="rgb24")
            if frame.pts is not None and frame.pts > target:
                break
        raise _undecodable(self.path, [index], f"frame {index} (pts {target}) is missing from the decoded stream")


def _open(path: Path) -> _DecordVideo | _PyAVVideo:
    import decord

    if not path.is_file():
        raise VideoReadError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes), expected a video")
    try:
        # decord asserts a positive frame count on opening, so a zero-frame video fails here too.
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=DECODE_THREADS)
        first_frame = reader.next()
        _stop_decoding_ahead(reader)
    except (decord.DECORDError, RuntimeError, AssertionError, StopIteration) as exc:
        if _has_undecodable_video_stream(path):
            raise VideoReadError(
                f"{path}: the codec of its video stream is not one FFmpeg can decode here; expected a video "
                "in a common codec (H.264, HEVC, VP9, AV1, ...)"
            ) from None
        raise _unreadable(path, _decord_reason(exc)) from None
    height, width, channels = first_frame.shape
    # decord 0.6 bug: it hands out a decoded RGB frame without copying when the frame's row
    # stride (FFmpeg's linesize) is a multiple of its width, with linesize / width as the
    # channel count. FFmpeg pads rows to 16, 32 or 64 bytes (by CPU), so for some narrow
    # widths the stride is 4 or more bytes per pixel: with 32-byte rows (AVX2), even widths 16,
    # 24, 48 and 72 (48 * 3 = 144 bytes are padded to 192 = 4 * 48); with 64-byte rows, 16, 24,
    # 32, 48, 96 and 144. Single frames then come back [H, W, 4] holding padding, and
    # `get_batch` fails ("DECORDArrayCopyFromTo: The size must exactly match"). The bad stride
    # shows on the first decoded frame, and is the same for all frames of a video (one frame
    # size, one buffer layout), so it is detected here; PyAV reads such videos.
    if channels != 3:
        video: _DecordVideo | _PyAVVideo = _PyAVVideo(path)
    else:
        video = _DecordVideo(path, reader, height, width)
    if video.num_frames <= 0:
        raise VideoReadError(f"{path}: the video stream has no frames")
    return video


def _has_undecodable_video_stream(path: Path) -> bool:
    """Whether the container opens and holds a video stream whose codec has no decoder (PyAV then
    gives it no codec context), which decord reports only as a missing video stream."""
    import av

    try:
        with av.open(str(path)) as container:
            return any(stream.codec_context is None for stream in container.streams.video)
    except (av.FFmpegError, OSError):
        return False


def video_info(path: str | Path) -> VideoInfo:
    """Frame count and rate from the container's index; decodes the first frame only, for its size."""
    path = Path(path)
    video = _open(path)
    if not video.fps > 0:
        raise VideoReadError(f"{path}: the video stream reports no frame rate (got {video.fps})")
    return VideoInfo(
        num_frames=video.num_frames,
        fps=video.fps,
        height=video.height,
        width=video.width,
        duration_s=video.num_frames / video.fps,
    )


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


def window_bounds(info: VideoInfo, start_s: float | None, end_s: float | None) -> tuple[float, float]:
    """[start, end) in seconds; None is the video's start or end."""
    start = 0.0 if start_s is None else start_s
    end = info.duration_s if end_s is None else end_s
    # Annotated times are rounded: an end up to one frame past the video's end means its end.
    if not (0 <= start < min(end, info.duration_s) and end <= info.duration_s + 1 / info.fps):
        raise ValueError(
            f"frame window start_s={start_s}, end_s={end_s} does not fit the video of {info.duration_s:.3f} s "
            f"({info.num_frames} frames at {info.fps:g} fps): expected 0 <= start_s < end_s <= the duration"
        )
    return start, min(end, info.duration_s)


def _uniform_sample(info: VideoInfo, start_s: float, end_s: float, num_frames: int) -> FrameSample:
    """`num_frames` segment centres of the frames shown during [start_s, end_s)."""
    first = min(math.floor(start_s * info.fps + _FRAME_TOLERANCE), info.num_frames - 1)
    stop = min(max(math.ceil(end_s * info.fps - _FRAME_TOLERANCE), first + 1), info.num_frames)
    indices = [first + offset for offset in uniform_frame_indices(stop - first, num_frames)]
    return FrameSample(indices, frame_timestamps(info, indices), num_frames / (end_s - start_s))


def sample_frames(
    info: VideoInfo, sampling: FrameSampling, start_s: float | None = None, end_s: float | None = None
) -> FrameSample:
    """The frames a model sees of the video's [start_s, end_s) window (None: the whole video).

    num_frames: the centre frames of `num_frames` equal segments of the window's frames, which
    play at num_frames / the window's duration. fps: the frames on screen at
    start_s + (k + 1/2) / fps for k = 0, 1, ... within the window; beyond `max_frames` of them,
    `max_frames` uniformly instead, and at least one.
    """
    start_s, end_s = window_bounds(info, start_s, end_s)
    if sampling.num_frames is not None:
        return _uniform_sample(info, start_s, end_s, sampling.num_frames)
    assert sampling.fps is not None  # FrameSampling sets exactly one of num_frames and fps
    count = max(0, math.ceil((end_s - start_s) * sampling.fps - 0.5 - _FRAME_TOLERANCE))
    if count == 0:
        return _uniform_sample(info, start_s, end_s, 1)
    if sampling.max_frames is not None and count > sampling.max_frames:
        return _uniform_sample(info, start_s, end_s, sampling.max_frames)
    times = [start_s + (k + 0.5) / sampling.fps for k in range(count)]
    indices = [min(math.floor(t * info.fps + _FRAME_TOLERANCE), info.num_frames - 1) for t in times]
    return FrameSample(indices, frame_timestamps(info, indices), sampling.fps)


def _resize_into(frames: np.ndarray, out: np.ndarray) -> None:
    """uint8 [B, H, W, 3] -> out [B, height, width, 3], PIL bicubic on uint8 as the models'
    preprocessing resizes (omnilong/models/video_inputs.py), so resizing here changes nothing there."""
    height, width = out.shape[1:3]
    for frame, resized in zip(frames, out):
        resized[...] = np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))


def read_frames(path: str | Path, indices: Sequence[int], size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [len(indices), H, W, 3] RGB frames at `indices` (in the given order, repeats allowed).

    The distinct indices are decoded in ascending order, `DECODE_BATCH` at a time, so the
    decoder seeks forward only and holds at most one batch of decoded frames. With
    size=(height, width) each batch is resized as soon as it is decoded, so a long sample
    never holds more than one batch of full-size frames.
    """
    path = Path(path)
    if size is not None and not (len(size) == 2 and min(size) >= 1):
        raise ValueError(f"size must be (height, width) of positive ints, given {size}")
    video = _open(path)
    wanted = np.asarray(indices, dtype=np.int64)
    bad = wanted[(wanted < 0) | (wanted >= video.num_frames)]
    if bad.size:
        raise VideoReadError(
            f"{path}: frame index {int(bad[0])} is out of range for a video of {video.num_frames} frames"
        )
    if not wanted.size:
        raise VideoReadError(f"{path}: no frame indices given")
    distinct, position = np.unique(wanted, return_inverse=True)
    height, width = size or (video.height, video.width)
    frames = np.empty((len(distinct), height, width, 3), dtype=np.uint8)
    for start in range(0, len(distinct), DECODE_BATCH):
        batch_indices = distinct[start : start + DECODE_BATCH].tolist()
        batch = video.decode(batch_indices)
        if size is None:
            frames[start : start + len(batch)] = batch
        else:
            _resize_into(batch, frames[start : start + len(batch)])
        del batch  # else it lives on while the next batch is decoded: two batches of full-size frames
    # Strictly increasing indices (uniform sampling of a long enough video) need no gathering copy.
    return frames if len(distinct) == len(wanted) and bool((np.diff(wanted) > 0).all()) else frames[position]
