"""VideoMME: ask a model every question without and with subtitles, score and report.

The pieces, one job each:
- videomme_data: read the annotations (JSON or parquet, either spelling), find the files,
  write results in the benchmark's JSON layout;
- videomme_prompt: the official prompt, with the subtitles on screen at the sampled frames;
- videomme_extract: the official extractor (quirks included) and a stricter one;
- videomme_score / videomme_report: accuracies by group, JSON, markdown and plot;
- videomme_fixture: a small synthetic VideoMME for tests and the default run.
Existing results files (a `response` per question) are scored with `score_results_files`
without running a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omnilong.config import VideommeParams, VideommeSetting
from omnilong.eval.answering import Answerer
from omnilong.eval.videomme_data import VideommeVideo, find_subtitles, find_video, load_videomme, write_results
from omnilong.eval.videomme_fixture import write_videomme_fixture
from omnilong.eval.videomme_prompt import subtitles_shown, videomme_question
from omnilong.eval.videomme_report import write_videomme_report
from omnilong.eval.videomme_score import VideommeScores, score_videos

FIXTURE_DIR = "videomme_fixture"


def results_file(out_dir: Path, setting: VideommeSetting) -> Path:
    return out_dir / f"videomme_results_{setting}.json"


def answer_videomme(
    answerer: Answerer, videos: Sequence[VideommeVideo], video_dir: Path, params: VideommeParams
) -> dict[VideommeSetting, list[VideommeVideo]]:
    """The videos with the model's response to each question, per setting in `params.settings`.

    Every video file is looked up before the first question is asked, so a missing one fails
    at once instead of after hours of answering.
    """
    video_paths = [find_video(video_dir, video) for video in videos]
    answered: dict[VideommeSetting, list[VideommeVideo]] = {}
    for setting in params.settings:
        answered[setting] = []
        for video, path in zip(videos, video_paths):
            subtitles = (
                subtitles_shown(path, find_subtitles(video_dir, video), params.frames)
                if setting == "with_subtitles" else None
            )
            questions = [
                question.model_copy(update={"response": answerer.answer(videomme_question(
                    question.question, question.options, path, params.frames, subtitles, params.max_new_tokens,
                ))})
                for question in video.questions
            ]
            answered[setting].append(video.model_copy(update={"questions": questions}))
    return answered


def score_answers(answered: dict[VideommeSetting, list[VideommeVideo]]) -> VideommeScores:
    return VideommeScores(
        settings={setting: score_videos(videos, f"VideoMME {setting}") for setting, videos in answered.items()}
    )


def evaluate_videomme(answerer: Answerer, params: VideommeParams, out_dir: Path) -> VideommeScores:
    """Answer every question in each setting, then write into `out_dir` the results files (one
    per setting, scorable by the benchmark's own script), the scores JSON, the markdown table and
    the plot. Without `params.annotations`, the synthetic fixture is written there and used."""
    if params.annotations is None:
        annotations = write_videomme_fixture(out_dir / FIXTURE_DIR)
        video_dir = annotations.parent
    else:
        annotations = Path(params.annotations)
        video_dir = Path(params.video_dir) if params.video_dir is not None else annotations.parent
    answered = answer_videomme(answerer, load_videomme(annotations), video_dir, params)
    for setting, videos in answered.items():
        write_results(results_file(out_dir, setting), videos)
    scores = score_answers(answered)
    write_videomme_report(scores, out_dir)
    return scores
