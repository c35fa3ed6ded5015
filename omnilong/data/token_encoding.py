"""Texts -> token ids with the tokenizers library alone: the work `prepare` hands its workers.

A worker holds the model tokenizer's Rust backend, sent to it serialised (`backend_json`): the
object transformers itself encodes with, so its ids are `tokenizer.encode`'s. This module imports
only numpy and tokenizers, so a worker starts in well under a second; importing transformers
(and torch with it) would cost each worker seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import Tokenizer

TOKEN_DTYPE = np.dtype("<i4")


def backend_json(tokenizer: Any) -> str:
    """A transformers fast tokenizer's backend, serialised as its workers load it."""
    return tokenizer.backend_tokenizer.to_str()


def load_backend(serialised: str, split_special_tokens: bool) -> Tokenizer:
    backend = Tokenizer.from_str(serialised)
    # What transformers sets before each encode call that asks for no truncation and no padding.
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = split_special_tokens
    return backend


def encode_texts(backend: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """The ids of each text without special tokens added (`tokenizer.encode(text,
    add_special_tokens=False)`), all in one call of the library."""
    return [np.asarray(encoding.ids, dtype=TOKEN_DTYPE)
            for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
