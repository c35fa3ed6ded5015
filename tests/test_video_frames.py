"""decord frame sampling: metadata, index arithmetic, frames equal to PyAV's, clear errors."""

from __future__ import annotations

import random
import re
from pathlib import Path

import av
import decord
import numpy as np
import pytest

from omnilong.config import VideoSynthParams
from omnilong.data import video_frames
from omnilong.data.synth.video import encode_mp4, random_scene, render_frame
from omnilong.data.video_frames import (
    VideoReadError,
    frame_timestamps,
    read_frames,
    uniform_frame_indices,
    video_info,
)

NUM_FRAMES, HEIGHT, WIDTH, FPS = 40, 48, 64, 4


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """40 frames, keyframes at 0, 16 and 32, B-frames: random access must seek across GOPs."""
    params = VideoSynthParams(num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, fps=FPS)
    scene = random_scene(random.Random(3), NUM_FRAMES)
    path = tmp_path_factory.mktemp("video") / "scene.mp4"
    encode_mp4([render_frame(scene, t, params) for t in range(NUM_FRAMES)], path, FPS)
    return path


def pyav_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_video_info_reads_the_container(video):
    info = video_info(video)
    assert (info.num_frames, info.fps, info.height, info.width) == (NUM_FRAMES, FPS, HEIGHT, WIDTH)
    assert info.duration_s == pytest.approx(NUM_FRAMES / FPS)


def test_frames_equal_pyav_decoding(video):
    # Exact equality: H.264 decoding is bit-exact by the standard, and decord and PyAV both
    # convert yuv420p to rgb24 with FFmpeg's swscale at its defaults (BT.601, limited range).
    # Indices out of order, repeated and across keyframes exercise decord's seeking.
    reference = pyav_frames(video)
    assert reference.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    indices = [39, 0, 17, 16, 3, 3, 31, 32, 15]
    frames = read_frames(video, indices)
    assert frames.dtype == np.uint8
    assert frames.shape == (len(indices), HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(frames, reference[indices])
    np.testing.assert_array_equal(read_frames(video, range(NUM_FRAMES)), reference)


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


def make_unreadable(kind: str, directory: Path, good_video: Path) -> Path:
    path = directory / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(bytes(range(256)) * 40)
    elif kind == "truncated":  # mp4 writes its index (moov) last: half a file has none
        path.write_bytes(good_video.read_bytes()[: good_video.stat().st_size // 2])
    elif kind == "zero-frames":  # a valid mp4 whose H.264 stream never got a frame
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            container.start_encoding()
    return path


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("missing", "no such video file"),
        ("empty", "empty file"),
        ("corrupt", "cannot be read as a video"),
        ("truncated", "corrupt or truncated file"),
        ("zero-frames", "no video stream with frames"),
    ],
)
def test_unreadable_videos_raise_naming_the_file(tmp_path, video, kind, reason):
    path = make_unreadable(kind, tmp_path, video)
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
