"""Sequence-parallel prefill (omnilong/infer/prefill.py) equals the single-process one.

Two gloo ranks share each prompt: every layer's gathered keys and values (in prompt order,
padding dropped) and the logits after the last prompt token must equal those of one process
prefilling the whole prompt; the greedy answer (decoded by the first rank, returned by both)
and the teacher-forced argmax must be the same tokens, and the answer's positions those training gives
it. Prompts: text cut to a length that is a multiple of 2P = 4 and to one that is not (so padding
is exercised), and two video prompts (a short clip, and a long one whose time range outlasts the
question after it), whose frames the ranks split between them as in training. The reference runs in the test's own
process, from the same model directory; both are fp32 on the CPU, and ring attention sums the
softmax blocks in another order than SDPA, hence rtol = 1e-5, atol = 1e-6 (the largest differences
seen are about 2e-7).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from omnilong.config import FrameSampling, VideoTokenParams
from omnilong.eval.answering import Question, VideoQuery
from omnilong.infer.generate import ModelAnswerer, Prompt
from omnilong.parallel.zigzag import SequenceLayout, shard_sequence, unshard_sequence
from tests.conftest import REPO
from tests.test_generate import (  # noqa: F401  (fixtures)
    fed_positions,
    long_video_file,
    long_video_question,
    training_positions,
    video_file,
)
from tests.test_ring_attention import spawn

WORLD = 2
FAMILIES = ("qwen2_5_vl", "llava_onevision")
VIDEO = VideoTokenParams()
NEW_TOKENS = 6
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
TEXT_LENGTHS = {"text-13": 13, "text-16": 16}  # 13: padded with 3 tokens to 16 = 4 x 2P
VIDEO_CASES = ("video", "long-video")
CASES = (*TEXT_LENGTHS, *VIDEO_CASES)


def case_prompt(answerer: ModelAnswerer, case: str, videos: dict[str, Path]) -> Prompt:
    if case == "video":
        return answerer.prompt(Question([{"role": "user", "content": "What moves, and where?"}],
                                        VideoQuery(videos[case], FrameSampling(num_frames=7))))
    if case == "long-video":
        return answerer.prompt(long_video_question(videos[case]))
    whole = answerer.prompt(Question([{"role": "user", "content": "Tell me a long story about the sea."}]))
    length = TEXT_LENGTHS[case]
    assert len(whole.input_ids) > length
    return Prompt(whole.input_ids[:length], whole.position_ids[..., :length], None)


def other_answer(tokens: list[int]) -> list[int]:
    """Answer ids the model did not give (so most argmaxes differ from them)."""
    return [(token + 1) % 100 + 10 for token in tokens]


def sp_worker(model_dirs: dict[str, str], videos: dict[str, Path], rank: int, world_size: int) -> dict:
    results = {}
    for family, model_dir in model_dirs.items():
        answerer = ModelAnswerer(model_dir, VIDEO, device="cpu", sp_group=dist.group.WORLD)
        whole = ModelAnswerer(model_dir, VIDEO, device="cpu")  # the whole embeddings V-NIAH passes
        for case in CASES:
            prompt = case_prompt(answerer, case, videos)
            prefill = answerer.prefill(answerer.embeddings(prompt), prompt.position_ids)
            # Decoding extends the cache: the prompt's part is taken first.
            cache = None if prefill.cache is None else [(layer.keys, layer.values) for layer in prefill.cache.layers]
            with fed_positions(answerer) as decoding:
                tokens = answerer.decode(prefill, NEW_TOKENS, stop_ids=set())
            embeds = whole.embeddings(case_prompt(whole, case, videos))
            with fed_positions(answerer) as teacher_forcing:
                own = answerer.teacher_forced_argmax(embeds, prompt.position_ids, tokens)
            results[family, case] = {
                "length": len(prompt.input_ids),
                "cache": cache,
                "logits": prefill.logits,
                "tokens": tokens,
                "generated": answerer.generate(embeds, prompt.position_ids, NEW_TOKENS, stop_ids=set()),
                "teacher_forced": {
                    "own": own,
                    "other": answerer.teacher_forced_argmax(embeds, prompt.position_ids, other_answer(tokens)),
                },
                "positions": {"decoding": decoding, "teacher_forcing": teacher_forcing},
                "frames": None if prompt.video is None else sum(
                    piece["pixel_values_videos"].shape[0 if family == "qwen2_5_vl" else 1] for piece in prompt.video.pieces
                ),
            }
    return results


@pytest.fixture(scope="module")
def videos(video_file, long_video_file) -> dict[str, Path]:  # noqa: F811
    return {"video": video_file, "long-video": long_video_file}


@pytest.fixture(scope="module")
def sharded(tiny_model_dir, videos, tmp_path_factory) -> list[dict]:
    model_dirs = {family: str(tiny_model_dir(family)) for family in FAMILIES}
    return spawn(functools.partial(sp_worker, model_dirs, videos), WORLD, tmp_path_factory.mktemp("sp_prefill"))


@pytest.fixture(scope="module")
def single(tiny_model_dir, videos, sharded) -> dict:
    """The single-process results on the same prompts (teacher-forced on the sharded run's answers)."""
    results = {}
    for family in FAMILIES:
        answerer = ModelAnswerer(tiny_model_dir(family), VIDEO, device="cpu")
        for case in CASES:
            prompt = case_prompt(answerer, case, videos)
            embeds = answerer.embeddings(prompt)
            prefill = answerer.prefill(embeds, prompt.position_ids)
            cache = [(layer.keys, layer.values) for layer in prefill.cache.layers]
            tokens = sharded[0][family, case]["tokens"]
            results[family, case] = {
                "length": len(prompt.input_ids),
                "cache": cache,
                "logits": prefill.logits,
                "tokens": answerer.decode(prefill, NEW_TOKENS, stop_ids=set()),
                "teacher_forced": {
                    "own": answerer.teacher_forced_argmax(embeds, prompt.position_ids, tokens),
                    "other": answerer.teacher_forced_argmax(embeds, prompt.position_ids, other_answer(tokens)),
                },
                "frames": None if prompt.video is None else prompt.video.pieces[0]["pixel_values_videos"].shape[
                    0 if family == "qwen2_5_vl" else 1],
            }
    return results


KEYS = [(family, case) for family in FAMILIES for case in CASES]
IDS = [f"{family}-{case}" for family, case in KEYS]


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_gathered_cache_and_last_logits_equal_single_process(sharded, single, key):
    expected = single[key]
    assert [result[key]["length"] for result in sharded] == [expected["length"]] * WORLD
    cache = sharded[0][key]["cache"]
    assert sharded[1][key]["cache"] is None  # only the first rank holds the gathered cache
    assert len(cache) == len(expected["cache"]) > 0
    for layer, ((keys, values), (want_keys, want_values)) in enumerate(zip(cache, expected["cache"])):
        assert keys.shape == want_keys.shape and keys.shape[2] == expected["length"]  # padding dropped
        torch.testing.assert_close(keys, want_keys, **TOLERANCE, msg=lambda m: f"layer {layer} keys: {m}")
        torch.testing.assert_close(values, want_values, **TOLERANCE, msg=lambda m: f"layer {layer} values: {m}")
    for result in sharded:
        torch.testing.assert_close(result[key]["logits"], expected["logits"], **TOLERANCE)


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_the_cache_check_sees_the_sequence_order(sharded, single, key):
    """The comparison above fails on a cache left in the ranks' zigzag order."""
    length = single[key]["length"]
    layout = SequenceLayout(-(-length // (2 * WORLD)) * 2 * WORLD, WORLD)
    keys = torch.nn.functional.pad(sharded[0][key]["cache"][0][0], (0, 0, 0, layout.seq_len - length))
    zigzag = torch.cat([shard_sequence(keys, layout, rank, dim=2) for rank in range(WORLD)], dim=2)[:, :, :length]
    assert not torch.allclose(zigzag, single[key]["cache"][0][0], **TOLERANCE)


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_generated_tokens_equal_single_process(sharded, single, key):
    expected = single[key]["tokens"]
    assert len(expected) == NEW_TOKENS
    for result in sharded:  # every rank returns the first rank's answer
        assert result[key]["tokens"] == expected
        assert result[key]["generated"] == expected  # from the whole prompt's embeddings, as V-NIAH gives them


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_teacher_forced_argmax_equals_single_process(sharded, single, key):
    for result in sharded:
        assert result[key]["teacher_forced"] == single[key]["teacher_forced"]
    assert single[key]["teacher_forced"]["own"] == single[key]["tokens"]


def test_prompt_lengths_cover_padding(sharded):
    lengths = {sharded[0][family, case]["length"] for family in FAMILIES for case in CASES}
    assert any(length % (2 * WORLD) for length in lengths) and any(length % (2 * WORLD) == 0 for length in lengths)


@pytest.mark.parametrize("case", VIDEO_CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_rank_encodes_its_share_of_the_frames(sharded, single, family, case):
    shares = [result[family, case]["frames"] for result in sharded]
    assert all(share > 0 for share in shares)
    assert sum(shares) == single[family, case]["frames"]


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_positions_equal_those_training_gives_the_answer(sharded, tiny_model_dir, videos, tmp_path, family):
    """As in one process (tests/test_generate.py), after the long video: the first rank decodes,
    and the ranks' teacher-forced shards put back together hold, the positions training gives the
    chat (prompt and answer, one packed document) before it shards them."""
    key = family, "long-video"
    answerer = ModelAnswerer(tiny_model_dir(family), VIDEO, device="cpu")
    prompt = case_prompt(answerer, "long-video", videos)
    answer = sharded[0][key]["tokens"]
    length, total = len(prompt.input_ids), len(prompt.input_ids) + NEW_TOKENS
    layout = SequenceLayout(-(-total // (2 * WORLD)) * 2 * WORLD, WORLD)
    [forced_shards] = zip(*(result[key]["positions"]["teacher_forcing"] for result in sharded))
    forced = unshard_sequence(list(forced_shards), layout, dim=-1)[..., :total]
    decoded = torch.cat(sharded[0][key]["positions"]["decoding"], dim=-1)
    assert sharded[1][key]["positions"]["decoding"] == []  # the first rank decodes alone
    for training in training_positions(tiny_model_dir(family), answerer, prompt, answer, videos["long-video"], tmp_path):
        assert torch.equal(forced, training)
        assert torch.equal(decoded, training[..., length : length + NEW_TOKENS - 1])


@pytest.mark.slow
def test_generate_command_answers_the_same_with_two_ranks(tiny_model_dir, video_file, tmp_path):  # noqa: F811
    answers = {}
    for sp_size in (1, 2):
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["eval"]["sp_size"] = sp_size
        params_file = tmp_path / f"params-sp{sp_size}.yaml"
        params_file.write_text(yaml.safe_dump(params))
        result = subprocess.run(
            [sys.executable, "-m", "omnilong.cli", "generate", "--model", str(tiny_model_dir("qwen2_5_vl")),
             "--question", "What moves, and where?", "--video", str(video_file), "--num-frames", "7",
             "--max-new-tokens", str(NEW_TOKENS), "--params", str(params_file)],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        answers[sp_size] = result.stdout
    assert answers[1].strip()
    assert answers[2] == answers[1]  # one answer: only the first rank prints


def suite_params(root: Path, model_dir: Path, raw_dir: Path, haystack: Path):
    """Small evaluation settings: one NIAH cell, one V-NIAH frame count and depth, VideoMME's
    fixture in one setting."""
    from omnilong.config import parse_params

    return parse_params({
        "model": {"family": "qwen2_5_vl", "path": str(model_dir)},
        "data": {"raw_dir": str(raw_dir.relative_to(root))},
        "stages": {"stage1": {"seq_len": 1024}, "stage2": {"seq_len": 1024},
                   "stage3": {"seq_len": 1024, "video_frames": {"num_frames": 4}}},
        "eval": {"sp_size": WORLD,
                 "niah": {"context_lengths": [160], "depths": [50], "max_new_tokens": 4},
                 "vniah": {"haystack": str(haystack), "frame_counts": [4], "depths": [50], "max_new_tokens": 4},
                 "videomme": {"frames": {"num_frames": 4}, "settings": ["without_subtitles"], "max_new_tokens": 4}},
    })


def suite_worker(params, root: Path, out_dir: Path, rank: int, world_size: int) -> dict:
    from omnilong.eval.suite import evaluate_model

    return evaluate_model(params, Path(params.model.path), out_dir / f"rank{rank}", root, group=dist.group.WORLD)


RESULT_FILES = ("niah/niah.json", "vniah/vniah.json", "videomme/videomme_results_without_subtitles.json", "metrics.json")


@pytest.mark.slow
def test_evaluation_suite_under_a_group_equals_one_process_and_only_the_first_rank_writes(
    tiny_model_dir, tiny_raw_dir, video_file, tmp_path  # noqa: F811
):
    from omnilong.eval.suite import evaluate_model

    root = tiny_raw_dir.parent
    params = suite_params(root, tiny_model_dir("qwen2_5_vl"), tiny_raw_dir, video_file)
    sharded = spawn(functools.partial(suite_worker, params, root, tmp_path / "sp"), WORLD, tmp_path)
    single = evaluate_model(params, Path(params.model.path), tmp_path / "single", root)
    assert sharded == [single] * WORLD
    assert not (tmp_path / "sp" / "rank1").exists()
    for name in RESULT_FILES:
        assert (tmp_path / "sp" / "rank0" / name).read_text() == (tmp_path / "single" / name).read_text(), name
