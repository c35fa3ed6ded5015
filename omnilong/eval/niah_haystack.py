"""The text NIAH's haystack: corpus text, cleaned of long numbers, tokenized once, cut anywhere.

The text is the text records of corpus directories (through their field mappings) in order
(files sorted, records as they come), joined by blank lines. Runs of 7 or more digits are
masked, so the only 7-digit number a prompt holds is its needle's. Cuts are measured in the
model's own tokens; needles go at sentence starts: after `.`, `!` or `?` and whitespace, after
a blank line, or at the very start.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omnilong.config import CorpusFields, Params, corpus_path
from omnilong.data.schemas import TextRecord, corpus_files, corpus_layout, iter_records
from omnilong.data.synth.text import mask_long_numbers

DOCUMENT_SEPARATOR = "\n\n"
# Where a new sentence starts: after a sentence's end and its whitespace, or after a blank line.
SENTENCE_END = re.compile(r"[.!?]\s+|\n[ \t]*\n\s*")
# The haystack read for a run: ample for any tokenizer (BPE tokens average 3-5 characters).
MAX_CHARS_PER_TOKEN = 16


def read_haystack_text(
    corpus_dirs: Sequence[Path], max_chars: int | None = None, fields: Mapping[Path, CorpusFields] | None = None
) -> str:
    """The text records of `corpus_dirs`, in order, joined by blank lines; reading stops once
    `max_chars` characters are in hand. `fields`: the field mapping of each corpus dir that has one."""
    parts: list[str] = []
    chars = 0
    for corpus_dir in corpus_dirs:
        files = corpus_files(Path(corpus_dir), "text")
        if not files:
            raise FileNotFoundError(
                f"{corpus_dir}: expected {corpus_layout(Path(corpus_dir), 'text')} for the NIAH haystack, found none"
            )
        for path in files:
            for record in iter_records(path, "text", (fields or {}).get(corpus_dir)):
                assert isinstance(record, TextRecord)
                parts.append(record.text)
                chars += len(record.text) + len(DOCUMENT_SEPARATOR)
                if max_chars is not None and chars >= max_chars:
                    return DOCUMENT_SEPARATOR.join(parts)
    return DOCUMENT_SEPARATOR.join(parts)


def niah_haystack_dirs(params: Params, base: Path = Path(".")) -> list[Path]:
    """`eval.niah.haystack_dir` if set, else the stage-1 corpora (paths relative to `base`)."""
    if params.eval.niah.haystack_dir is not None:
        return [base / params.eval.niah.haystack_dir]
    raw_dir = base / params.data.raw_dir
    return [corpus_path(raw_dir, corpus) for corpus in params.stages.stage1.corpora]


def niah_haystack_text(params: Params, base: Path = Path(".")) -> str:
    """The configured haystack source, read as far as the longest context can need."""
    max_chars = MAX_CHARS_PER_TOKEN * max(params.eval.niah.context_lengths)
    raw_dir = base / params.data.raw_dir
    fields = {corpus_path(raw_dir, name): mapping for name, mapping in params.data.fields.items()}
    return read_haystack_text(niah_haystack_dirs(params, base), max_chars, fields)


class Haystack:
    """Haystack text (long numbers masked) with its tokens' character spans and its sentence starts.

    `tokenizer` must be a fast tokenizer (character offsets of tokens); its tokens of the whole
    text give where a cut after k tokens falls and how many tokens a prefix holds.
    """

    def __init__(self, text: str, tokenizer: Any):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"the NIAH needs a fast tokenizer (token character offsets), given {type(tokenizer).__name__}"
            )
        self.text = mask_long_numbers(text)
        offsets = tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        self.token_starts = [start for start, _ in offsets]
        self.token_ends = [end for _, end in offsets]
        self.sentence_starts = [0] + [match.end() for match in SENTENCE_END.finditer(self.text)]
        self._folded = self.text.casefold()

    def __len__(self) -> int:
        """Tokens of the whole text."""
        return len(self.token_ends)

    def contains(self, string: str) -> bool:
        """Whether `string` occurs in the text, ignoring case."""
        return string.casefold() in self._folded

    def first_token(self, start: int) -> int:
        """Index of the token holding character `start`."""
        return bisect.bisect_right(self.token_ends, start)

    def cut_after(self, start: int, tokens: int) -> int:
        """Where the `tokens` tokens from character `start` on end."""
        return self.token_ends[self.first_token(start) + tokens - 1] if tokens > 0 else start

    def needle_offset(self, start: int, cut: int, depth: float) -> int:
        """Where a needle at `depth` percent goes in `text[start:cut]` (`start` a sentence start):
        the last sentence start at or before the token at that depth, or `cut` itself at depth 100
        (the very end)."""
        first = self.first_token(start)
        tokens = bisect.bisect_right(self.token_ends, cut) - first
        target = int(depth * tokens / 100 + 0.5)
        if target >= tokens:
            return cut
        target_char = max(self.token_starts[first + target], start)
        return self.sentence_starts[bisect.bisect_right(self.sentence_starts, target_char) - 1]
