"""Proof that the pipeline learns: text NIAH at 1K tokens, from chance to found, and the ablation.

    python -m benchmarks.learning_check [--work DIR] [--out FILE]

A tiny Qwen2.5-VL (2 layers, 128 wide, a 512-token vocabulary) goes through the real stages:
`omnilong data prepare` / `data pack` / `train` (torchrun, 2 gloo ranks, DeepSpeed ZeRO-3), in a
project directory of its own, on synthetic retrieval data:

- stage 1, continual pretraining at 128 tokens, data parallel (each rank trains its own 16
  rows): short plain-text documents (no chat template) of filler hiding a "special magic
  number" sentence, then the NIAH question and the sentence again. The copy skill starts here:
  at 128 tokens, twice the rows per step formed it far sooner than ring attention over 32-token
  shards, at 1.7x the tokens/s (benchmarks/RESULTS.md);
- stage 2, instruction tuning with ring-attention sequence parallelism over both ranks, the
  context grown 128 -> 256 -> 512 -> 1,024 tokens by the runner's `context_schedule` and 1,800 of
  its 2,450 steps at 1,024, at a learning rate that does not decay: chats whose
  user turn hides one such sentence in filler and asks the NIAH question, answered with the
  needle sentence. Half are short enough for 128 tokens, the other half spread evenly in length
  up to 1,000 tokens, so that a needle ~1,000 tokens before the question (depth 0 of the NIAH)
  is not rare in training; at each scheduled length, the chats that fit;
- stage 3, video instruction tuning on the default synthetic videos with sequence parallelism,
  short (the recipe's last stage; here it checks that it does not undo stage 2).

The ablation trains stage 3 from stage 1, as the `no-stage2` pipeline variant does. The text
NIAH harness (omnilong/eval/niah.py, the pipeline's own) then scores the base model, each stage
and the ablation at 1,024 tokens (the whole rendered prompt) over 5 depths, several needles
per depth, on a haystack of filler drawn with another seed. Training keys are city names kept
out of the NIAH's pool, and the NIAH draws its own numbers: what is measured is retrieval of a
number never seen in training, keyed by a name never seen in training.

Calibration that set these sizes: a plain 2-layer, 128-wide Qwen2 learned needle copying at 128
tokens in about 5 minutes on 2 cores; trained from the start at 512-1,024 tokens it stayed at
chance, so the context grows. This is a benchmark (about 27 minutes on 2 CPU cores), not a test.

The last line printed is one JSON object: {"benchmark": "learning_check", ...}.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.measure import emit_summary
from omnilong.config import load_params
from omnilong.data.schemas import InstructRecord, Message, TextRecord
from omnilong.data.synth import to_jsonl
from omnilong.data.synth.video import synthesize_videos
from omnilong.eval.niah_prompt import CITIES, NEEDLE, QUESTION

FAMILY = "qwen2_5_vl"
NIAH_LENGTH = 1024
# Common words only: no digits (the haystack must hold no 7-digit number) and no city.
FILLER_WORDS = (
    "the", "a", "small", "old", "green", "river", "stone", "bird", "walks", "sings", "under", "over",
    "bright", "quiet", "tree", "hill", "road", "cloud", "rain", "wind", "light", "dark", "warm", "cold",
    "field", "house", "door", "window", "boat", "sea", "sand", "moon", "star", "sun", "leaf", "grass",
    "slow", "fast", "near", "far", "and", "with", "into", "from",
)
# Keys of the training needles: cities the NIAH never asks about.
TRAIN_CITIES = (
    "Paris", "London", "Tokyo", "Berlin", "Rome", "Vienna", "Prague", "Warsaw", "Kyiv", "Dubai",
    "Mumbai", "Delhi", "Lahore", "Manila", "Sydney", "Toronto", "Boston", "Denver", "Havana", "Quito",
    "Bogota", "Caracas", "Accra", "Tripoli", "Rabat", "Algiers", "Tehran", "Kabul", "Dhaka", "Beijing",
    "Shanghai", "Osaka", "Perth", "Auckland", "Ottawa", "Montreal", "Dallas", "Miami", "Seattle", "Lyon",
)
assert not {city.lower() for city in TRAIN_CITIES} & {city.lower() for city in CITIES}

TEXT_DOCUMENTS = 20000  # stage 1: 62-135 tokens each (0.5% exceed 128 and are split)
CHATS = 36000  # stage 2: 100-1,000 tokens each
STAGE1 = {"seq_len": 128, "sp_size": 1, "train": {
    "lr": 2.0e-3, "min_lr_ratio": 0.5, "warmup_steps": 20, "max_steps": 1200, "micro_batch_size": 16,
    "checkpoint_every": 500, "activation_checkpointing": False}}
STAGE2 = {"seq_len": 1024, "sp_size": 2, "context_schedule": [
    {"from_step": 0, "seq_len": 128}, {"from_step": 300, "seq_len": 256},
    {"from_step": 450, "seq_len": 512}, {"from_step": 650, "seq_len": 1024}],
    "train": {"lr": 2.0e-3, "min_lr_ratio": 1.0, "warmup_steps": 20, "max_steps": 2450, "micro_batch_size": 16,
              "checkpoint_every": 250, "activation_checkpointing": False}}
STAGE3 = {"seq_len": 512, "sp_size": 2, "video_frames": {"num_frames": 16}, "train": {
    "lr": 1.0e-4, "warmup_steps": 2, "max_steps": 10, "micro_batch_size": 4, "activation_checkpointing": False}}


def learning_params() -> dict:
    return {
        "seed": 1234,
        "model": {
            "family": FAMILY, "path": "models/tiny",
            "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 512, "vision_hidden_size": 32,
                     "vision_depth": 2, "vision_num_heads": 2, "vocab_size": 512, "seed": 0},
        },
        "data": {"raw_dir": "data/raw", "tokenized_dir": "data/tokenized", "packed_dir": "data/packed",
                 "synth": {"video": {"num_videos": 8, "num_frames": 16, "long": {"num_videos": 0}}}},
        "parallel": {"nproc_per_node": 2},
        "stages": {"stage1": STAGE1, "stage2": STAGE2, "stage3": STAGE3},
        "eval": {"heldout_documents": 2, "niah": {
            "context_lengths": [NIAH_LENGTH], "depths": [0, 25, 50, 75, 100], "needles_per_cell": 20,
            "max_new_tokens": 32, "haystack_dir": "data/raw/haystack"}},
    }


def filler(rng: random.Random, words: int) -> str:
    """Sentences of 4 to 9 filler words, about `words` words in all."""
    sentences = []
    while words > 0:
        length = min(words, rng.randint(4, 9))
        chosen = [rng.choice(FILLER_WORDS) for _ in range(length)]
        sentences.append(" ".join(chosen).capitalize() + ".")
        words -= length
    return " ".join(sentences)


def insert_at_sentence(text: str, sentence: str, depth: float) -> str:
    """`sentence` placed at the sentence boundary nearest `depth` (0-1) of `text`."""
    bounds = [0] + [i + 2 for i in range(len(text) - 1) if text[i : i + 2] == ". "] + [len(text) + 1]
    at = min(bounds, key=lambda bound: abs(bound - depth * len(text)))
    before, after = text[:at].rstrip(), text[at:].lstrip()
    return " ".join(part for part in (before, sentence, after) if part)


def needle(rng: random.Random) -> tuple[str, str]:
    return rng.choice(TRAIN_CITIES), str(rng.randrange(1_000_000, 10_000_000))


def text_documents(rng: random.Random) -> list[TextRecord]:
    """Stage 1: the needle in filler, then the NIAH question and the needle again, as plain text."""
    records = []
    for index in range(TEXT_DOCUMENTS):
        city, number = needle(rng)
        statement = NEEDLE.format(city=city, number=number)
        document = insert_at_sentence(filler(rng, rng.randint(2, 50)), statement, rng.random())
        records.append(TextRecord(id=f"recall-{index:05d}", source="learning_check",
                                  text=f"{document}\n\n{QUESTION.format(city=city)}\n{statement}"))
    return records


def chats(rng: random.Random) -> list[InstructRecord]:
    """Stage 2: NIAH-shaped chats, the needle at a random depth, answered with the needle sentence.

    Half are short enough for the schedule's first length (128 tokens); the other half spread
    evenly in length up to 1,000 tokens.
    """
    records = []
    for index in range(CHATS):
        city, number = needle(rng)
        statement = NEEDLE.format(city=city, number=number)
        if index % 2:
            words = rng.randint(28, 780)
        else:
            words = rng.randint(2, 28)
        document = insert_at_sentence(filler(rng, words), statement, rng.random())
        records.append(InstructRecord(id=f"niah-{index:05d}", messages=[
            Message(role="user", content=f"{document}\n\n{QUESTION.format(city=city)}"),
            Message(role="assistant", content=statement),
        ]))
    return records


def write_corpora(project: Path, params) -> None:
    rng = random.Random("learning-check")
    raw = project / "data" / "raw"
    (raw / "default" / "text").mkdir(parents=True)
    (raw / "default" / "instruct").mkdir(parents=True)
    (raw / "default" / "video").mkdir(parents=True)
    (raw / "user").mkdir(parents=True)
    (raw / "haystack" / "text").mkdir(parents=True)
    (raw / "default" / "text" / "documents.jsonl").write_text(to_jsonl(text_documents(rng)))
    (raw / "default" / "instruct" / "samples.jsonl").write_text(to_jsonl(chats(rng)))
    video_dir = raw / "default" / "video"
    (video_dir / "qa.jsonl").write_text(to_jsonl(synthesize_videos(params.data.synth.video, 0, video_dir)))
    haystack_rng = random.Random("learning-check-haystack")
    haystack = TextRecord(id="haystack", source="learning_check", text=filler(haystack_rng, 6 * NIAH_LENGTH))
    (raw / "haystack" / "text" / "filler.jsonl").write_text(to_jsonl([haystack]))


def omnilong(project: Path, *args: str) -> float:
    """Run `omnilong ARGS` in the project; its output streams through. Returns seconds taken."""
    started = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "omnilong.cli", *args], cwd=project, env=env, check=True)
    return time.perf_counter() - started


def niah_accuracy(project: Path, params, model_dir: Path, out_dir: Path) -> tuple[dict, float]:
    """(the NIAH results of one model, as `niah.json` holds them, and seconds), with the pipeline's harness."""
    from omnilong.eval.niah import run_niah
    from omnilong.eval.niah_haystack import niah_haystack_text
    from omnilong.infer.generate import ModelAnswerer

    started = time.perf_counter()
    answerer = ModelAnswerer(model_dir, params.model.video)
    results = run_niah(answerer, answerer.tokenizer, niah_haystack_text(params, project), params.eval.niah, out_dir)
    return results, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="Project directory to build (default: a temporary one).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON line to this file.")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="Score the models an earlier run left in --work again, without training.")
    args = parser.parse_args(argv)
    if args.evaluate_only and args.work is None:
        parser.error("--evaluate-only: expected --work, the directory of an earlier run")
    project = args.work or Path(tempfile.mkdtemp(prefix="omnilong-learning-"))
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(learning_params(), sort_keys=False))
    params = load_params(project / "params.yaml")
    started = time.perf_counter()

    seconds: dict[str, float] = {}
    runs = {
        "stage1": ("--stage", "1", "--init", "models/tiny", "--out", "runs/stage1"),
        "stage2": ("--stage", "2", "--init", "runs/stage1/model", "--out", "runs/stage2"),
        "stage3": ("--stage", "3", "--init", "runs/stage2/model", "--out", "runs/stage3"),
        "stage3-no-stage2": ("--stage", "3", "--init", "runs/stage1/model", "--out", "runs/stage3-no-stage2",
                             "--variant", "no-stage2"),
    }
    if not args.evaluate_only:
        write_corpora(project, params)
        seconds["data"] = time.perf_counter() - started
        seconds["model"] = omnilong(project, "model", "tiny", "--family", FAMILY, "--out", "models/tiny")
        seconds["prepare"] = omnilong(project, "data", "prepare")
        for stage in ("1", "2", "3"):
            seconds["prepare"] += omnilong(project, "data", "pack", "--stage", stage)
        for name, run_args in runs.items():
            seconds[name] = omnilong(project, "train", *run_args, "--checkpoints", f"checkpoints/{name}")

    models = {"base": project / "models/tiny", **{name: project / "runs" / name / "model" for name in runs}}
    results = {}
    for label, model_dir in models.items():
        results[label], seconds[f"niah_{label}"] = niah_accuracy(project, params, model_dir,
                                                                 project / "eval" / label)
    accuracy = {label: result["mean_score"] for label, result in results.items()}
    # One context length: each depth's row of the grid holds a single score.
    by_depth = {label: dict(zip(params.eval.niah.depths, (row[0] for row in results[label]["scores"])))
                for label in ("stage3", "stage3-no-stage2")}
    summary = {
        "benchmark": "learning_check",
        "niah_context_length": NIAH_LENGTH,
        "niah_needles": len(params.eval.niah.depths) * params.eval.niah.needles_per_cell,
        "niah_max_new_tokens": params.eval.niah.max_new_tokens,
        "evaluate_only": args.evaluate_only,
        "accuracy_full": accuracy["stage3"],
        "accuracy_no_stage2": accuracy["stage3-no-stage2"],
        "accuracy": accuracy,
        "accuracy_by_depth": {"full": by_depth["stage3"], "no_stage2": by_depth["stage3-no-stage2"]},
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
        "project": str(project),
    }
    emit_summary(summary, args.out)


if __name__ == "__main__":
    main()
