"""Text needle-in-a-haystack: a grid of context lengths x needle depths, scored and plotted.

Every cell asks the model, through an `Answerer`, for a needle's 7-digit number hidden in a
haystack whose whole rendered prompt is exactly the cell's context length (see `niah_prompt`).
A needle is found when its number appears in the answer as a number of its own (not inside a
longer run of digits). Outputs: `niah.json` (every needle of every cell, and the grid of
scores) and `niah.png` (depth x length heatmap), both written atomically.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from omnilong import atomic
from omnilong.config import NiahParams
from omnilong.eval.answering import Answerer, Question
from omnilong.eval.niah_haystack import Haystack
from omnilong.eval.niah_prompt import draw_needle, fit_prompt, needle_cities
from omnilong.eval.plots import save_heatmap

RESULTS_FILE = "niah.json"
HEATMAP_FILE = "niah.png"


def score_answer(answer: str, number: str) -> float:
    """1.0 when `number` appears in `answer` with no digit right before or after it, else 0.0."""
    return 1.0 if re.search(rf"(?<!\d){re.escape(number)}(?!\d)", answer) else 0.0


def run_niah(answerer: Answerer, tokenizer: Any, haystack_text: str, params: NiahParams, out_dir: Path) -> dict:
    """Ask every cell's needles, score them, write `niah.json` and `niah.png` to `out_dir`.

    `tokenizer` is the model's own (fast, with its chat template); `haystack_text` is the text
    to cut haystacks from (`niah_haystack.niah_haystack_text` reads the configured corpus).
    Returns what `niah.json` holds: `scores[d][l]` is the fraction of needles found at
    `depths[d]` and `context_lengths[l]`; `cells` has one entry per needle.
    """
    haystack = Haystack(haystack_text, tokenizer)
    cities = needle_cities(haystack)
    grid = [(length, depth, index) for length in params.context_lengths for depth in params.depths
            for index in range(params.needles_per_cell)]
    cells = []
    for length, depth, index in tqdm(grid, desc="text NIAH", unit="needle"):
        # Each needle has its own generator, so a cell's needle does not depend on the rest of the grid.
        needle = draw_needle(haystack, cities, random.Random(f"{params.seed}:{length}:{depth}:{index}"))
        prompt = fit_prompt(haystack, tokenizer, needle, depth, length)
        answer = answerer.answer(Question(messages=prompt.messages, max_new_tokens=params.max_new_tokens))
        cells.append(
            {
                "context_length": length,
                "depth": depth,
                "needle_index": index,
                "score": score_answer(answer, needle.number),
                "answer": answer,
                "city": needle.city,
                "number": needle.number,
                "needle_token_position": prompt.needle_token_position,
                "haystack_token_span": list(prompt.haystack_token_span),
            }
        )
    scores = [
        [
            sum(cell["score"] for cell in cells if cell["context_length"] == length and cell["depth"] == depth)
            / params.needles_per_cell
            for length in params.context_lengths
        ]
        for depth in params.depths
    ]
    results = {
        "context_lengths": list(params.context_lengths),
        "depths": list(params.depths),
        "needles_per_cell": params.needles_per_cell,
        "seed": params.seed,
        "mean_score": sum(cell["score"] for cell in cells) / len(cells),
        "scores": scores,
        "cells": cells,
    }
    out_dir = Path(out_dir)
    atomic.write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=1) + "\n")
    save_heatmap(
        scores,
        row_labels=[f"{depth:g}" for depth in params.depths],
        col_labels=[str(length) for length in params.context_lengths],
        title=f"Text needle in a haystack (mean {results['mean_score']:.2f})",
        path=out_dir / HEATMAP_FILE,
        xlabel="context length (tokens)",
        ylabel="needle depth (%)",
    )
    return results
