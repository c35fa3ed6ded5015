"""Stage-2 instructions: long-context tasks built around stage-1 text, with short exact answers.

Three tasks take turns: retrieving a value from a long JSON object of random keys; finding a
sentence hidden at a random depth of a long document; and questions about the structure of a
long document (which function is defined right after or before another, how many functions
are defined, how often a word occurs). The evaluation's needles (7-digit "special magic
numbers" keyed by city names) are reserved: nothing here uses that phrase, city names or 7-digit
numbers, so training cannot leak into the NIAH scores.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from omnilong.config import InstructSynthParams
from omnilong.data.schemas import InstructRecord, Message
from omnilong.data.synth.text import LONG_NUMBER, TextDoc, cut_at_lines

TASKS = ("kv_retrieval", "needle", "doc_qa")

NEEDLE_ADJECTIVES = ("amber", "copper", "silent", "velvet", "crimson", "frozen", "hollow", "golden", "rusty", "lunar")
NEEDLE_NOUNS = ("lantern", "falcon", "compass", "teapot", "violin", "anchor", "kettle", "telescope", "saddle", "mirror")
CODE_WORDS = ("maple", "orbit", "pebble", "tundra", "willow", "comet", "ember", "quartz", "meadow", "cobalt", "thistle")
# (statement hidden in the document, question asked about it), both about `{thing}`.
NEEDLE_TEMPLATES = (
    ("The password of the {thing} is {code}.", "What is the password of the {thing}? Answer with the password only."),
    ("The {thing} is kept in locker {code}.", "In which locker is the {thing} kept? Answer with the locker only."),
    ("The word engraved on the {thing} is {code}.", "What word is engraved on the {thing}? Answer with the word only."),
)

DEF_NAME = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+([A-Za-z_]\w*)", re.MULTILINE)
LONG_WORD = re.compile(r"\b[A-Za-z]{5,}\b")
# A long context is cut to between this fraction of `context_chars` and `context_chars`.
MIN_CONTEXT_FRACTION = 0.9
MAX_DOC_QA_DRAWS = 100


def haystack(docs: Sequence[TextDoc], rng: random.Random, chars: int) -> str:
    """Randomly drawn documents, joined and cut at a line end to about `chars` characters."""
    parts: list[str] = []
    while sum(map(len, parts)) < chars:
        parts.append(rng.choice(docs).text.rstrip("\n") + "\n\n")
    return cut_at_lines("".join(parts), int(chars * MIN_CONTEXT_FRACTION), chars)


def uuid_without_long_number(rng: random.Random) -> str:
    """A random UUID-like key; drawn again while its hex happens to hold 7 digits in a row."""
    while True:
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if not LONG_NUMBER.search(key):
            return key


def kv_retrieval(docs: Sequence[TextDoc], rng: random.Random, chars: int) -> tuple[str, str, str]:
    """(context, question, answer): a JSON object of random keys, asked for one value."""
    six_digit_values = rng.random() < 0.5
    pairs: dict[str, str] = {}
    lines = ["Below is a JSON object that maps keys to values.", "", "{"]
    while sum(map(len, lines)) + len(lines) < chars:
        key = uuid_without_long_number(rng)
        value = str(rng.randint(100_000, 999_999)) if six_digit_values else uuid_without_long_number(rng)
        pairs[key] = value
        lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines[-1] = lines[-1].rstrip(",")
    lines.append("}")
    key = rng.choice(sorted(pairs))
    question = f"What is the value for the key {json.dumps(key)} in the JSON object above? Answer with the value only."
    return "\n".join(lines), question, pairs[key]


def needle(docs: Sequence[TextDoc], rng: random.Random, chars: int) -> tuple[str, str, str]:
    """(context, question, answer): a sentence inserted on its own line at a random depth."""
    statement, question = rng.choice(NEEDLE_TEMPLATES)
    thing = f"{rng.choice(NEEDLE_ADJECTIVES)} {rng.choice(NEEDLE_NOUNS)}"
    code = f"{rng.choice(CODE_WORDS)}-{rng.choice(CODE_WORDS)}-{rng.randint(100, 999)}"
    sentence = statement.format(thing=thing, code=code)
    lines = haystack(docs, rng, chars - len(sentence) - 1).splitlines(keepends=True)
    depth = rng.randint(0, len(lines))
    context = "".join(lines[:depth] + [sentence + "\n"] + lines[depth:])
    return context, question.format(thing=thing), code


def _structure_questions(context: str) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) about `context` whose answer is unambiguous, by kind of question."""
    names = DEF_NAME.findall(context)
    unique = [index for index, name in enumerate(names) if names.count(name) == 1]
    after = "Which function is defined right {} `{}` in the code above? Answer with the function name only."
    word_counts = Counter(LONG_WORD.findall(context))
    questions = {
        "def_after": [(after.format("after", names[i]), names[i + 1]) for i in unique if i + 1 < len(names)],
        "def_before": [(after.format("before", names[i]), names[i - 1]) for i in unique if i > 0],
        "def_count": [
            ("How many functions and methods are defined with `def` in the code above? "
             "Answer with a number only.", str(len(names)))
        ] if names else [],
        "word_count": [
            (f'How many times does the word "{word}" occur in the document above (whole words, '
             "case-sensitive)? Answer with a number only.", str(count))
            for word, count in sorted(word_counts.items())
            if 2 <= count <= 9
        ],
    }
    return {kind: pairs for kind, pairs in questions.items() if pairs}


def doc_qa(docs: Sequence[TextDoc], rng: random.Random, chars: int) -> tuple[str, str, str]:
    """(context, question, answer): a question about the structure of a long (preferably code) document."""
    code_docs = [doc for doc in docs if doc.kind == "code"] or docs
    for _ in range(MAX_DOC_QA_DRAWS):
        context = haystack(code_docs, rng, chars)
        questions = _structure_questions(context)
        if questions:
            # The kind of question first, so the many word counts do not crowd out the rest.
            kind = rng.choice(sorted(questions))
            question, answer = rng.choice(questions[kind])
            return context, question, answer
    raise ValueError(
        f"no structure question could be asked about {MAX_DOC_QA_DRAWS} contexts drawn from the stage-1 "
        "documents (they hold no `def` lines and no word of 5+ letters occurring 2-9 times)"
    )


TASK_BUILDERS: dict[str, Callable[[Sequence[TextDoc], random.Random, int], tuple[str, str, str]]] = {
    "kv_retrieval": kv_retrieval,
    "needle": needle,
    "doc_qa": doc_qa,
}


def synthesize_instructions(
    params: InstructSynthParams, docs: Sequence[TextDoc], seed: int
) -> Iterator[InstructRecord]:
    """Yield `params.num_samples` single-turn chats, the tasks in turn."""
    if not docs:
        raise ValueError("instruction samples are built from stage-1 documents, and there are none")
    rng = random.Random(f"{seed}:instruct")
    for index in range(params.num_samples):
        task = TASKS[index % len(TASKS)]
        context, question, answer = TASK_BUILDERS[task](docs, rng, params.context_chars)
        yield InstructRecord(
            id=f"instruct-{index:05d}-{task}",
            messages=[
                Message(role="user", content=f"{context}\n\n{question}"),
                Message(role="assistant", content=answer),
            ],
        )
