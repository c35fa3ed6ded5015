"""The visual needles of V-NIAH: five images made offline, each with its question and answer.

After LongVA's V-NIAH: a needle image is hidden among a haystack video's frames and the model
is asked about it. Ours are rendered here (no download): a digit, a colour, a word, a shape
(multiple choice, answered by its letter) and a count. Each fills the frame it is drawn on, so
it reads at any haystack resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class NeedleProblem:
    name: str
    question: str
    answer: str
    """The exact answer text: teacher-forced scoring asks for its tokens, generation for the text."""


PROBLEMS: tuple[NeedleProblem, ...] = (
    NeedleProblem("digit", "What digit is written on the card that appears in the video? Answer with the digit only.", "7"),
    NeedleProblem("colour", "What colour is the card that appears in the video? Answer with one word.", "red"),
    NeedleProblem("word", "What word is written on the card that appears in the video? Answer with the word only.", "CAT"),
    NeedleProblem(
        "shape",
        "Which shape is drawn on the card that appears in the video?\nA. circle\nB. triangle\nC. square\nD. star\n"
        "Answer with the option's letter.",
        "B",
    ),
    NeedleProblem("count", "How many dots are on the card that appears in the video? Answer with a number.", "3"),
)


def render_needle(problem: NeedleProblem, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3]: the needle card of `problem`."""
    side = min(height, width)
    background = {"colour": (220, 30, 30)}.get(problem.name, (255, 255, 255))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    centre = (width / 2, height / 2)
    if problem.name in ("digit", "word"):
        font = ImageFont.load_default(size=max(8, int(side * (0.7 if problem.name == "digit" else 0.35))))
        draw.text(centre, problem.answer, fill=(0, 0, 0), font=font, anchor="mm")
    elif problem.name == "shape":
        r = side * 0.4
        draw.polygon([(centre[0], centre[1] - r), (centre[0] - r, centre[1] + r * 0.8), (centre[0] + r, centre[1] + r * 0.8)],
                     fill=(0, 0, 200))
    elif problem.name == "count":
        r = side * 0.09
        for i in range(int(problem.answer)):
            x = width * (i + 1) / (int(problem.answer) + 1)
            draw.ellipse([x - r, centre[1] - r, x + r, centre[1] + r], fill=(0, 0, 0))
    return np.asarray(image)
