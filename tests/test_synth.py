"""The default corpus: deterministic across processes, valid, free of 7-digit numbers, answerable."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from omnilong.config import SynthParams, TextSynthParams, load_params
from omnilong.data.schemas import InstructRecord, TextRecord, VideoRecord, iter_records
from omnilong.data.subtitles import Subtitle, parse_srt, subtitles_at
from omnilong.data.synth import synthesize_default_corpus
from omnilong.data.synth.text import EXCLUDED_DIRS, mask_long_numbers, synthesize_text
from omnilong.data.synth.video import (
    BACKGROUND,
    PALETTE,
    digit_segment_boxes,
    encode_mp4,
    narration_subtitles,
    random_narration,
    random_scene,
    render_frame,
)
from omnilong.data.video_frames import VideoInfo, read_frames, sample_frames, video_info

REPO = Path(__file__).resolve().parents[1]
PARAMS = SynthParams.model_validate(
    {
        "seed": 7,
        "text": {"num_documents": 10, "min_chars": 1_000, "max_chars": 4_000},
        "instruct": {"num_samples": 6, "context_chars": 3_000},
        "video": {
            "num_videos": 2, "num_frames": 16, "height": 64, "width": 64, "fps": 4,
            "long": {"num_videos": 1, "num_frames": 48},
        },
    }
)
SYNTH = (
    "import sys; from pathlib import Path; from omnilong.config import SynthParams; "
    "from omnilong.data.synth import synthesize_default_corpus; "
    "synthesize_default_corpus(SynthParams.model_validate_json(sys.argv[1]), Path(sys.argv[2]))"
)
SEVEN_DIGITS = re.compile(r"\d{7}")
# The standard seven-segment table, written out independently of the renderer.
SEVEN_SEGMENT_DIGITS = {
    "abcdef": 0, "bc": 1, "abdeg": 2, "abcdg": 3, "bcfg": 4,
    "acdfg": 5, "acdefg": 6, "abc": 7, "abcdefg": 8, "abcdfg": 9,
}


def _synthesize_in_subprocess(out_dir: Path, hash_seed: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SYNTH, PARAMS.model_dump_json(), str(out_dir)],
        cwd=REPO, env={**os.environ, "PYTHONHASHSEED": hash_seed},
        capture_output=True, text=True, timeout=300, check=True,
    )


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path, str]:
    """The corpus made twice, by two processes with different hash seeds, and the first one's stderr."""
    base = tmp_path_factory.mktemp("synth")
    first = _synthesize_in_subprocess(base / "first", "1")
    _synthesize_in_subprocess(base / "second", "2")
    return base / "first", base / "second", first.stderr


@pytest.fixture(scope="module")
def corpus(corpora) -> Path:
    return corpora[0]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_processes_write_byte_identical_corpora(corpora):
    first, second, _ = corpora
    files = _files(first)
    assert sorted(files) == [
        "instruct/samples.jsonl", "text/documents.jsonl",
        "video/long-video-00000.mp4", "video/long-video-00000.srt",
        "video/qa.jsonl", "video/video-00000.mp4", "video/video-00001.mp4",
    ]
    assert files == _files(second)


def test_one_process_encodes_the_same_frames_to_the_same_bytes_every_time(tmp_path):
    """PyAV's encoder-side conversion gave other bytes about once in fifteen encodes; forty
    encodes of one video would show that with probability 1 - (14/15)^40, about 94%."""
    scene = random_scene(random.Random(0), PARAMS.video.num_frames)
    frames = [render_frame(scene, t, PARAMS.video) for t in range(PARAMS.video.num_frames)]
    encodings = set()
    for attempt in range(40):
        path = tmp_path / f"{attempt}.mp4"
        encode_mp4(frames, path, PARAMS.video.fps)
        encodings.add(path.read_bytes())
    assert len(encodings) == 1


def test_progress_is_shown(corpora):
    stderr = corpora[2]
    for kind in ("text", "instruct", "video"):
        assert f"synth {kind}" in stderr


def test_records_validate_and_match_the_params(corpus):
    docs = list(iter_records(corpus / "text" / "documents.jsonl", "text"))
    samples = list(iter_records(corpus / "instruct" / "samples.jsonl", "instruct"))
    videos = list(iter_records(corpus / "video" / "qa.jsonl", "video"))
    assert [type(r) for r in docs] == [TextRecord] * PARAMS.text.num_documents
    assert [type(r) for r in samples] == [InstructRecord] * PARAMS.instruct.num_samples
    assert [type(r) for r in videos] == [VideoRecord] * (PARAMS.video.num_videos + PARAMS.video.long.num_videos)
    assert len({r.id for r in docs + samples + videos}) == len(docs + samples + videos)
    for doc in docs:
        assert PARAMS.text.min_chars <= len(doc.text) <= PARAMS.text.max_chars
        assert not doc.source.startswith("/") and doc.source.split("/")[0] == "stdlib"
        assert not set(doc.source.split("/")) & EXCLUDED_DIRS
    assert {doc.id.rsplit("-", 1)[1] for doc in docs} == {"code", "prose"}
    for sample in samples:
        context = sample.messages[0].content
        assert 0.9 * PARAMS.instruct.context_chars <= len(context) <= 1.1 * PARAMS.instruct.context_chars
    for video in videos:
        info = video_info(corpus / "video" / video.video)
        is_long = video.id.startswith("long-")
        assert (info.num_frames, info.height, info.width, info.fps) == (48 if is_long else 16, 64, 64, 4)
        assert (video.subtitles is not None) == is_long and video.start_s is video.end_s is None


def test_no_seven_digit_number_or_machine_path_anywhere(corpus):
    stdlib = sysconfig.get_paths()["stdlib"]
    for jsonl in sorted(corpus.rglob("*.jsonl")):
        content = jsonl.read_text(encoding="utf-8")
        assert not SEVEN_DIGITS.search(content), f"{jsonl}: {SEVEN_DIGITS.search(content)}"
        assert stdlib not in content and str(REPO) not in content


def test_mask_long_numbers():
    assert mask_long_numbers("a 1234567 b 123456 c 0x12345678") == "a ####### b 123456 c 0x########"
    assert mask_long_numbers("v1.2.3 2024-11-25") == "v1.2.3 2024-11-25"


def test_source_dirs_skip_tests_binaries_and_undecodable_files(tmp_path):
    source = tmp_path / "src"
    (source / "pkg" / "tests").mkdir(parents=True)
    body = "".join(f"def function_{i}(x):\n    '''Doubles x, case {i}.'''\n    return 2 * x\n\n" for i in range(40))
    (source / "pkg" / "a.py").write_text(f"ID = 98765432\n{body}")
    (source / "pkg" / "guide.rst").write_text("Guide\n=====\n\n" + "Read the manual, then call 5551234.\n" * 60)
    (source / "pkg" / "tests" / "test_a.py").write_text("TEST_ONLY_MARKER = 1\n" * 200)
    (source / "pkg" / "blob.txt").write_bytes(b"BINARY_MARKER\0" * 200)
    (source / "pkg" / "latin.txt").write_bytes("LATIN_MARKER caf\xe9\n".encode("latin-1") * 200)
    params = TextSynthParams(source_dirs=[str(source)], num_documents=6, min_chars=500, max_chars=1_500)
    docs = list(synthesize_text(params, seed=0))
    assert len(docs) == 6 and {doc.kind for doc in docs} == {"code", "prose"}
    text = "".join(doc.text for doc in docs)
    assert "def function_" in text and "Doubles x" in text
    for marker in ("TEST_ONLY_MARKER", "BINARY_MARKER", "LATIN_MARKER", "98765432", "5551234", str(tmp_path)):
        assert marker not in text
    assert docs == list(synthesize_text(params, seed=0))
    assert docs != list(synthesize_text(params, seed=1))


def test_a_failed_synthesis_leaves_the_previous_corpus(tmp_path):
    out_dir = tmp_path / "default"
    out_dir.mkdir()
    (out_dir / "previous.txt").write_text("kept")
    (tmp_path / "empty_sources").mkdir()
    params = PARAMS.model_copy(update={"text": TextSynthParams(source_dirs=[str(tmp_path / "empty_sources")])})
    with pytest.raises(ValueError, match="min_chars"):
        synthesize_default_corpus(params, out_dir)
    assert [p.name for p in out_dir.iterdir()] == ["previous.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default", "empty_sources"]  # no staging left


def _def_names(context: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"(?m)^\s*(?:async\s+)?def\s+(\w+)", context)]


def test_instruct_answers_follow_from_the_context(corpus):
    tasks = set()
    for sample in iter_records(corpus / "instruct" / "samples.jsonl", "instruct"):
        task = sample.id.rsplit("-", 1)[1]
        tasks.add(task)
        user, answer = sample.messages[0].content, sample.messages[-1].content
        context, question = user.rsplit("\n\n", 1)
        assert "magic" not in question.lower()
        if task == "kv_retrieval":
            key = re.search(r'key "([0-9a-f-]{36})"', question).group(1)
            assert context.count(f'"{key}":') == 1 and f'"{key}": "{answer}"' in context
        elif task == "needle":
            assert context.count(answer) == 1
        elif match := re.search(r"defined right (after|before) `(\w+)`", question):
            names = _def_names(context)
            position = names.index(match.group(2)) + (1 if match.group(1) == "after" else -1)
            assert names[position] == answer
        elif "defined with `def`" in question:
            assert int(answer) == len(_def_names(context))
        else:
            word = re.search(r'the word "(\w+)"', question).group(1)
            assert int(answer) == len(re.findall(rf"\b{word}\b", context))
    assert tasks == {"kv_retrieval", "needle", "doc_qa"}


def _colour_pixels(frame: np.ndarray) -> np.ndarray:
    """Pixels of the shape: the lower part of the frame, saturated (not background, not white digits)."""
    lower = frame[frame.shape[0] // 2 :].astype(int)
    saturated = lower.max(axis=-1) - lower.min(axis=-1) > 80
    return np.argwhere(saturated), lower[saturated]


def _nearest_colour(pixels: np.ndarray) -> str:
    median = np.median(pixels, axis=0)
    return min(PALETTE, key=lambda name: np.linalg.norm(median - PALETTE[name]))


def _shown_digit(frame: np.ndarray) -> int:
    lit = "".join(
        segment
        for segment, (x0, y0, x1, y1) in sorted(digit_segment_boxes(*frame.shape[:2]).items())
        if frame[y0 : y1 + 1, x0 : x1 + 1].mean() > 128
    )
    return SEVEN_SEGMENT_DIGITS[lit]


def _frame_answers(frames: np.ndarray) -> dict[str, str]:
    """What the frames show, keyed by the question (up to its "?") that asks for it."""
    (first_at, first_rgb), (last_at, last_rgb) = _colour_pixels(frames[0]), _colour_pixels(frames[-1])
    # Filled fraction of the bounding box: square 1, circle pi/4, triangle 1/2.
    rows, cols = np.ptp(last_at, axis=0) + 1
    fill = len(last_at) / (rows * cols)
    shape = min({"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}.items(), key=lambda item: abs(item[1] - fill))[0]
    digits = [_shown_digit(frame) for frame in frames]
    sequence = [d for i, d in enumerate(digits) if i == 0 or d != digits[i - 1]]
    assert len(sequence) == len(set(sequence))
    answers = {
        "Which shape moves across the video": shape,
        f"Which direction does the {shape} move":
            "left to right" if last_at[:, 1].mean() > first_at[:, 1].mean() else "right to left",
        f"What colour is the {shape} at the beginning": _nearest_colour(first_rgb),
        f"What colour is the {shape} at the end": _nearest_colour(last_rgb),
        "How many different digits are shown": str(len(sequence)),
    }
    answers |= {f"Which digit appears right after {d}": str(e) for d, e in zip(sequence, sequence[1:])}
    return answers


def _subtitle_answers(subtitles: list[Subtitle]) -> dict[str, str]:
    """What the subtitles say, keyed like `_frame_answers`."""
    animals = [m.group(1) for s in subtitles if (m := re.fullmatch(r"The keeper points at the (\w+)\.", s.text))]
    (code,) = [m.group(1) for s in subtitles if (m := re.fullmatch(r"The gate code is (\d+)\.", s.text))]
    answers = {"Which animal do the subtitles name first": animals[0], "What gate code do the subtitles give": code}
    answers |= {f"Which animal do the subtitles name right after the {a}": b for a, b in zip(animals, animals[1:])}
    return answers


def test_video_answers_match_the_decoded_frames_and_the_subtitles(corpus):
    background = np.array(BACKGROUND)
    for record in iter_records(corpus / "video" / "qa.jsonl", "video"):
        path = corpus / "video" / record.video
        frames = read_frames(path, range(video_info(path).num_frames))
        assert np.abs(frames[0, 0, 0].astype(int) - background).max() < 10
        from_frames = _frame_answers(frames)
        from_subtitles = {}
        if record.subtitles is not None:
            subtitles = parse_srt(corpus / "video" / record.subtitles)
            # One after another, across the whole video.
            assert all(a.end_s <= b.start_s for a, b in zip(subtitles, subtitles[1:]))
            assert subtitles[-1].end_s <= len(frames) / PARAMS.video.fps
            from_subtitles = _subtitle_answers(subtitles)
        asked = {"frames": 0, "subtitles": 0}
        for question, answer in zip(record.messages[::2], record.messages[1::2]):
            key = question.content.split("?")[0]
            source = "subtitles" if key in from_subtitles else "frames"
            assert answer.content == (from_subtitles | from_frames)[key], question.content
            asked[source] += 1
        # Long videos ask about both; their subtitle questions cannot be answered from the frames.
        assert asked == ({"frames": 3, "subtitles": 3} if record.subtitles else {"frames": 6, "subtitles": 0})


def test_default_stage3_sampling_keeps_short_videos_whole_and_every_subtitle_of_long_ones():
    params = load_params(REPO / "params.yaml")
    video, sampling = params.data.synth.video, params.stages.stage3.video_frames

    def info(num_frames: int) -> VideoInfo:
        return VideoInfo(num_frames, float(video.fps), video.height, video.width, num_frames / video.fps)

    assert sample_frames(info(video.num_frames), sampling).indices == list(range(video.num_frames))
    long = sample_frames(info(video.long.num_frames), sampling)
    assert video.long.num_frames > len(long.indices) >= 256
    for seed in range(5):
        subtitles = narration_subtitles(random_narration(random.Random(seed)), video.long.num_frames, video.fps)
        assert subtitles_at(subtitles, long.timestamps) == subtitles
