"""Video input: decode throughput of our frame sampler against a plain PyAV loop, and the vision
encoder's per-rank peak memory with sharded encoding (P=2) against P=1.

    python -m benchmarks.video_input [--quick]

The video: a synthetic scene of the default corpus's kind (omnilong/data/synth/video.py),
`--frames` frames of `--height` x `--width` at `--video-fps`, encoded with the project's
encoder settings (H.264, a keyframe every 16 frames, B-frames) into a temporary directory;
`--content noise` draws fresh noise in every frame instead, so that decoding, not the colour
conversion, dominates. The frames: `sample_frames` with fps=`--sample-fps`,
max_frames=`--max-frames` (by default the 7B recipes' 1 frame per second, at most 1024).

- ours: `read_frames(path, sample.indices)`: decord (PyAV for the widths decord mishandles),
  DECODE_BATCH frames per call. decord decodes forward within a GOP and seeks to the keyframe
  of each wanted frame in another GOP (two seeks and two restarts of its decoder thread per
  jump), converting only the wanted frames to RGB.
- plain PyAV: open the file, decode every frame in order up to the last wanted one, and
  convert the wanted ones to rgb24 arrays, into a preallocated output as ours does.
So decoding the skipped frames (PyAV) is set against seeking past them (ours). With a wanted
frame in every GOP (the default: 1 frame in 8, GOPs of 16) the two come out about even on an
idle machine, and ours loses on a busy one (decord's threads wait for a core at each handoff);
with whole GOPs skipped (e.g. --sample-fps 0.125) ours wins. Both decode with one codec thread
(a data-loader worker's setting; decord's runs beside the calling thread) and start from the
file each time; both return the same frames, which is asserted.
frames/s = sampled frames / wall time, the fastest of `--repeats` calls (the two taking turns);
ratio = ours / PyAV. Memory, measured on separate calls: the traced peak (tracemalloc: the numpy
arrays and Python objects the call makes) and the peak RSS above the RSS before the call
(benchmarks/measure.py), which also counts the decoders' own buffers.
The encoder part: benchmarks/vision_encoder_memory.py (`--encoder-frames` frames).
The last line printed is one JSON object: {"benchmark": "video_input", "decode": {...}, "encoder": {...}}.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch

from benchmarks.measure import PeakMemory, emit_summary
from benchmarks.vision_encoder_memory import EncoderSetup, encoder_memory
from omnilong.config import FrameSampling, VideoSynthParams
from omnilong.data.synth.video import encode_mp4, random_scene, render_frame
from omnilong.data.video_frames import (
    DECODE_THREADS,
    read_frames,
    sample_frames,
    video_info,
)

FULL = {"frames": 2048, "height": 224, "width": 224, "encoder_frames": 256, "encoder_side": 112,
        "vision_hidden": 256, "vision_depth": 4}
QUICK = {"frames": 384, "height": 112, "width": 112, "encoder_frames": 64, "encoder_side": 56,
         "vision_hidden": 128, "vision_depth": 2}
SEED = 0


def make_video(path: Path, args: argparse.Namespace) -> None:
    if args.content == "noise":
        rng = np.random.default_rng(SEED)
        frames = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.frames)]
    else:
        params = VideoSynthParams(num_frames=args.frames, height=args.height, width=args.width, fps=args.video_fps)
        scene = random_scene(random.Random(SEED), args.frames)
        frames = [render_frame(scene, t, params) for t in range(args.frames)]
    encode_mp4(frames, path, args.video_fps)


def pyav_frames(path: Path, indices: list[int]) -> np.ndarray:
    """The plain loop: decode every frame in order, keep the wanted ones as uint8 [T, H, W, 3]."""
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        slots.setdefault(index, []).append(slot)
    last = max(indices)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = DECODE_THREADS
        height, width = stream.codec_context.height, stream.codec_context.width
        frames = np.empty((len(indices), height, width, 3), dtype=np.uint8)
        for index, frame in enumerate(container.decode(stream)):
            if index in slots:
                frames[slots[index]] = frame.to_ndarray(format="rgb24")
            if index == last:
                break
    return frames


def _measure(calls: dict[str, Callable[[], np.ndarray]], repeats: int) -> dict[str, dict]:
    """Per call: the fastest wall time of `repeats` (the calls taking turns, in alternating
    order, so a busy spell of the machine slows both), then the traced and RSS peaks of one more
    call each."""
    results: dict[str, dict] = {name: {"wall_s_samples": [], "cpu_s_samples": []} for name in calls}
    for repeat in range(repeats):
        for name in list(calls)[:: 1 if repeat % 2 == 0 else -1]:
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            calls[name]()
            results[name]["wall_s_samples"].append(time.perf_counter() - wall_start)
            results[name]["cpu_s_samples"].append(time.process_time() - cpu_start)
    meter = PeakMemory(torch.device("cpu"))
    for name, call in calls.items():
        tracemalloc.start()
        call()
        results[name]["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        meter.reset()
        call()
        results[name]["rss_peak_bytes"] = meter.peak_above_baseline()
        results[name]["wall_s"] = min(results[name]["wall_s_samples"])
        results[name]["cpu_s"] = min(results[name]["cpu_s_samples"])
    return results


def decode_throughput(args: argparse.Namespace) -> dict:
    sampling = FrameSampling(fps=args.sample_fps, max_frames=args.max_frames)
    with tempfile.TemporaryDirectory(prefix="video_input_bench.") as directory:
        path = Path(directory) / "video.mp4"
        started = time.perf_counter()
        make_video(path, args)
        print(
            f"video: {args.frames} frames of {args.height}x{args.width} ({args.content}) at {args.video_fps} fps, "
            f"{path.stat().st_size / 2**20:.1f} MiB, encoded in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        info = video_info(path)
        indices = sample_frames(info, sampling).indices
        print(f"sampled: {len(indices)} frames ({sampling.model_dump(exclude_none=True)})", flush=True)
        ours_frames, pyav = read_frames(path, indices), pyav_frames(path, indices)  # also warm-ups
        if not np.array_equal(ours_frames, pyav):
            raise AssertionError("read_frames and the plain PyAV loop returned different frames")
        del ours_frames, pyav
        load_before = os.getloadavg()[0]
        results = _measure(
            {"ours": lambda: read_frames(path, indices), "pyav": lambda: pyav_frames(path, indices)}, args.repeats
        )
    for name, result in results.items():
        result["frames_per_s"] = len(indices) / result["wall_s"]
        print(
            f"{name:5s} {result['frames_per_s']:8.1f} frames/s  wall {result['wall_s']:6.3f} s  "
            f"cpu {result['cpu_s']:6.3f} s  traced peak {result['traced_peak_bytes'] / 2**20:7.1f} MiB  "
            f"RSS peak {result['rss_peak_bytes'] / 2**20:7.1f} MiB",
            flush=True,
        )
    ours, pyav = results["ours"], results["pyav"]
    return {
        "frames_per_s_ratio": ours["frames_per_s"] / pyav["frames_per_s"],
        "ours_frames_per_s": ours["frames_per_s"],
        "pyav_frames_per_s": pyav["frames_per_s"],
        "cpu_time_ratio": ours["cpu_s"] / pyav["cpu_s"],
        "traced_peak_mib": {name: round(r["traced_peak_bytes"] / 2**20, 2) for name, r in results.items()},
        "rss_peak_mib": {name: round(r["rss_peak_bytes"] / 2**20, 2) for name, r in results.items()},
        "wall_s": {name: [round(t, 4) for t in r["wall_s_samples"]] for name, r in results.items()},
        "sampled_frames": len(indices),
        "output_mib": round(len(indices) * args.height * args.width * 3 / 2**20, 2),
        "video": {
            "frames": args.frames,
            "height": args.height,
            "width": args.width,
            "fps": args.video_fps,
            "content": args.content,
        },
        "sampling": sampling.model_dump(exclude_none=True),
        "load_avg_1m": round(load_before, 2),  # other processes on the machine make wall times noisy
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small video, well under a minute")
    parser.add_argument("--frames", type=int, help=f"video length (default {FULL['frames']}; {QUICK['frames']} quick)")
    parser.add_argument("--height", type=int, help=f"default {FULL['height']}; {QUICK['height']} quick")
    parser.add_argument("--width", type=int, help=f"default {FULL['width']}; {QUICK['width']} quick")
    parser.add_argument("--video-fps", type=int, default=8)
    parser.add_argument("--content", choices=["scene", "noise"], default="scene")
    parser.add_argument("--sample-fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each (the fastest counts)")
    parser.add_argument("--encoder-frames", type=int, help="frames of the encoder part's video")
    parser.add_argument("--encoder-side", type=int, help="the encoder part's frames are side x side")
    parser.add_argument("--vision-hidden", type=int, help="width of the encoder part's vision tower")
    parser.add_argument("--vision-depth", type=int, help="layers of the encoder part's vision tower")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    encoder = EncoderSetup(args.encoder_frames, args.encoder_side, args.vision_hidden, args.vision_depth)
    summary = {"benchmark": "video_input", "quick": args.quick, "decode": decode_throughput(args),
               "encoder": encoder_memory(encoder)}
    emit_summary(summary, args.out)


if __name__ == "__main__":
    main()
