"""VideoMME's prompt, as the benchmark's README (github.com/BradyFU/Video-MME, "Evaluation
Pipeline") gives it, without and with the subtitles shown at the sampled frames.

Without subtitles:
    Select the best answer to the following multiple-choice question based on the video. Respond with only the letter (A, B, C, or D) of the correct option.
    What is the color of the clothing worn by the persons in the video?
    A. Black.
    B. Gray.
    C. Green.
    D. Brown.
    The best answer is:
With subtitles, the same after "This video's subtitles are listed below:" and the subtitles, one
per line. As lmms-eval (tasks/videomme) does, the subtitles are those on screen at the frames the
model sees, and a video without an .srt file gets "No subtitles available" in their place.
"""

from __future__ import annotations

from pathlib import Path

from omnilong.config import FrameSampling
from omnilong.data.subtitles import parse_srt, subtitle_text, subtitles_at
from omnilong.data.video_frames import sample_frames, video_info
from omnilong.eval.answering import Question, VideoQuery
from omnilong.eval.videomme_extract import OPTION_LETTERS, option_text

INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
SUBTITLES_HEADER = "This video's subtitles are listed below:"
NO_SUBTITLES = "No subtitles available"
ANSWER_CUE = "The best answer is:"


def option_lines(options: list[str]) -> list[str]:
    """The options as the dataset writes them ("A. Black."); a label is added where one is missing."""
    return [f"{letter}. {option_text(option)}" for letter, option in zip(OPTION_LETTERS, options)]


def videomme_prompt(question: str, options: list[str], subtitles: str | None) -> str:
    """The user turn; `subtitles` None is the setting without subtitles."""
    lines = [SUBTITLES_HEADER, subtitles] if subtitles is not None else []
    return "\n".join([*lines, INSTRUCTION, question, *option_lines(options), ANSWER_CUE])


def subtitles_shown(video_path: Path, srt_path: Path | None, sampling: FrameSampling) -> str:
    """The subtitles on screen at the frames `sampling` takes from the video (the frames the
    answerer samples for the same VideoQuery), one per line in time order."""
    if srt_path is None:
        return NO_SUBTITLES
    timestamps = sample_frames(video_info(video_path), sampling).timestamps
    return subtitle_text(subtitles_at(parse_srt(srt_path), timestamps))


def videomme_question(
    question: str, options: list[str], video_path: Path, sampling: FrameSampling, subtitles: str | None,
    max_new_tokens: int,
) -> Question:
    return Question(
        messages=[{"role": "user", "content": videomme_prompt(question, options, subtitles)}],
        video=VideoQuery(path=video_path, sampling=sampling),
        max_new_tokens=max_new_tokens,
    )
