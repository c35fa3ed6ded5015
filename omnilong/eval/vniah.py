"""Visual needle-in-a-haystack (V-NIAH, after LongVA): a needle image among a long video's frames.

For each frame count N and depth d, the haystack video is sampled to N frames and one needle
unit is inserted at d percent of its units: a whole temporal patch for Qwen2.5-VL (the needle
image on both of its frames), one frame for LLaVA-OneVision. The vision tower encodes units
independently (omnilong/models/video_encoders.py), so the haystack's unit embeddings are
computed once per (video, N, model) and reused for every depth and needle: the cell's video
embeddings are those units with the needle's spliced in, exactly what encoding the spliced
frames would give (tests/test_vniah.py). Positions (Qwen2.5-VL's mRoPE over N/2 + 1 temporal
patches) are computed for the whole spliced video.

Two scores per cell, averaged over the needle problems (omnilong/eval/vniah_needles.py):
teacher-forced, LongVA's published scoring (with the answer appended, the argmax at every
answer token must be that token), and generation (the answer appears in the greedy reply).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omnilong import atomic
from omnilong.config import FrameSampling, VniahParams
from omnilong.data.video_frames import read_frames, sample_frames, video_info
from omnilong.eval.vniah_needles import PROBLEMS, NeedleProblem, render_needle
from omnilong.infer.generate import ModelAnswerer
from omnilong.models.positions import position_ids_for_document
from omnilong.models.video_encoders import encode_units
from omnilong.models.video_inputs import (
    VideoSpan,
    frame_size,
    preprocess_video,
    seconds_per_grid,
    video_grid_thw,
    video_span,
)
from omnilong.parallel.vision import merge_video_embeddings, video_sources
from omnilong.train.batches import video_token_id


@dataclass(frozen=True)
class Haystack:
    """A haystack sampled to N frames: its unit embeddings and what positions need."""

    span: VideoSpan
    units: torch.Tensor  # [num_units, tokens_per_unit, hidden]
    frame_size: tuple[int, int]  # (height, width) the frames were resized to
    sampled_fps: float


class HaystackCache:
    """Haystack unit embeddings per (video file, frame count), for one model."""

    def __init__(self, answerer: ModelAnswerer):
        self.answerer = answerer
        self._cache: dict[tuple, Haystack] = {}
        self.encoded = 0  # haystacks actually encoded (the rest came from the cache)

    def get(self, path: Path, num_frames: int) -> Haystack:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, num_frames)
        if key not in self._cache:
            self._cache[key] = self._encode(path, num_frames)
            self.encoded += 1
        return self._cache[key]

    @torch.no_grad()
    def _encode(self, path: Path, num_frames: int) -> Haystack:
        a = self.answerer
        info = video_info(path)
        sample = sample_frames(info, FrameSampling(num_frames=num_frames))
        size = frame_size(a.family, a.model.config, a.video, info.height, info.width)
        span = video_span(a.family, a.model.config, a.video, num_frames, info.height, info.width)
        if num_frames % span.frames_per_unit:
            raise ValueError(
                f"eval.vniah.frame_counts: expected multiples of {span.frames_per_unit} for {a.family} "
                f"(whole temporal patches, so the needle does not share one with haystack frames), given {num_frames}"
            )
        units = _encode_frames(a, read_frames(path, sample.indices, size=size), sample.sampled_fps)
        return Haystack(span, units.view(span.num_units, span.tokens_per_unit, -1), size, sample.sampled_fps)


def _encode_frames(answerer: ModelAnswerer, frames: np.ndarray, fps: float) -> torch.Tensor:
    """[tokens, hidden]: the units' embeddings of uint8 frames [T, H, W, 3] (no trailing token)."""
    a = answerer
    inputs = preprocess_video(a.family, frames, a.model.config, a.video, fps=fps)
    return encode_units(a.model, a.family, a.video, [{k: v.to(a.device) for k, v in inputs.items()}])


@torch.no_grad()
def needle_units(answerer: ModelAnswerer, problem: NeedleProblem, haystack: Haystack) -> torch.Tensor:
    """[1, tokens_per_unit, hidden]: the needle image filling one unit at the haystack's frame size."""
    image = render_needle(problem, *haystack.frame_size)
    frames = np.repeat(image[None], haystack.span.frames_per_unit, axis=0)
    return _encode_frames(answerer, frames, haystack.sampled_fps)[None]


def insertion_unit(depth: float, num_units: int) -> int:
    """The unit index the needle takes at `depth` percent: 0 first, 100 after the last unit."""
    return round(depth / 100 * num_units)


@dataclass(frozen=True)
class CellPrompt:
    input_ids: torch.Tensor  # [L]
    embeds: torch.Tensor  # [1, L, hidden]
    position_ids: torch.Tensor  # [L] or [3, L]
    needle_tokens: tuple[int, int]  # [start, end) of the needle's video tokens in the prompt


@torch.no_grad()
def cell_prompt(answerer: ModelAnswerer, problem: NeedleProblem, haystack: Haystack, needle: torch.Tensor,
                depth: float) -> CellPrompt:
    a = answerer
    span = haystack.span
    at = insertion_unit(depth, span.num_units)
    units = torch.cat([haystack.units[:at], needle, haystack.units[at:]])
    spliced = VideoSpan(span.num_units + 1, span.frames_per_unit, span.tokens_per_unit, span.trailing_tokens)
    input_ids = a.expand_video(a.chat_ids([{"role": "user", "content": problem.question}], with_video=True),
                               spliced.num_tokens)
    grid = seconds = None
    if a.family == "qwen2_5_vl":
        grid = torch.tensor([video_grid_thw(a.model.config, a.video, spliced.num_units * span.frames_per_unit,
                                            *haystack.frame_size)])
        seconds = torch.tensor([seconds_per_grid(a.model.config, haystack.sampled_fps)])
    positions = position_ids_for_document(a.model.config, input_ids, grid, seconds)
    source = video_sources(input_ids[None], video_token_id(a.family, a.model.config), [spliced])
    token_embeds = a.model.get_input_embeddings()(input_ids[None].to(a.device))
    embeds = merge_video_embeddings(a.model, a.family, token_embeds, source.to(a.device), units.flatten(0, 1))
    first_video = int((source[0] >= 0).nonzero()[0])
    start = first_video + at * span.tokens_per_unit
    return CellPrompt(input_ids, embeds, positions, (start, start + span.tokens_per_unit))


def generation_correct(reply: str, answer: str) -> bool:
    """The answer appears in the reply as a whole word (case-insensitive)."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", reply, flags=re.IGNORECASE) is not None


def run_vniah(answerer: ModelAnswerer, haystack_video: Path, params: VniahParams, out_dir: Path,
              problems: tuple[NeedleProblem, ...] = PROBLEMS) -> dict:
    """Score every (frame count, depth) cell; write `vniah.json` and the two heatmaps to `out_dir`."""
    from omnilong.eval.plots import save_heatmap

    cache = HaystackCache(answerer)
    cells = []
    for num_frames in params.frame_counts:
        haystack = cache.get(haystack_video, num_frames)
        needles = {problem.name: needle_units(answerer, problem, haystack) for problem in problems}
        for depth in params.depths:
            results = []
            for problem in problems:
                prompt = cell_prompt(answerer, problem, haystack, needles[problem.name], depth)
                answer_ids = answerer.tokenizer.encode(problem.answer, add_special_tokens=False)
                argmax = answerer.teacher_forced_argmax(prompt.embeds, prompt.position_ids, answer_ids)
                reply = answerer.tokenizer.decode(
                    answerer.generate(prompt.embeds, prompt.position_ids, params.max_new_tokens), skip_special_tokens=True
                )
                results.append({"problem": problem.name, "answer": problem.answer, "reply": reply,
                                "teacher_forced": float(argmax == answer_ids),
                                "generation": float(generation_correct(reply, problem.answer)),
                                "needle_tokens": list(prompt.needle_tokens)})
            cells.append({"frames": num_frames, "depth": depth, "problems": results,
                          "teacher_forced": float(np.mean([r["teacher_forced"] for r in results])),
                          "generation": float(np.mean([r["generation"] for r in results]))})
    summary = {
        "haystack": str(haystack_video), "frame_counts": list(params.frame_counts), "depths": list(params.depths),
        "haystacks_encoded": cache.encoded, "cells": cells,
        "teacher_forced": float(np.mean([c["teacher_forced"] for c in cells])),
        "generation": float(np.mean([c["generation"] for c in cells])),
    }
    atomic.write_text(out_dir / "vniah.json", json.dumps(summary, indent=1) + "\n")
    for mode in ("teacher_forced", "generation"):
        grid = [[next(c[mode] for c in cells if c["frames"] == n and c["depth"] == d) for n in params.frame_counts]
                for d in params.depths]
        save_heatmap(grid, [f"{d:g}" for d in params.depths], [str(n) for n in params.frame_counts],
                     f"V-NIAH, {mode.replace('_', '-')} (mean {summary[mode]:.2f})", out_dir / f"vniah_{mode}.png",
                     xlabel="haystack frames", ylabel="needle depth (%)")
    return summary
