"""Reading the chosen option's letter out of a model's VideoMME reply, two ways.

`official_extract` is the benchmark's own extractor (`extract_characters_regex` in
evaluation/eval_your_results.py of github.com/BradyFU/Video-MME), reproduced with its quirks,
because published VideoMME numbers are made with it:
- it strips a few answer lead-ins, then takes the first capital A, B, C or D *anywhere*, so
  "Definitely A" reads as D, "Answer: C" as A and "The best answer is Brown" as B;
- two pairs of its lead-ins lack a comma between them in its source, so Python joins each pair
  into one string ("The best option isThe correct option is", "Best answer:Best option:") that
  never occurs: "Best answer: C" is not stripped and reads as B.

`strict_extract` is reported beside it; it reads a letter only where one is written as an
option letter (see its docstring), and otherwise the option whose text the reply names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

OPTION_LETTERS = "ABCD"

# The official list, in its order, with the two accidental concatenations written out.
_OFFICIAL_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
)
_OFFICIAL_LETTER = re.compile(r"[ABCD]")
# A capital A-D that is a word of its own: no letter, digit or apostrophe touching it.
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9'’])[ABCD](?![A-Za-z0-9'’])")
# "A dog ...": the article, not option A; "A or B", "A is correct" use the letter.
_ARTICLE_A = re.compile(r"A\s+(?!(?:or|and|is|was|because)\b)[a-z]")
# An option as the dataset writes it: "B. Gray." -> "Gray."
_OPTION_LABEL = re.compile(r"^\s*[ABCD]\s*[.)]\s*")


def official_extract(response: str) -> str:
    """The letter VideoMME's official script reads from `response`, or "" for none."""
    text = response.strip()
    for prefix in _OFFICIAL_PREFIXES:
        text = text.replace(prefix, "")
    # The official script first returns "" for replies over 10 words without a capital A-D;
    # the search below returns "" for those too, so that check changes no result.
    match = _OFFICIAL_LETTER.search(text)
    return match[0] if match else ""


def option_text(option: str) -> str:
    """An option without its letter label: "B. Gray." -> "Gray."."""
    return _OPTION_LABEL.sub("", option, count=1).strip()


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def strict_extract(response: str, options: Sequence[str]) -> str:
    """The letter a reply clearly chooses, or "" when it chooses none or several.

    1. Option letters: the capital A-D in `response` that stand as words of their own (nothing
       alphanumeric touching them: "B", "(B)", "B.", "B)", "**B**", "is B,"), leaving out an "A"
       followed by a lowercase word other than or/and/is/was/because (the article, as in "A dog
       runs"; "A or B" and "A is correct" keep it). Exactly one distinct letter among them is the
       answer; two or more ("A or B") choose none.
    2. Otherwise, option texts: the options (label removed) whose words appear, as consecutive
       whole words, case and punctuation ignored, in the reply. Exactly one is the answer.
    Lowercase letters never count ("b" is not read as B), as in the official extractor.
    """
    letters = {
        match[0]
        for match in _STANDALONE_LETTER.finditer(response)
        if not (match[0] == "A" and _ARTICLE_A.match(response, match.start()))
    }
    if letters:
        return letters.pop() if len(letters) == 1 else ""
    reply = f" {_normalise(response)} "
    named = {
        letter
        for letter, option in zip(OPTION_LETTERS, options)
        if (words := _normalise(option_text(option))) and f" {words} " in reply
    }
    return named.pop() if len(named) == 1 else ""
