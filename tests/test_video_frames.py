"""Frame sampling and decoding: metadata, index arithmetic, frames equal to PyAV's, bounded memory, clear errors."""

from __future__ import annotations

import platform
import random
import re
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.measure import PeakMemory
from omnilong.config import FrameSampling, VideoSynthParams
from omnilong.data import video_frames
from omnilong.data.synth.video import encode_mp4, random_scene, render_frame
from omnilong.data.video_frames import (
    FrameSample,
    VideoInfo,
    VideoReadError,
    frame_timestamps,
    read_frames,
    sample_frames,
    uniform_frame_indices,
    video_info,
)

NUM_FRAMES, HEIGHT, WIDTH, FPS = 40, 48, 64, 4
# (height, width). decord hands decoded RGB frames out in three ways (see video_frames._open):
# rows without padding (width 64); padded rows copied out row by row (widths 50, 34); padded
# rows whose stride is a multiple of the width, which decord 0.6 takes for extra channels
# (widths 24 and 48 with FFmpeg's 32- or 64-byte row alignment, 72 with 32-byte): those we read
# with PyAV.
SIZES = [(HEIGHT, WIDTH), (40, 50), (36, 34), (64, 48), (48, 72), (32, 24)]
NARROW = (64, 48)


def make_video(path: Path, height: int, width: int, num_frames: int = NUM_FRAMES) -> Path:
    """Keyframes every 16 frames and B-frames (the project's encoder settings): random access
    must seek across GOPs and reorder frames."""
    params = VideoSynthParams(num_frames=num_frames, height=height, width=width, fps=FPS)
    scene = random_scene(random.Random(3), num_frames)
    encode_mp4([render_frame(scene, t, params) for t in range(num_frames)], path, FPS)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[tuple[int, int], Path]:
    directory = tmp_path_factory.mktemp("videos")
    return {(h, w): make_video(directory / f"scene-{h}x{w}.mp4", h, w) for h, w in SIZES}


@pytest.fixture(scope="module")
def video(videos) -> Path:
    return videos[(HEIGHT, WIDTH)]


def pyav_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_video_info_reads_the_container(videos, size):
    info = video_info(videos[size])
    assert (info.num_frames, info.fps, info.height, info.width) == (NUM_FRAMES, FPS, *size)
    assert info.duration_s == pytest.approx(NUM_FRAMES / FPS)


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_frames_equal_pyav_decoding(videos, size):
    # Exact equality: H.264 decoding is bit-exact by the standard, and decord and PyAV both
    # convert yuv420p to rgb24 with FFmpeg's swscale at its defaults (BT.601, limited range).
    # Indices out of order, repeated and across keyframes exercise seeking.
    path = videos[size]
    reference = pyav_frames(path)
    assert reference.shape == (NUM_FRAMES, *size, 3)
    indices = [39, 0, 17, 16, 3, 3, 31, 32, 15]
    frames = read_frames(path, indices)
    assert frames.dtype == np.uint8
    assert frames.shape == (len(indices), *size, 3)
    np.testing.assert_array_equal(frames, reference[indices])
    np.testing.assert_array_equal(read_frames(path, range(NUM_FRAMES)), reference)
    rng = random.Random(size[1])
    for _ in range(10):
        indices = sorted(rng.sample(range(NUM_FRAMES), rng.randint(1, 12)))
        np.testing.assert_array_equal(read_frames(path, indices), reference[indices])


@pytest.mark.skipif(platform.machine() != "x86_64", reason="FFmpeg aligns rows to 16 bytes without AVX")
def test_decord_mislabels_frames_of_narrow_videos(videos):
    # The decord 0.6 bug our PyAV fallback works around (pinned here: if this starts failing
    # after a decord upgrade, the fallback may no longer be needed). 48 pixels are 144 bytes,
    # padded to 192 = 4 * 48 by FFmpeg's row alignment of 32 or 64 bytes (AVX2, AVX-512).
    height, width = NARROW
    reader = decord.VideoReader(str(videos[NARROW]), ctx=decord.cpu(0), num_threads=1)
    assert reader.next().shape == (height, width, 4)
    with pytest.raises(decord.DECORDError, match="size must exactly match"):
        reader.get_batch([0])


def test_narrow_video_fallback_seeks_rather_than_decoding_from_the_start(tmp_path):
    # Reading the first and the last frame decodes a GOP (16 frames) at each end, seeking from
    # one to the other, not the whole video: CPU time, against PyAV decoding every frame (what
    # reading without seeking costs at least).
    # Fresh noise in every frame, so decoding costs time (the scenes' flat areas cost little).
    rng = np.random.default_rng(0)
    path = tmp_path / "noise-narrow.mp4"
    encode_mp4([rng.integers(0, 256, (128, 48, 3), dtype=np.uint8) for _ in range(512)], path, FPS)
    started = time.process_time()
    with av.open(str(path)) as container:
        for _ in container.decode(video=0):
            pass
    decode_all_s = time.process_time() - started
    read_s = []
    for _ in range(3):
        started = time.process_time()
        first_and_last = read_frames(path, [0, 511])
        read_s.append(time.process_time() - started)
    np.testing.assert_array_equal(first_and_last, pyav_frames(path)[[0, 511]])
    assert min(read_s) < 0.5 * decode_all_s, (read_s, decode_all_s)


def test_decoding_goes_in_bounded_batches(video, monkeypatch):
    batch_sizes: list[int] = []
    get_batch = decord.VideoReader.get_batch

    def recording_get_batch(reader, indices):
        batch_sizes.append(len(indices))
        return get_batch(reader, indices)

    monkeypatch.setattr(decord.VideoReader, "get_batch", recording_get_batch)
    monkeypatch.setattr(video_frames, "DECODE_BATCH", 8)
    indices = uniform_frame_indices(NUM_FRAMES, 30)
    frames = read_frames(video, indices)
    assert batch_sizes == [8, 8, 8, 6]
    np.testing.assert_array_equal(frames, pyav_frames(video)[indices])


def pil_resized(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """What the models' preprocessing does to full-size frames (omnilong/models/video_inputs.py)."""
    return np.stack(
        [np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC)) for frame in frames]
    )


@pytest.mark.parametrize("video_size", [(HEIGHT, WIDTH), NARROW], ids=["decord", "pyav-fallback"])
@pytest.mark.parametrize("size", [(24, 32), (56, 70), (HEIGHT, WIDTH)], ids=["down", "up", "same"])
def test_resizing_while_decoding_equals_resizing_afterwards(videos, monkeypatch, video_size, size):
    monkeypatch.setattr(video_frames, "DECODE_BATCH", 8)  # several batches
    path = videos[video_size]
    indices = [39, 2, 2, 5, 11, 17, 18, 20, 23, 24, 30, 33]
    frames = read_frames(path, indices, size=size)
    assert frames.dtype == np.uint8 and frames.shape == (len(indices), *size, 3)
    np.testing.assert_array_equal(frames, pil_resized(read_frames(path, indices), *size))


@pytest.mark.parametrize("video_size", [(96, 128), (192, 48)], ids=["decord", "pyav-fallback"])
def test_resizing_holds_one_batch_of_full_size_frames(tmp_path, monkeypatch, video_size):
    # numpy reports its buffers to tracemalloc, so the traced peak counts every frame array
    # read_frames makes. It may hold one batch of full-size frames (and one more frame being
    # converted) besides its output, and PIL's 64 KiB buffer for handing a resized image to
    # numpy; keeping the previous batch while decoding the next, or resizing after decoding
    # everything, exceeds this.
    batch = 5
    monkeypatch.setattr(video_frames, "DECODE_BATCH", batch)
    path = make_video(tmp_path / "scene.mp4", *video_size)
    size = (8, 8)
    frame_bytes, output_bytes = video_size[0] * video_size[1] * 3, NUM_FRAMES * size[0] * size[1] * 3
    allowed = (batch + 1) * frame_bytes + output_bytes + 80 * 1024
    assert NUM_FRAMES * frame_bytes > 2 * allowed and 2 * batch * frame_bytes > allowed  # the check can fail
    read_frames(path, [0], size=size)  # one-time library state, not frames
    tracemalloc.start()
    try:
        frames = read_frames(path, range(NUM_FRAMES), size=size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(frames, pil_resized(read_frames(path, range(NUM_FRAMES)), *size))
    assert peak <= allowed, (peak, frame_bytes)


def test_decoding_holds_one_batch_of_full_size_frames_in_process_memory(tmp_path, monkeypatch):
    # Peak RSS counts what tracemalloc does not see: the decoders' own buffers. Left alone,
    # decord goes on decoding the rest of the video in the background after each read; with a
    # consumer slower than the decoder (as resizing large frames is) it held ~100 MiB more here
    # (~16 batches). What may stay: one batch of full-size frames, the output, and the
    # decoder's working state (reference frames, buffers: ~16 MiB here).
    batch = 8
    monkeypatch.setattr(video_frames, "DECODE_BATCH", batch)
    resize_into = video_frames._resize_into

    def slow_resize_into(frames, out):
        time.sleep(0.1)
        resize_into(frames, out)

    monkeypatch.setattr(video_frames, "_resize_into", slow_resize_into)
    height = width = 512
    path = make_video(tmp_path / "large.mp4", height, width, num_frames=160)
    indices = list(range(0, 160, 2))
    read_frames(path, [0], size=(32, 32))  # one-time library state, not frames
    meter = PeakMemory(torch.device("cpu"))
    meter.reset()
    frames = read_frames(path, indices, size=(32, 32))
    peak = meter.peak_above_baseline()
    assert frames.shape == (len(indices), 32, 32, 3)
    frame_bytes = height * width * 3
    assert peak <= batch * frame_bytes + frames.nbytes + 32 * 2**20, (peak / 2**20, frame_bytes / 2**20)


@pytest.mark.parametrize("num_total,num_frames", [(40, 16), (48, 48), (100, 7), (7, 3), (1, 1), (3, 8), (1, 5)])
def test_uniform_indices_properties(num_total, num_frames):
    indices = uniform_frame_indices(num_total, num_frames)
    assert len(indices) == num_frames
    assert all(0 <= i < num_total for i in indices)
    assert indices == sorted(indices)
    if num_frames <= num_total:
        assert len(set(indices)) == num_frames
    else:  # every frame is used, as evenly as possible
        counts = np.bincount(indices, minlength=num_total)
        assert counts.min() >= num_frames // num_total and counts.max() <= -(-num_frames // num_total)
    # Frame `index` spans [index, index + 1) in frame units and must cover the centre of segment i.
    for i, index in enumerate(indices):
        assert index <= (i + 0.5) * num_total / num_frames < index + 1
    assert uniform_frame_indices(num_total, num_frames) == indices


def test_uniform_indices_are_segment_centres():
    assert uniform_frame_indices(40, 4) == [5, 15, 25, 35]
    assert uniform_frame_indices(48, 16) == list(range(1, 48, 3))
    assert uniform_frame_indices(2, 4) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="num_frames >= 1"):
        uniform_frame_indices(10, 0)
    with pytest.raises(ValueError, match="num_total >= 1"):
        uniform_frame_indices(0, 4)


def test_frame_timestamps(video):
    assert frame_timestamps(video_info(video), [0, 4, 39]) == [0.0, 1.0, 9.75]


INFO = VideoInfo(num_frames=40, fps=4.0, height=HEIGHT, width=WIDTH, duration_s=10.0)


@pytest.mark.parametrize(
    "sampling,window,expected",
    [
        # num_frames: centres of equal segments of the window's frames, at num_frames / window seconds.
        ({"num_frames": 4}, (None, None), FrameSample([5, 15, 25, 35], [1.25, 3.75, 6.25, 8.75], 0.4)),
        ({"num_frames": 4}, (2.0, 6.0), FrameSample([10, 14, 18, 22], [2.5, 3.5, 4.5, 5.5], 1.0)),
        # The window's frames are those on screen in it: 2.1 s is in frame 8, 5.9 s in frame 23.
        ({"num_frames": 4}, (2.1, 5.9), FrameSample([10, 14, 18, 22], [2.5, 3.5, 4.5, 5.5], 4 / 3.8)),
        ({"num_frames": 3}, (9.0, None), FrameSample([36, 38, 39], [9.0, 9.5, 9.75], 3.0)),
        ({"num_frames": 6}, (0.0, 1.0), FrameSample([0, 1, 1, 2, 3, 3], [0, 0.25, 0.25, 0.5, 0.75, 0.75], 6.0)),
        # fps: the frames on screen at start + (k + 1/2) / fps.
        ({"fps": 1}, (None, None), FrameSample(list(range(2, 40, 4)), [k + 0.5 for k in range(10)], 1.0)),
        ({"fps": 0.5}, (3.0, 7.0), FrameSample([16, 24], [4.0, 6.0], 0.5)),
        ({"fps": 2}, (0.3, 1.5), FrameSample([2, 4], [0.5, 1.0], 2.0)),  # 0.55 s and 1.05 s
        ({"fps": 8}, (0.0, 1.0), FrameSample([0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75], 8.0)),
        (
            {"fps": 1, "max_frames": 10},
            (None, None),
            FrameSample(list(range(2, 40, 4)), [k + 0.5 for k in range(10)], 1.0),
        ),
        # Over max_frames: max_frames uniformly, at max_frames / window seconds.
        ({"fps": 1, "max_frames": 5}, (None, None), FrameSample([4, 12, 20, 28, 36], [1.0, 3.0, 5.0, 7.0, 9.0], 0.5)),
        ({"fps": 4, "max_frames": 2}, (2.0, 4.0), FrameSample([10, 14], [2.5, 3.5], 1.0)),
        # No (k + 1/2) / fps inside the window: one frame, its centre.
        ({"fps": 0.1}, (0.0, 4.0), FrameSample([8], [2.0], 0.25)),
        # An end up to one frame past the video's end is its end.
        ({"num_frames": 4}, (0.0, 10.2), FrameSample([5, 15, 25, 35], [1.25, 3.75, 6.25, 8.75], 0.4)),
    ],
)
def test_sample_frames(sampling, window, expected):
    sample = sample_frames(INFO, FrameSampling(**sampling), *window)
    assert sample.indices == expected.indices
    assert sample.timestamps == pytest.approx(expected.timestamps, abs=1e-12)
    assert sample.sampled_fps == pytest.approx(expected.sampled_fps, rel=1e-12)
    assert sample.timestamps == frame_timestamps(INFO, sample.indices)


def test_sample_frames_at_window_times_with_float_error():
    # At 30000/1001 fps, 1001 / 30000 * k seconds is frame k, but k / fps in floats is off by
    # an ulp either way; windows starting and ending on frames must not gain or lose one.
    fps = 30000 / 1001
    info = VideoInfo(num_frames=3000, fps=fps, height=HEIGHT, width=WIDTH, duration_s=3000 / fps)
    for first in range(1, 2990, 37):
        start_s, end_s = first / fps, (first + 10) / fps
        sample = sample_frames(info, FrameSampling(num_frames=10), start_s, end_s)
        assert sample.indices == list(range(first, first + 10)), first


@pytest.mark.parametrize(
    "window", [(-0.5, None), (4.0, 4.0), (6.0, 5.0), (10.0, None), (0.0, 10.3), (float("nan"), None)]
)
def test_sample_frames_rejects_windows_outside_the_video(window):
    with pytest.raises(ValueError, match=r"start_s=.*, end_s=.* does not fit the video of 10\.000 s \(40 frames"):
        sample_frames(INFO, FrameSampling(num_frames=4), *window)


def make_unreadable(kind: str, directory: Path, good_video: Path) -> Path:
    path = directory / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(10_000))
    elif kind == "truncated":  # mp4 writes its index (moov) last: half a file has none
        path.write_bytes(good_video.read_bytes()[: good_video.stat().st_size // 2])
    elif kind == "truncated-after-index":  # the index first (faststart), then half the frame data
        encode_mp4(pyav_frames(good_video), path, FPS, faststart=True)  # reproducible bytes: the same cut
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])
    elif kind == "zero-frames":  # a valid mp4 whose H.264 stream never got a frame
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            container.start_encoding()
    elif kind == "audio-only":
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("aac", rate=16_000)
            for index in range(8):
                samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                samples.sample_rate, samples.pts, samples.time_base = 16_000, index * 1024, Fraction(1, 16_000)
                container.mux(stream.encode(samples))
            container.mux(stream.encode())
    return path


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("missing", "no such video file"),
        ("empty", "empty file"),
        ("random-bytes", "cannot be read as a video"),
        ("truncated", "corrupt or truncated file"),
        ("truncated-after-index", "corrupt or truncated file"),
        ("zero-frames", "no video stream with frames"),
        ("audio-only", "no video stream with frames.*cannot find video stream"),
    ],
)
def test_unreadable_videos_raise_naming_the_file(tmp_path, video, kind, reason):
    path = make_unreadable(kind, tmp_path, video)
    if kind == "audio-only":  # a real audio stream, and nothing else
        with av.open(str(path)) as container:
            assert [stream.type for stream in container.streams] == ["audio"]
    for read in (video_info, lambda p: read_frames(p, [0])):
        with pytest.raises(VideoReadError, match=reason) as caught:
            read(path)
        assert str(caught.value).startswith(f"{path}: ")
        assert isinstance(caught.value, ValueError)


def test_out_of_range_index_names_the_file(video):
    with pytest.raises(VideoReadError, match=re.escape(f"{video}: frame index {NUM_FRAMES} is out of range")):
        read_frames(video, [0, NUM_FRAMES])
    with pytest.raises(VideoReadError, match="frame index -1"):
        read_frames(video, [-1])
