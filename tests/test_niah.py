"""Text needle-in-a-haystack: token-exact prompts, needle placement, needle pool, scoring, heatmap."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnilong.config import NiahParams, parse_params
from omnilong.eval.answering import Question
from omnilong.eval.niah import HEATMAP_FILE, RESULTS_FILE, run_niah, score_answer
from omnilong.eval.niah_haystack import (
    Haystack,
    niah_haystack_dirs,
    niah_haystack_text,
    read_haystack_text,
)
from omnilong.eval.niah_prompt import (
    CITIES,
    MAX_STARTS,
    Needle,
    draw_needle,
    fit_prompt,
    needle_cities,
)
from omnilong.eval.plots import COLOUR_MAP, save_heatmap
from omnilong.models.loading import load_tokenizer

# A sentence starts after `.`, `!` or `?` and whitespace, or after a blank line; the `\S` makes
# a match mean "a sentence starts inside this text".
SENTENCE_START_INSIDE = re.compile(r"[.!?]\s+\S|\n[ \t]*\n\s*\S")
ENDS_A_SENTENCE = re.compile(r"(?:[.!?]\s+|\n[ \t]*\n\s*)$")
LONG_NUMBER = re.compile(r"\d{7,}")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir("qwen2_5_vl"))


@pytest.fixture(scope="module")
def haystack_text(tiny_text_corpus) -> str:
    return read_haystack_text([tiny_text_corpus])


@pytest.fixture(scope="module")
def haystack(haystack_text, tokenizer) -> Haystack:
    return Haystack(haystack_text, tokenizer)


def rendered_ids(tokenizer, messages) -> list[int]:
    """The prompt as a model's generation sees it: chat template, generation prompt, tokenized."""
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]


def the_needle(question: Question) -> tuple[str, str]:
    """(city, number) of the needle the question asks for, read from the haystack in the question."""
    content = question.messages[-1]["content"]
    city = re.search(r"What is the special magic (.+?) number\?", content).group(1)
    number = re.search(rf"The special magic {re.escape(city)} number is: (\d+)\.", content).group(1)
    return city, number


class Oracle:
    """Finds the needle in the haystack it is shown; keeps the questions it was asked."""

    def __init__(self):
        self.questions: list[Question] = []

    def answer(self, question: Question) -> str:
        self.questions.append(question)
        city, number = the_needle(question)
        return f"The special magic {city} number is {number}."


class WrongNumber:
    """Answers with another 7-digit number: the needle's, its last digit changed."""

    def answer(self, question: Question) -> str:
        _, number = the_needle(question)
        return f"The number is {number[:-1]}{(int(number[-1]) + 1) % 10}."


@pytest.mark.parametrize("length", [128, 200, 257, 512, 1000, 2048])
def test_prompt_is_exactly_the_context_length(tokenizer, haystack, length):
    cities = needle_cities(haystack)
    for depth in (0.0, 37.5, 50.0, 100.0):
        needle = draw_needle(haystack, cities, random.Random(f"{length}:{depth}"))
        prompt = fit_prompt(haystack, tokenizer, needle, depth, length)
        assert prompt.prompt_tokens == length
        assert len(rendered_ids(tokenizer, prompt.messages)) == length
        assert prompt.messages[-1]["content"].endswith(
            f"\n\nWhat is the special magic {needle.city} number? "
            "Don't give information outside the document or repeat your findings."
        )


def test_haystack_starts_at_a_later_sentence_when_no_cut_from_the_first_is_exact(tokenizer, haystack):
    """Some lengths have no exact cut (one more character adds two tokens); their haystack
    starts at one of the next sentence starts instead, and is exact from there."""
    starts = []
    for length in range(300, 340):
        prompt = fit_prompt(haystack, tokenizer, Needle("Oslo", "4817263"), 50.0, length)
        assert len(rendered_ids(tokenizer, prompt.messages)) == length
        document = prompt.messages[-1]["content"]
        starts.append(next(start for start in haystack.sentence_starts[:MAX_STARTS]
                           if document.startswith(haystack.text[start : start + 40])))
    assert 0 < sum(start > 0 for start in starts) < len(starts) / 4


def test_other_family_template_is_token_exact_too(tiny_model_dir, haystack_text):
    llava_tokenizer = load_tokenizer(tiny_model_dir("llava_onevision"))
    haystack = Haystack(haystack_text, llava_tokenizer)
    for depth in (0.0, 50.0, 100.0):
        prompt = fit_prompt(haystack, llava_tokenizer, Needle("Oslo", "4817263"), depth, 700)
        assert len(rendered_ids(llava_tokenizer, prompt.messages)) == 700


def test_too_short_context_and_too_short_haystack_are_named(tokenizer, haystack):
    with pytest.raises(ValueError, match=r"eval.niah.context_lengths: 40 tokens cannot hold"):
        fit_prompt(haystack, tokenizer, Needle("Oslo", "4817263"), 50.0, 40)
    small = Haystack("A first sentence. A second one.\n\nA paragraph.", tokenizer)
    with pytest.raises(ValueError, match=r"too short for a context length of 512 tokens"):
        fit_prompt(small, tokenizer, Needle("Oslo", "4817263"), 50.0, 512)


@pytest.mark.parametrize("depth", [0.0, 10.0, 25.0, 50.0, 62.5, 75.0, 90.0, 100.0])
def test_needle_is_at_the_last_sentence_start_before_its_depth(tokenizer, haystack, depth):
    needle = Needle("Oslo", "4817263")
    prompt = fit_prompt(haystack, tokenizer, needle, depth, 1024)
    rendered = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    offsets = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    needle_start = rendered.index(needle.sentence)
    needle_end = needle_start + len(needle.sentence)
    needle_tokens = [i for i, (start, end) in enumerate(offsets) if start < needle_end and end > needle_start]
    assert prompt.needle_token_position == needle_tokens[0]
    assert offsets[needle_tokens[0]][0] <= needle_start < offsets[needle_tokens[0]][1]

    content = prompt.messages[-1]["content"]
    document = content[: content.rindex(f"\n\n{needle.question}")]
    first, end = prompt.haystack_token_span
    assert offsets[first][0] <= rendered.index(document) < offsets[first][1]
    assert offsets[end - 1][0] < rendered.index(document) + len(document) <= offsets[end - 1][1]

    # At a sentence boundary: the document's start, right after a sentence's end, or its very end.
    at = document.index(needle.sentence)
    assert at == 0 or ENDS_A_SENTENCE.search(document[:at]) or (
        depth == 100.0 and at + len(needle.sentence) == len(document)
    )
    # At the stated depth, within one sentence: the needle's place among the haystack's tokens is
    # at most the depth's (one token of slack for the seams), and no sentence starts between it
    # and the token one before the depth's, so no later sentence start was at or before the depth.
    haystack_tokens = (end - first) - len(needle_tokens)
    before_needle = needle_tokens[0] - first
    depth_token = depth * haystack_tokens / 100
    assert before_needle <= depth_token + 1
    if depth == 0.0:
        assert before_needle == 0 and at == 0
    elif depth == 100.0:
        assert document.endswith(needle.sentence)
    else:
        checked = math.floor(depth_token) - 1 - before_needle  # haystack tokens after the needle
        if checked > 0:
            between = rendered[needle_end : offsets[needle_tokens[-1] + 1 + checked][0]]
            assert not SENTENCE_START_INSIDE.search(between), between


def test_haystack_holds_no_seven_digit_number_but_the_needle(tokenizer, haystack_text):
    planted = ("Call 5551234567 or 1234567 today. Order 0000001 shipped on 20240101. "
               "Six digits 123456 are fine.\n\n")
    haystack = Haystack(planted * 3 + haystack_text, tokenizer)
    assert not LONG_NUMBER.search(haystack.text)
    assert "123456 are fine" in haystack.text
    cities = needle_cities(haystack)
    for depth in (0.0, 50.0, 100.0):
        needle = draw_needle(haystack, cities, random.Random(str(depth)))
        prompt = fit_prompt(haystack, tokenizer, needle, depth, 600)
        assert LONG_NUMBER.findall(prompt.messages[-1]["content"]) == [needle.number]


def test_needle_cities_and_numbers_never_occur_in_the_haystack(tokenizer, haystack_text):
    kept = "Reykjavik"
    mentions = " ".join(city.lower() if i % 2 else city.upper() for i, city in enumerate(CITIES) if city != kept)
    haystack = Haystack(f"Cities: {mentions}.\n\n{haystack_text}", tokenizer)
    assert needle_cities(haystack) == [kept]
    needles = [draw_needle(haystack, [kept], random.Random(seed)) for seed in range(20)]
    assert all(re.fullmatch(r"[1-9]\d{6}", needle.number) and needle.number not in haystack.text
               for needle in needles)
    assert len({needle.number for needle in needles}) > 1
    everywhere = Haystack(f"Cities: {' '.join(CITIES)}.", tokenizer)
    with pytest.raises(ValueError, match="every needle city"):
        needle_cities(everywhere)


@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ("4817263", 1.0),
        ("The special magic Oslo number is: 4817263.", 1.0),
        ("4817263 is the number", 1.0),
        ("(4817263)", 1.0),
        ("48172634", 0.0),  # inside a longer number
        ("14817263", 0.0),
        ("481 7263", 0.0),
        ("4817264", 0.0),
        ("", 0.0),
    ],
)
def test_score_answer(answer, score):
    assert score_answer(answer, "4817263") == score


def niah_params(**overrides) -> NiahParams:
    return NiahParams(context_lengths=[200, 512], depths=[0.0, 50.0, 100.0], needles_per_cell=2, **overrides)


def test_oracle_scores_one_everywhere(tokenizer, haystack_text, tmp_path):
    oracle = Oracle()
    results = run_niah(oracle, tokenizer, haystack_text, niah_params(), tmp_path)
    assert results["scores"] == [[1.0, 1.0]] * 3
    assert results["mean_score"] == 1.0
    assert len(results["cells"]) == len(oracle.questions) == 2 * 3 * 2
    assert json.loads((tmp_path / RESULTS_FILE).read_text()) == results
    for cell, question in zip(results["cells"], oracle.questions):
        assert set(cell) == {"context_length", "depth", "needle_index", "score", "answer", "city", "number",
                             "needle_token_position", "haystack_token_span"}
        assert len(rendered_ids(tokenizer, question.messages)) == cell["context_length"]
        assert question.max_new_tokens == 32 and question.video is None
        assert the_needle(question) == (cell["city"], cell["number"])
        assert LONG_NUMBER.findall(question.messages[-1]["content"]) == [cell["number"]]
        first, end = cell["haystack_token_span"]
        assert first <= cell["needle_token_position"] < end
    # Two needles per cell, drawn apart.
    assert len({(cell["city"], cell["number"]) for cell in results["cells"]}) == len(results["cells"])


def test_wrong_number_scores_zero(tokenizer, haystack_text, tmp_path):
    results = run_niah(WrongNumber(), tokenizer, haystack_text, niah_params(max_new_tokens=12), tmp_path)
    assert results["scores"] == [[0.0, 0.0]] * 3
    assert results["mean_score"] == 0.0
    assert all(cell["number"] not in cell["answer"] for cell in results["cells"])


def test_cell_scores_are_the_fraction_of_needles_found(tokenizer, haystack_text, tmp_path):
    class FirstNeedleOnly(Oracle):
        def answer(self, question):
            answer = super().answer(question)
            return answer if len(self.questions) % 2 else "no idea"

    results = run_niah(FirstNeedleOnly(), tokenizer, haystack_text, niah_params(), tmp_path)
    assert results["scores"] == [[0.5, 0.5]] * 3
    assert [cell["score"] for cell in results["cells"]] == [1.0, 0.0] * 6


def test_runs_are_deterministic(tokenizer, haystack_text, tmp_path):
    params = niah_params(seed=7)
    run_niah(Oracle(), tokenizer, haystack_text, params, tmp_path / "a")
    run_niah(Oracle(), tokenizer, haystack_text, params, tmp_path / "b")
    for name in (RESULTS_FILE, HEATMAP_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = run_niah(Oracle(), tokenizer, haystack_text, niah_params(seed=8), tmp_path / "c")
    first = json.loads((tmp_path / "a" / RESULTS_FILE).read_text())
    assert [c["number"] for c in other["cells"]] != [c["number"] for c in first["cells"]]


def test_heatmap_png_is_written_with_a_fixed_colour_scale(tmp_path):
    from matplotlib import colormaps

    path = tmp_path / "plots" / "heatmap.png"
    # Scores 0.5 only: a per-plot scale would colour them as an extreme; a fixed one as the middle.
    save_heatmap([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], ["0", "50", "100"], ["256", "512"], "t", path,
                 xlabel="context length (tokens)", ylabel="needle depth (%)")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    colour_map = colormaps[COLOUR_MAP]

    def count(score: float) -> int:
        rgb = np.array([round(255 * channel) for channel in colour_map(score)[:3]])
        return int((np.abs(pixels - rgb).max(axis=1) <= 2).sum())

    # The cells fill most of the plot in the middle colour; the ends appear only in the colour bar.
    assert count(0.5) > 10 * max(count(0.0), count(1.0)) > 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["heatmap.png"]  # no temporary left


def test_heatmap_rejects_bad_shapes_and_scores(tmp_path):
    path = tmp_path / "h.png"
    with pytest.raises(ValueError, match="expected 2 row"):
        save_heatmap([[0.1]], ["a", "b"], ["x"], "t", path)
    with pytest.raises(ValueError, match="row 'a' has 2 score"):
        save_heatmap([[0.1, 0.2]], ["a"], ["x"], "t", path)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        save_heatmap([[1.5]], ["a"], ["x"], "t", path)
    save_heatmap([[float("nan")]], ["a"], ["x"], "t", path)
    assert path.is_file()


def test_haystack_source_and_reading(tiny_text_corpus, tmp_path):
    text = read_haystack_text([tiny_text_corpus])
    records = [json.loads(line)["text"] for path in sorted((tiny_text_corpus / "text").glob("*.jsonl"))
               for line in path.read_text().splitlines()]
    assert text == "\n\n".join(records)
    assert read_haystack_text([tiny_text_corpus], max_chars=10) == records[0]
    with pytest.raises(FileNotFoundError, match="text/ holding .jsonl"):
        read_haystack_text([tmp_path])

    raw = {"model": {"path": "m"}, "data": {"raw_dir": "raw"},
           "stages": {"stage1": {"corpora": ["default", "mine"]}, "stage2": {},
                      "stage3": {"video_frames": {"num_frames": 4}}}}
    params = parse_params(raw)
    assert niah_haystack_dirs(params, Path("/p")) == [Path("/p/raw/default"), Path("/p/raw/user/mine")]
    raw["eval"] = {"niah": {"haystack_dir": "essays"}}
    assert niah_haystack_dirs(parse_params(raw), Path("/p")) == [Path("/p/essays")]
    # Read as far as the longest context can need, at 16 characters a token.
    raw["eval"] = {"niah": {"haystack_dir": str(tiny_text_corpus), "context_lengths": [1]}}
    assert niah_haystack_text(parse_params(raw), Path("/p")) == records[0]


def test_niah_params_reject_repeated_grid_values():
    with pytest.raises(ValueError, match="context_lengths: expected distinct values"):
        NiahParams(context_lengths=[256, 256])
    with pytest.raises(ValueError, match="depths: expected distinct values"):
        NiahParams(depths=[0, 50, 50])


def test_context_length_is_what_the_model_prefills(tiny_model_dir, haystack_text, tmp_path):
    from omnilong.config import VideoTokenParams
    from omnilong.infer.generate import ModelAnswerer

    model = ModelAnswerer(tiny_model_dir("qwen2_5_vl"), VideoTokenParams())

    class Recording:
        def __init__(self):
            self.prefilled: list[int] = []

        def answer(self, question):
            self.prefilled.append(len(model.chat_ids(question.messages, with_video=False)))
            return model.answer(question)

    answerer = Recording()
    results = run_niah(answerer, model.tokenizer, haystack_text, NiahParams(context_lengths=[256], depths=[0, 100],
                                                                            max_new_tokens=4), tmp_path)
    assert answerer.prefilled == [256, 256]
    assert [cell["score"] for cell in results["cells"]] == [score_answer(cell["answer"], cell["number"])
                                                           for cell in results["cells"]]
