"""What the evaluations ask of a model: an answer to a chat, with or without a video.

Every evaluation (text NIAH, V-NIAH, VideoMME) talks to an `Answerer`. The real one
(omnilong/infer) runs a model the pipeline produced; tests use scripted ones (an oracle, a
model that always says "A") to check the scorers themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from omnilong.config import FrameSampling


@dataclass(frozen=True)
class VideoQuery:
    """The video shown before the first user turn's text, and which of its frames."""

    path: Path
    sampling: FrameSampling
    start_s: float | None = None
    end_s: float | None = None


@dataclass(frozen=True)
class Question:
    """One evaluation prompt: chat messages ({"role", "content"} with string content, ending
    with the user's turn), an optional video, and how long an answer may be."""

    messages: list[dict[str, str]]
    video: VideoQuery | None = None
    max_new_tokens: int = 32


class Answerer(Protocol):
    def answer(self, question: Question) -> str:
        """The model's reply to `question` (the generated text only, special tokens removed)."""
        ...
