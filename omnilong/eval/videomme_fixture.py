"""A small VideoMME in the benchmark's layout, made of rendered videos: for tests and the default run.

Six 64x64 videos at 4 fps (two short, two medium, two long; one of each in two domains) show the
stage-3 scenes (omnilong/data/synth/video.py: a digit changing over time, a moving shape that
changes colour half-way), each with an .srt naming animals in turn. Every video has three
four-option questions, as VideoMME's do, answered by what is drawn or, for one kind, said in
the subtitles; the correct option's place is drawn at random, so the letters vary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from omnilong import atomic
from omnilong.config import VideoSynthParams
from omnilong.data.synth.video import (
    ANIMALS,
    PALETTE,
    SHAPES,
    Narration,
    Scene,
    encode_mp4,
    narration_subtitles,
    random_scene,
    render_frame,
    srt_text,
)
from omnilong.eval.videomme_extract import OPTION_LETTERS

FIXTURE_FILE = "videomme.json"
FPS = 4
SIZE = 64
# Frames per duration category (3, 6 and 12 seconds).
FRAMES = {"short": 12, "medium": 24, "long": 48}
DOMAINS = (("Knowledge", "Technology"), ("Life Record", "Daily Life"))
NAMED_ANIMALS = 3
# Never drawn: a distractor among the shapes.
EXTRA_SHAPE = "hexagon"
DIRECTION_OPTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")


def _choice(rng: random.Random, task_type: str, question: str, right: str, wrong: list[str]) -> dict:
    """A question whose options are `right` and three of `wrong`, in a random order."""
    texts = [right, *rng.sample(wrong, 3)]
    rng.shuffle(texts)
    return {
        "task_type": task_type,
        "question": question,
        "options": [f"{letter}. {text[0].upper()}{text[1:]}." for letter, text in zip(OPTION_LETTERS, texts)],
        "answer": OPTION_LETTERS[texts.index(right)],
    }


def _third_question(kind: int, scene: Scene, narration: Narration, rng: random.Random) -> dict:
    """One of four kinds, taken in turn over the videos, so task types differ between videos."""
    if kind == 0:
        position = rng.randrange(len(scene.digits) - 1)
        after = scene.digits[position]
        others = [str(d) for d in range(10) if d not in (after, scene.digits[position + 1])]
        return _choice(rng, "Temporal Reasoning", f"Which digit appears right after {after} in the video?",
                       str(scene.digits[position + 1]), others)
    if kind == 1:
        count = len(scene.digits)
        others = [str(n) for n in range(2, 8) if n != count]
        return _choice(rng, "Counting Problem", "How many different digits are shown in the video?", str(count), others)
    if kind == 2:
        # The other animals named are wrong options, so the order of the subtitles matters.
        unnamed = [a for a in ANIMALS if a not in narration.animals]
        return _choice(rng, "Information Synopsis", "Which animal do the subtitles name first?",
                       narration.animals[0], [*narration.animals[1:], rng.choice(unnamed)])
    others = [d for d in DIRECTION_OPTIONS if d != scene.direction]
    return _choice(rng, "Spatial Perception", f"In which direction does the {scene.shape} move?",
                   scene.direction, others)


def _questions(video_id: str, scene: Scene, narration: Narration, kind: int, rng: random.Random) -> list[dict]:
    shapes = [s for s in (*SHAPES, EXTRA_SHAPE) if s != scene.shape]
    colours = [c for c in PALETTE if c != scene.colour_start]
    questions = [
        _choice(rng, "Object Recognition", "Which shape moves across the video?", scene.shape, shapes),
        _choice(rng, "Attribute Perception", f"What colour is the {scene.shape} at the beginning of the video?",
                scene.colour_start, colours),
        _third_question(kind, scene, narration, rng),
    ]
    return [{"question_id": f"{video_id}-{i}", **question} for i, question in enumerate(questions, start=1)]


def write_videomme_fixture(directory: str | Path, seed: int = 0) -> Path:
    """Write (replacing `directory`) the videos, subtitle/<video_id>.srt files and the annotation
    JSON; the same `seed` writes the same files. Returns the JSON's path."""
    directory = Path(directory)
    rng = random.Random(f"videomme-fixture:{seed}")
    entries = []
    with atomic.atomic_dir(directory) as staging:
        (staging / "subtitle").mkdir()
        for index, (duration, (domain, sub_category)) in enumerate(
            (duration, domain) for duration in FRAMES for domain in DOMAINS
        ):
            video_id = f"{index + 1:03d}"
            params = VideoSynthParams(num_frames=FRAMES[duration], height=SIZE, width=SIZE, fps=FPS)
            scene = random_scene(rng, params.num_frames)
            narration = Narration(
                animals=tuple(rng.sample(ANIMALS, NAMED_ANIMALS)), code=rng.randrange(1000, 10_000),
                code_line=rng.randrange(NAMED_ANIMALS + 1),
            )
            encode_mp4([render_frame(scene, t, params) for t in range(params.num_frames)],
                       staging / f"{video_id}.mp4", FPS)
            subtitles = narration_subtitles(narration, params.num_frames, FPS)
            (staging / "subtitle" / f"{video_id}.srt").write_text(srt_text(subtitles), encoding="utf-8")
            entries.append({
                "video_id": video_id, "duration": duration, "domain": domain, "sub_category": sub_category,
                "questions": _questions(video_id, scene, narration, index % 4, rng),
            })
        (staging / FIXTURE_FILE).write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return directory / FIXTURE_FILE
