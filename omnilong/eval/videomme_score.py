"""VideoMME accuracy from the responses: overall and by duration, domain and task type.

Each group is scored with both extractors (videomme_extract) and two denominators:
- `accuracy`: correct / every question; a reply no letter is read from counts as wrong;
- `answered_accuracy`: correct / the questions a letter was read from. With the official
  extractor this is the benchmark's own figure (evaluation/eval_your_results.py counts a
  question as "answered" only when its extraction is not empty), the one papers publish.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from omnilong.config import VideommeSetting
from omnilong.eval.videomme_data import DURATIONS, VideommeDataError, VideommeVideo, load_videomme
from omnilong.eval.videomme_extract import official_extract, strict_extract

Grouping = Literal["duration", "domain", "task_type"]
GROUPINGS: tuple[Grouping, ...] = ("duration", "domain", "task_type")
EXTRACTORS = ("official", "strict")


class _Score(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScoredQuestion(_Score):
    question_id: str
    video_id: str
    duration: str
    domain: str
    task_type: str
    answer: str
    response: str
    official: str
    """The letter the official extractor reads ("" for none)."""
    strict: str


class ExtractorScore(_Score):
    extracted: int
    correct: int
    accuracy: float
    """correct / every question of the group."""
    answered_accuracy: float
    """correct / extracted (0 when nothing was extracted, as the official script prints it)."""
    extraction_rate: float


class GroupScore(_Score):
    questions: int
    official: ExtractorScore
    strict: ExtractorScore


class SettingScore(_Score):
    overall: GroupScore
    duration: dict[str, GroupScore]
    """short, medium, long: those present, in that order."""
    domain: dict[str, GroupScore]
    task_type: dict[str, GroupScore]
    questions: list[ScoredQuestion]


class VideommeScores(_Score):
    settings: dict[VideommeSetting, SettingScore]


def score_question(video: VideommeVideo, index: int, source: str) -> ScoredQuestion:
    question = video.questions[index]
    if question.response is None:
        raise VideommeDataError(
            f"{source}: video {video.video_id!r}: questions.{index} ({question.question_id!r}): "
            f"response: required field is missing (a results file gives every question the model's reply)"
        )
    return ScoredQuestion(
        question_id=question.question_id, video_id=video.video_id, duration=video.duration, domain=video.domain,
        task_type=question.task_type, answer=question.answer, response=question.response,
        official=official_extract(question.response), strict=strict_extract(question.response, question.options),
    )


def _extractor_score(questions: Sequence[ScoredQuestion], letter: Callable[[ScoredQuestion], str]) -> ExtractorScore:
    extracted = sum(1 for q in questions if letter(q))
    correct = sum(1 for q in questions if letter(q) == q.answer)
    return ExtractorScore(
        extracted=extracted,
        correct=correct,
        accuracy=correct / len(questions),
        answered_accuracy=correct / extracted if extracted else 0.0,
        extraction_rate=extracted / len(questions),
    )


def group_score(questions: Sequence[ScoredQuestion]) -> GroupScore:
    return GroupScore(
        questions=len(questions),
        official=_extractor_score(questions, lambda q: q.official),
        strict=_extractor_score(questions, lambda q: q.strict),
    )


def _by(questions: Sequence[ScoredQuestion], grouping: Grouping) -> dict[str, GroupScore]:
    groups: dict[str, list[ScoredQuestion]] = {}
    for question in questions:
        groups.setdefault(getattr(question, grouping), []).append(question)
    order = DURATIONS if grouping == "duration" else sorted(groups)
    return {name: group_score(groups[name]) for name in order if name in groups}


def score_videos(videos: Sequence[VideommeVideo], source: str) -> SettingScore:
    """Scores of one setting's responses; `source` names them in errors (a file, a setting)."""
    questions = [score_question(video, i, source) for video in videos for i in range(len(video.questions))]
    if not questions:
        raise VideommeDataError(f"{source}: no questions to score")
    return SettingScore(
        overall=group_score(questions), **{grouping: _by(questions, grouping) for grouping in GROUPINGS},
        questions=questions,
    )


def score_results_files(files: Mapping[VideommeSetting, str | Path]) -> VideommeScores:
    """Scores of existing results files (the benchmark's JSON with a `response` per question, or
    the parquet with a `response` column), one per setting; no model runs."""
    return VideommeScores(
        settings={setting: score_videos(load_videomme(path), str(path)) for setting, path in files.items()}
    )


def _metric_part(name: str) -> str:
    # MLflow metric names allow few characters: "Film & Television" -> "film_television".
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def videomme_metrics(scores: VideommeScores) -> dict[str, float]:
    """Every figure under one flat name, e.g. `videomme.with_subtitles.duration.long.official.accuracy`."""
    metrics = {}
    for setting, score in scores.settings.items():
        groups = {"overall": score.overall} | {
            f"{grouping}.{_metric_part(name)}": group
            for grouping in GROUPINGS for name, group in getattr(score, grouping).items()
        }
        for group_name, group in groups.items():
            for extractor in EXTRACTORS:
                for metric, value in getattr(group, extractor).model_dump().items():
                    if metric in ("accuracy", "answered_accuracy", "extraction_rate"):
                        metrics[f"videomme.{setting}.{group_name}.{extractor}.{metric}"] = value
    return metrics
