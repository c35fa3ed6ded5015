"""Text NIAH prompts: a needle in a haystack cut so the whole rendered prompt has an exact length.

The context length of a prompt is its token count as the model sees it: the chat rendered by
the tokenizer's own chat template with the generation prompt (`apply_chat_template(messages,
add_generation_prompt=True)`), tokenized without added special tokens, as `apply_chat_template`
tokenizes. It covers the template's tokens (system turn, role tags), the haystack, the needle
and the question. One user turn holds the haystack, then the question, worded as in the usual
needle-in-a-haystack setup (Kamradt's, RULER's `The special magic ... number is: ...`).

The haystack's cut is found by search: token counts are not additive across the seams between
haystack, needle and template, so each candidate prompt is rendered and counted.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Any

from omnilong.eval.niah_haystack import Haystack

NEEDLE = "The special magic {city} number is: {number}."
QUESTION = (
    "What is the special magic {city} number? Don't give information outside the document or repeat your findings."
)
# Well-known cities; at build time those the haystack mentions are dropped, so a needle's key
# is never a word the model read around it (or in training, when the haystack is training text).
CITIES = (
    "Amsterdam", "Antananarivo", "Astana", "Athens", "Baghdad", "Bangkok", "Barcelona", "Beirut",
    "Belgrade", "Bratislava", "Brussels", "Bucharest", "Budapest", "Buenos Aires", "Cairo",
    "Chicago", "Colombo", "Copenhagen", "Dakar", "Damascus", "Doha", "Dublin", "Hanoi", "Helsinki",
    "Istanbul", "Jakarta", "Johannesburg", "Kampala", "Khartoum", "Kigali", "Lagos", "Lima",
    "Lisbon", "Madrid", "Maputo", "Melbourne", "Montevideo", "Nairobi", "Oslo", "Reykjavik",
    "Santiago", "Sarajevo", "Seoul", "Sofia", "Tashkent", "Thimphu", "Tunis", "Vancouver",
    "Yangon", "Yerevan",
)
# Secant steps on the haystack's token count before bisecting characters; 2-3 usually suffice.
MAX_SECANT_STEPS = 8
# Characters either side of the last bisection step searched when no cut there is exact.
EXACT_SEARCH_WINDOW = 4
# Sentence starts the haystack may begin at, tried in order, when no cut from the first is exact.
MAX_STARTS = 16


@dataclass(frozen=True)
class Needle:
    city: str
    number: str
    """Seven digits, no leading zero."""

    @property
    def sentence(self) -> str:
        return NEEDLE.format(city=self.city, number=self.number)

    @property
    def question(self) -> str:
        return QUESTION.format(city=self.city)


@dataclass(frozen=True)
class NiahPrompt:
    messages: list[dict[str, str]]
    needle: Needle
    depth: float
    prompt_tokens: int
    """Tokens of the rendered prompt: the context length."""
    needle_token_position: int
    """Index, in the prompt's tokens, of the token holding the needle's first character."""
    haystack_token_span: tuple[int, int]
    """[start, end) of the haystack (needle included) in the prompt's tokens."""


def needle_cities(haystack: Haystack) -> list[str]:
    """The cities of the pool that the haystack's text never mentions (ignoring case)."""
    cities = [city for city in CITIES if not haystack.contains(city)]
    if not cities:
        raise ValueError(f"every needle city ({', '.join(CITIES)}) occurs in the haystack; use another haystack")
    return cities


def draw_needle(haystack: Haystack, cities: list[str], rng: random.Random) -> Needle:
    """One of `cities` and a 7-digit number that does not occur in the haystack's text."""
    number = str(rng.randrange(1_000_000, 10_000_000))
    while haystack.contains(number):
        number = str(rng.randrange(1_000_000, 10_000_000))
    return Needle(rng.choice(cities), number)


def build_prompt(
    haystack: Haystack, tokenizer: Any, needle: Needle, depth: float, start: int, cut: int
) -> NiahPrompt:
    """The prompt whose haystack is `haystack.text[start:cut]` with the needle at `depth` percent."""
    document = haystack.text[start:cut]
    at = haystack.needle_offset(start, cut, depth) - start
    before = "" if at == 0 or document[at - 1].isspace() else " "
    after = "" if at == len(document) or document[at].isspace() else " "
    document = f"{document[:at]}{before}{needle.sentence}{after}{document[at:]}"
    content = f"{document}\n\n{needle.question}"
    messages = [{"role": "user", "content": content}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    document_start = rendered.find(content)
    if document_start < 0 or rendered.count(needle.sentence) != 1:
        raise ValueError("the chat template does not render the user's text verbatim; the NIAH cannot place its needle")
    offsets = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    token_ends = [end for _, end in offsets]

    def token_at(char: int) -> int:  # the token holding character `char`
        return bisect.bisect_right(token_ends, char)

    needle_start = document_start + at + len(before)
    return NiahPrompt(
        messages=messages,
        needle=needle,
        depth=depth,
        prompt_tokens=len(offsets),
        needle_token_position=token_at(needle_start),
        haystack_token_span=(token_at(document_start), token_at(document_start + len(document) - 1) + 1),
    )


def fit_prompt(haystack: Haystack, tokenizer: Any, needle: Needle, depth: float, length: int) -> NiahPrompt:
    """The prompt of exactly `length` tokens with the needle at `depth` percent of its haystack.

    The haystack is the text from its start to the cut that makes the count exact. Where no cut
    does (one more character can add two tokens: `1.` then `1.0` before the question's blank
    line), the haystack starts at the next sentence instead.
    """
    shortest = build_prompt(haystack, tokenizer, needle, depth, 0, 0)
    if shortest.prompt_tokens >= length:
        raise ValueError(
            f"eval.niah.context_lengths: {length} tokens cannot hold the chat template, needle and question "
            f"({shortest.prompt_tokens} tokens) and any haystack"
        )
    for start in haystack.sentence_starts[:MAX_STARTS]:
        prompt = _fit_from(haystack, tokenizer, needle, depth, length, start, length - shortest.prompt_tokens)
        if prompt is not None:
            return prompt
    raise ValueError(
        f"no cut of the haystack from its first {MAX_STARTS} sentence starts gives a prompt of exactly "
        f"{length} tokens (needle depth {depth}%)"
    )


def _fit_from(
    haystack: Haystack, tokenizer: Any, needle: Needle, depth: float, length: int, start: int, tokens: int
) -> NiahPrompt | None:
    """The prompt of `length` tokens whose haystack starts at `start`, found from a first guess of
    `tokens` haystack tokens; None if no cut gives exactly `length` tokens."""

    def build(cut: int) -> NiahPrompt:
        return build_prompt(haystack, tokenizer, needle, depth, start, cut)

    available = len(haystack) - haystack.first_token(start)
    low, high = start, None  # cuts known to give fewer / more tokens than `length`
    for _ in range(MAX_SECANT_STEPS):
        tokens = min(max(tokens, 1), available)
        cut = haystack.cut_after(start, tokens)
        if cut <= low or (high is not None and cut >= high):
            break
        prompt = build(cut)
        if prompt.prompt_tokens == length:
            return prompt
        if prompt.prompt_tokens < length:
            low = cut
        else:
            high = cut
        tokens += length - prompt.prompt_tokens
    if high is None:
        high = len(haystack.text)
        longest = build(high)
        if longest.prompt_tokens == length:
            return longest
        if longest.prompt_tokens < length:
            raise ValueError(
                f"the haystack ({available} tokens from character {start}) is too short for a context length "
                f"of {length} tokens; give a larger corpus (eval.niah.haystack_dir)"
            )
    while high - low > 1:
        middle = (low + high) // 2
        prompt = build(middle)
        if prompt.prompt_tokens == length:
            return prompt
        if prompt.prompt_tokens < length:
            low = middle
        else:
            high = middle
    # One more character added two tokens here; the count is not always monotonic, so look nearby.
    nearby = range(max(low - EXACT_SEARCH_WINDOW, start + 1), min(high + EXACT_SEARCH_WINDOW, len(haystack.text) + 1))
    for cut in nearby:
        if cut not in (low, high):
            prompt = build(cut)
            if prompt.prompt_tokens == length:
                return prompt
    return None
