"""VideoMME: reading both layouts, the official prompt and extractor, scoring with scripted answerers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from omnilong.config import FrameSampling, VideommeParams, VideoSynthParams
from omnilong.data.synth.video import encode_mp4, random_scene, render_frame
from omnilong.data.video_frames import sample_frames, video_info
from omnilong.eval.answering import Question
from omnilong.eval.videomme import answer_videomme, evaluate_videomme, results_file, score_answers
from omnilong.eval.videomme_data import VideommeDataError, VideommeVideo, load_videomme
from omnilong.eval.videomme_extract import official_extract, strict_extract
from omnilong.eval.videomme_fixture import write_videomme_fixture
from omnilong.eval.videomme_prompt import INSTRUCTION, videomme_prompt
from omnilong.eval.videomme_report import PLOT_FILE, SCORES_FILE, TABLE_FILE
from omnilong.eval.videomme_score import GROUPINGS, GroupScore, VideommeScores, score_results_files

OPTIONS = ["A. Black.", "B. Gray.", "C. Green.", "D. Brown."]
PARAMS = VideommeParams(frames=FrameSampling(num_frames=4))

# (response, official extraction, strict extraction) with OPTIONS.
EXTRACTIONS = [
    ("A", "A", "A"),
    ("B.", "B", "B"),
    ("(C)", "C", "C"),
    ("**B**", "B", "B"),
    ("D. Brown.", "D", "D"),
    ("The best answer is D.", "D", "D"),
    ("The best answer is: B", "B", "B"),
    ("Option C", "C", "C"),
    ("The correct option is A", "A", "A"),
    # The official regex takes the first capital A-D anywhere.
    ("Definitely A", "D", "A"),
    ("Certainly B", "C", "B"),
    ("Answer: D", "A", "D"),
    # "Best answer:" is in the official list only glued to "Best option:", so it is not stripped.
    ("Best answer: C", "B", "C"),
    ("The best answer is Brown.", "B", "D"),
    ("The video shows a Cat.", "C", ""),
    ("ABCD", "A", ""),
    ("A dog is shown, so the answer is C", "A", "C"),
    ("A is correct.", "A", "A"),
    ("A or B", "A", ""),
    ("The answer is C, not B.", "C", ""),
    ("Gray.", "", "B"),
    ("The person wears green clothes", "", "C"),
    ("b", "", ""),
    ("I don't know.", "", ""),
    ("", "", ""),
    ("the person in the video is wearing something dark and plain today", "", ""),
]


@pytest.mark.parametrize(("response", "official", "strict"), EXTRACTIONS)
def test_official_and_strict_extractors(response: str, official: str, strict: str):
    assert (official_extract(response), strict_extract(response, OPTIONS)) == (official, strict)


def test_prompt_is_the_official_one():
    # The README's example of github.com/BradyFU/Video-MME, both settings.
    question = "What is the color of the clothing worn by the persons in the video?"
    body = (
        "Select the best answer to the following multiple-choice question based on the video. Respond with only "
        "the letter (A, B, C, or D) of the correct option.\n"
        "What is the color of the clothing worn by the persons in the video?\n"
        "A. Black.\nB. Gray.\nC. Green.\nD. Brown.\n"
        "The best answer is:"
    )
    assert videomme_prompt(question, OPTIONS, None) == body
    subtitles = "Hi guys, I'm going to show you how to perfectly prepare a ...\nSecond line."
    assert videomme_prompt(question, OPTIONS, subtitles) == (
        "This video's subtitles are listed below:\n" + subtitles + "\n" + body
    )
    # Options without labels get them.
    assert videomme_prompt(question, ["Black.", "Gray.", "Green.", "Brown."], None) == body


@pytest.fixture(scope="module")
def fixture_json(tmp_path_factory) -> Path:
    return write_videomme_fixture(tmp_path_factory.mktemp("videomme") / "fixture")


class ScriptedAnswerer:
    """Replies `reply(correct letter)` to each question, found by its video and question line."""

    def __init__(self, videos: list[VideommeVideo], reply: Callable[[str], str]):
        self.answers = {(v.video_id, q.question): q.answer for v in videos for q in v.questions}
        self.reply = reply
        self.asked: list[Question] = []

    def answer(self, question: Question) -> str:
        self.asked.append(question)
        lines = question.messages[-1]["content"].split("\n")
        assert question.video is not None
        return self.reply(self.answers[question.video.path.stem, lines[lines.index(INSTRUCTION) + 1]])


def _groups(scores: VideommeScores) -> list[tuple[str, GroupScore]]:
    return [
        (f"{setting}/{grouping}/{name}", group)
        for setting, score in scores.settings.items()
        for grouping in GROUPINGS
        for name, group in getattr(score, grouping).items()
    ] + [(f"{setting}/overall", score.overall) for setting, score in scores.settings.items()]


def test_oracle_scores_one_everywhere(fixture_json: Path, tmp_path: Path):
    videos = load_videomme(fixture_json)
    answerer = ScriptedAnswerer(videos, lambda letter: f"The best answer is {letter}.")
    scores = evaluate_videomme(answerer, PARAMS.model_copy(update={"annotations": str(fixture_json)}), tmp_path)

    questions = sum(len(v.questions) for v in videos)
    assert len(answerer.asked) == 2 * questions
    assert {q.max_new_tokens for q in answerer.asked} == {PARAMS.max_new_tokens}
    assert {q.video.sampling for q in answerer.asked} == {PARAMS.frames}
    for score in scores.settings.values():
        assert set(score.duration) == {"short", "medium", "long"}
        assert len(score.domain) >= 2 and len(score.task_type) >= 2
        assert score.overall.questions == questions
    for name, group in _groups(scores):
        for extractor in (group.official, group.strict):
            assert (extractor.accuracy, extractor.answered_accuracy, extractor.extraction_rate) == (1, 1, 1), name

    # The outputs: results the scorer reads back to the same scores, the report files.
    rescored = score_results_files({s: results_file(tmp_path, s) for s in scores.settings})
    assert rescored == scores
    assert VideommeScores.model_validate_json((tmp_path / SCORES_FILE).read_text()) == scores
    table = (tmp_path / TABLE_FILE).read_text()
    assert "| with_subtitles | duration: long |" in table
    assert (tmp_path / PLOT_FILE).read_bytes().startswith(b"\x89PNG")


def test_always_a_scores_the_fraction_of_a_answers(fixture_json: Path):
    videos = load_videomme(fixture_json)
    answered = answer_videomme(ScriptedAnswerer(videos, lambda letter: "A"), videos, fixture_json.parent, PARAMS)
    scores = score_answers(answered)
    rows = [(v.duration, v.domain, q.task_type, q.answer) for v in videos for q in v.questions]

    def fraction_a(column: int | None = None, name: str | None = None) -> float:
        chosen = [row for row in rows if column is None or row[column] == name]
        return sum(row[3] == "A" for row in chosen) / len(chosen)

    assert 0 < fraction_a() < 1
    for score in scores.settings.values():
        assert score.overall.official.accuracy == fraction_a()
        for column, grouping in enumerate(GROUPINGS):
            for name, group in getattr(score, grouping).items():
                expected = fraction_a(column, name)
                assert group.official.accuracy == group.strict.accuracy == expected, (grouping, name)
                assert group.official.answered_accuracy == expected


def test_definitely_reads_as_d_officially_and_as_the_letter_strictly(fixture_json: Path):
    videos = load_videomme(fixture_json)
    answered = answer_videomme(
        ScriptedAnswerer(videos, lambda letter: f"Definitely {letter}"), videos, fixture_json.parent,
        PARAMS.model_copy(update={"settings": ["without_subtitles"]}),
    )
    overall = score_answers(answered).settings["without_subtitles"].overall
    answers = [q.answer for v in videos for q in v.questions]
    # Officially every reply reads as D (from "Definitely"): right exactly where D is the answer.
    assert overall.official.extraction_rate == 1
    assert overall.official.accuracy == answers.count("D") / len(answers) < 1
    assert overall.strict.accuracy == 1


def _write_video(path: Path, num_frames: int, fps: int) -> None:
    import random

    params = VideoSynthParams(num_frames=num_frames, height=64, width=64, fps=fps)
    scene = random_scene(random.Random(0), num_frames)
    encode_mp4([render_frame(scene, t, params) for t in range(num_frames)], path, fps)


def _video_entry(video_id: str, answer: str = "A", **fields) -> dict:
    return {
        "video_id": video_id, "duration": "short", "domain": "Knowledge", "sub_category": "Technology",
        "questions": [{"question_id": f"{video_id}-1", "task_type": "Object Recognition",
                       "question": f"What is in {video_id}?", "options": OPTIONS, "answer": answer}],
    } | fields


# Cues out of time order. The 4 frames sampled from 16 at 4 fps are those at 0.5, 1.5, 2.5, 3.5 s;
# a cue is shown during [start, end).
SRT = """1
00:00:01,400 --> 00:00:02,600
Two: on screen at 1.5 s and 2.5 s.

2
00:00:00,000 --> 00:00:00,400
Before the first sampled frame.

3
00:00:00,400 --> 00:00:00,600
One: on screen at 0.5 s.

4
00:00:03,000 --> 00:00:03,500
Gone as the last sampled frame shows.

5
00:00:03,500 --> 00:00:03,900
Three: on from the last sampled frame.

6
00:00:01,600 --> 00:00:02,400
Between two sampled frames.
"""


def test_subtitles_prompt_holds_the_lines_on_screen_at_the_sampled_frames(tmp_path: Path):
    for name in ("talk", "silent"):
        _write_video(tmp_path / f"{name}.mp4", num_frames=16, fps=4)
    (tmp_path / "talk.srt").write_text(SRT)  # beside the video; "silent" has none
    annotations = tmp_path / "videomme.json"
    annotations.write_text(json.dumps([_video_entry("talk"), _video_entry("silent")]))
    assert sample_frames(video_info(tmp_path / "talk.mp4"), PARAMS.frames).timestamps == [0.5, 1.5, 2.5, 3.5]

    videos = load_videomme(annotations)
    answerer = ScriptedAnswerer(videos, lambda letter: letter)
    answer_videomme(answerer, videos, tmp_path, PARAMS.model_copy(update={"settings": ["with_subtitles"]}))

    prompts = {q.video.path.stem: q.messages[-1]["content"] for q in answerer.asked}
    lines = "One: on screen at 0.5 s.\nTwo: on screen at 1.5 s and 2.5 s.\nThree: on from the last sampled frame."
    assert prompts["talk"] == videomme_prompt("What is in talk?", OPTIONS, lines)
    assert prompts["silent"] == videomme_prompt("What is in silent?", OPTIONS, "No subtitles available")


def _official_spelling(entry: dict, sub_category_key: str) -> dict:
    return {
        "video_id": entry["video_id"], "duration_category": entry["duration"], "video_category": entry["domain"],
        sub_category_key: entry["sub_category"], "url": "https://www.youtube.com/watch?v=x",
        "questions": [
            {"question_id": q["question_id"], "task_type": q["task_type"], "question": q["question"],
             "choices": q["options"], "answer": q["answer"]}
            for q in entry["questions"]
        ],
    }


def test_both_spellings_read_the_same(fixture_json: Path, tmp_path: Path):
    entries = json.loads(fixture_json.read_text())
    expected = load_videomme(fixture_json)
    for spelling, converted in {
        "readme": [_official_spelling(e, "video_sub_category") for e in entries],
        "template": [_official_spelling(e, "video_subcategory") for e in entries],
        "videoID": [{"videoID": e["video_id"]} | {k: v for k, v in e.items() if k != "video_id"} for e in entries],
    }.items():
        path = tmp_path / f"{spelling}.json"
        path.write_text(json.dumps(converted))
        read = [v.model_copy(update={"url": None, "youtube_id": None}) for v in load_videomme(path)]
        assert read == expected, spelling


def test_parquet_rows_read_as_the_json(fixture_json: Path, tmp_path: Path):
    pytest.importorskip("pyarrow", reason="the parquet reader needs pyarrow, which is not installed")
    import pyarrow
    import pyarrow.parquet

    rows = [
        {"video_id": e["video_id"], "duration": e["duration"], "domain": e["domain"],
         "sub_category": e["sub_category"], "url": f"https://www.youtube.com/watch?v=yt{e['video_id']}",
         "videoID": f"yt{e['video_id']}", **q}
        for e in json.loads(fixture_json.read_text()) for q in e["questions"]
    ]
    path = tmp_path / "test-00000-of-00001.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    read = load_videomme(path)
    assert [v.model_copy(update={"url": None, "youtube_id": None}) for v in read] == load_videomme(fixture_json)
    assert read[0].file_stems == ["yt001", "001"]

    rows[1]["duration"] = "long"  # the second question of video 001 disagrees with the first
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    with pytest.raises(VideommeDataError, match=re.escape(f"{path}: row 1: duration is 'long', but row 0")):
        load_videomme(path)


def test_scores_a_results_file_without_a_model(tmp_path: Path):
    # The benchmark's results template spelling; one question left unanswerable by both extractors.
    def video(video_id: str, duration: str, domain: str, answers_responses: list[tuple[str, str]]) -> dict:
        return {
            "video_id": video_id, "duration_category": duration, "video_category": domain,
            "video_subcategory": "Other", "questions": [
                {"question_id": f"{video_id}-{i}", "task_type": f"Task {i}", "question": "?", "choices": OPTIONS,
                 "answer": answer, "response": response}
                for i, (answer, response) in enumerate(answers_responses)
            ],
        }

    path = tmp_path / "results.json"
    path.write_text(json.dumps([
        video("001", "short", "Knowledge", [("A", "A"), ("B", "The best answer is B."), ("A", "Definitely A")]),
        video("002", "long", "Sports Competition", [("C", ""), ("D", "Answer: D"), ("B", "C")]),
    ]))
    score = score_results_files({"without_subtitles": path}).settings["without_subtitles"]
    official, strict = score.overall.official, score.overall.strict
    assert (official.extracted, official.correct, official.accuracy) == (5, 2, 2 / 6)
    assert (official.answered_accuracy, official.extraction_rate) == (2 / 5, 5 / 6)
    assert (strict.extracted, strict.correct, strict.accuracy, strict.answered_accuracy) == (5, 4, 4 / 6, 4 / 5)
    assert list(score.duration) == ["short", "long"]
    assert (score.duration["short"].official.accuracy, score.duration["long"].official.accuracy) == (2 / 3, 0)
    assert score.domain["Sports Competition"].official.answered_accuracy == 0
    assert score.task_type["Task 0"].strict.accuracy == 1 / 2  # 001-0 right, 002-0 unanswered
    assert [q.official for q in score.questions] == ["A", "B", "D", "", "A", "C"]


def _bad(entries) -> str:
    return json.dumps(entries)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "not valid JSON"),
        (_bad({"video_id": "001"}), "expected a JSON list of videos, given dict"),
        (_bad([_video_entry("001"), {k: v for k, v in _video_entry("002").items() if k != "duration"}]),
         "entry 1 (video_id '002'): duration or duration_category: required field is missing"),
        (_bad([_video_entry("001", answer="E")]), "entry 0 (video_id '001'): questions.0.answer: Input should be"),
        (_bad([_video_entry("001", duration="tiny")]), "entry 0 (video_id '001'): duration: Input should be 'short'"),
        (_bad([_video_entry("001") | {"questions": [_video_entry("001")["questions"][0] | {"options": OPTIONS[:3]}]}]),
         "entry 0 (video_id '001'): questions.0.options: List should have at least 4 items"),
        (_bad([_video_entry("001"), _video_entry("002") | {"questions": _video_entry("001")["questions"]}]),
         "question_id '001-1' appears twice (videos '001' and '002')"),
        (_bad(["001"]), "entry 0: expected an object with the video's fields, given str"),
    ],
)
def test_bad_annotations_name_the_file_entry_and_field(tmp_path: Path, content: str, message: str):
    path = tmp_path / "videomme.json"
    path.write_text(content)
    with pytest.raises(VideommeDataError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        load_videomme(path)


def test_results_without_responses_name_the_question(fixture_json: Path):
    with pytest.raises(VideommeDataError, match=re.escape(f"{fixture_json}: video '001': questions.0 ('001-1'): "
                                                          "response: required field is missing")):
        score_results_files({"without_subtitles": fixture_json})


def test_a_missing_video_fails_before_any_question(tmp_path: Path):
    annotations = tmp_path / "videomme.json"
    annotations.write_text(json.dumps([_video_entry("gone")]))
    answerer = ScriptedAnswerer(load_videomme(annotations), lambda letter: letter)
    with pytest.raises(VideommeDataError, match=r"video 'gone': no file gone\{\.mp4,\.MP4,\.mkv,\.webm\} in "):
        answer_videomme(answerer, load_videomme(annotations), tmp_path, PARAMS)
    assert answerer.asked == []


def test_params_reject_a_video_dir_without_annotations_and_repeated_settings():
    with pytest.raises(ValueError, match="video_dir: expected unset unless annotations is set"):
        VideommeParams(video_dir="videos")
    with pytest.raises(ValueError, match="settings: expected each setting at most once"):
        VideommeParams(settings=["with_subtitles", "with_subtitles"])


def test_fixture_is_deterministic(tmp_path: Path):
    """Byte for byte, each time in a fresh process. In a process that has loaded decord, libx264's
    output varies from call to call (decord ships its own FFmpeg; measured on PyAV 18.1 with
    decord 0.6), so the fixture is compared as a process that writes it sees it."""
    import subprocess
    import sys

    def write(name: str) -> Path:
        script = f"from pathlib import Path; from omnilong.eval.videomme_fixture import write_videomme_fixture as w; w(Path({str(tmp_path / name)!r}))"
        subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1])
        return tmp_path / name

    first, again = write("first"), write("again")
    written = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len([p for p in written if p.suffix == ".mp4"]) == len([p for p in written if p.suffix == ".srt"]) == 6
    for relative in written:
        assert (first / relative).read_bytes() == (again / relative).read_bytes(), relative


def test_cli_scores_results_files_and_names_a_bad_one(tmp_path: Path):
    import subprocess
    import sys

    fixture = write_videomme_fixture(tmp_path / "fixture")
    videos = json.loads(fixture.read_text())
    for video in videos:
        for question in video["questions"]:
            question["response"] = f"The best answer is {question['answer']}."
    results = tmp_path / "results.json"
    results.write_text(json.dumps(videos))
    cli = [sys.executable, "-c", "from omnilong.cli import main; main()", "report", "videomme"]
    run = subprocess.run([*cli, "--with-subtitles", str(results), "--out", str(tmp_path / "report")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    scores = json.loads((tmp_path / "report/videomme.json").read_text())
    assert scores["settings"]["with_subtitles"]["overall"]["official"]["accuracy"] == 1.0
    assert "| overall |" in run.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"video_id\": \"001\"}]")
    run = subprocess.run([*cli, "--without-subtitles", str(bad), "--out", str(tmp_path / "bad")], capture_output=True,
                         text=True)
    assert run.returncode == 1 and str(bad) in run.stderr
