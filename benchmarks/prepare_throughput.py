"""Preparation throughput: our tokenisation (batched, in `data.prepare_workers` processes) against a
plain single-process loop and against Hugging Face `datasets.map(batched=True, num_proc=N)`.

    python -m benchmarks.prepare_throughput [--quick] [--workers N] [--out PATH]

The corpus: the Python standard library's `.py` files as text records (one file, one record),
one JSONL file at two sizes: the first files up to `--chars` characters, and the first up to 4x
that, leaving out files longer than the small corpus's longest (so the large corpus is the small
one's files, then more). Longer files are left out because peak memory follows the longest
document (the tokenizers library takes about 80 bytes a character of the text it encodes), and
files further into the library's folder (site-packages included) hold one of 4M characters:
kept in, the ratio would measure that file, not the corpus's size. The tokenizer: a byte-level
BPE of `--vocab` tokens trained on the first 2 MiB of it with Qwen2's pre-tokenisation
(omnilong/models/tokenizer.py), saved and loaded as a model's is.

Each method runs in a process of its own, from the JSONL file to tokens on disk, every process
with TOKENIZERS_PARALLELISM=false (one thread per process, so N workers means N cores):
- ours: `prepare_stage` of a stage 1 made of that one corpus, with `data.prepare_workers` 1 and
  `--workers`;
- plain: the loop `prepare` had before, one record at a time (`text_document`:
  `tokenizer.encode`, then eos) into `write_tokenized`; ours must write the same bytes (checked);
- datasets: `Dataset.from_json` (to Arrow, in a fresh cache dir) then `.map` of the same
  tokenizer call (`tokenizer(batch["text"], add_special_tokens=False)`, no attention mask) with
  `batched=True, num_proc=N`, written to its Arrow cache; N = 1 and `--workers`.
Time: the wall time of the work in that process, after its imports and the tokenizer's load in
its main process (worker start-up is counted). Ratios are of tokens/s (> 1: ours is faster):
ours against plain, and against datasets at the same number of processes, for datasets' whole
run (load + map) and for its `map` alone. The runs deciding the datasets ratios are repeated
`--repeats` times, the two methods taking turns, and the fastest of each kept.
Memory: the peak of the resident memory of the process and its workers summed
(benchmarks/measure.py `run_with_peak_rss`), for ours at both sizes: flat in the corpus size
means a large/small ratio near 1. The projection: 1.2B tokens (the recipes' stage 1) at ours'
rate on the large corpus, on this machine.
The last line printed is one JSON object: {"benchmark": "prepare_throughput", ...}.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# omnilong, datasets and benchmarks.measure (torch) are imported inside functions: the workers of
# a run spawned from this module import it as their main module, and would pay for them.
FULL = {"chars": 24 << 20, "vocab": 16384, "repeats": 2}
QUICK = {"chars": 1 << 19, "vocab": 1024, "repeats": 1}
CORPUS = "bench"
FAMILY = "qwen2_5_vl"
RECIPE_TOKENS = 1.2e9  # stage 1 of the 7B recipes
TOKENIZER_SAMPLE_CHARS = 2 << 20
COMPARED_FILES = ("tokens.bin", "trainable.bin", "offsets.npy", "index.json")


def stdlib_texts() -> list[str]:
    from omnilong.data.synth.text import read_source

    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    return [text for text in map(read_source, paths) if text and text.strip()]


def corpus_texts(texts: list[str], chars: int) -> list[str]:
    """The first of `texts`, cycled if need be, until they hold `chars` characters."""
    chosen, written = [], 0
    while written < chars:
        chosen.append(texts[len(chosen) % len(texts)])
        written += len(chosen[-1])
    return chosen


def write_corpus(raw_dir: Path, texts: list[str]) -> dict:
    """`raw_dir/user/bench/text/part-0.jsonl`: `texts` as text records."""
    from omnilong.data.schemas import TextRecord

    path = raw_dir / "user" / CORPUS / "text" / "part-0.jsonl"
    path.parent.mkdir(parents=True)
    with path.open("w") as out:
        for number, text in enumerate(texts):
            out.write(TextRecord(id=str(number), source="stdlib", text=text).model_dump_json() + "\n")
    return {"chars": sum(map(len, texts)), "documents": len(texts), "longest_document_chars": max(map(len, texts)),
            "jsonl_mib": round(path.stat().st_size / 2**20, 1)}


def save_tokenizer(texts: list[str], vocab: int, out_dir: Path) -> None:
    from omnilong.models.families import get_family
    from omnilong.models.tokenizer import train_tokenizer

    sample, chars = [], 0
    for text in texts:
        if chars >= TOKENIZER_SAMPLE_CHARS:
            break
        sample.append(text)
        chars += len(text)
    train_tokenizer(sample, get_family(FAMILY), vocab).save_pretrained(out_dir)


# --- one method, in its own process ----------------------------------------------------------------


def measure_one(method: str, root: Path, raw: str, out: str, workers: int) -> dict:
    from omnilong.config import parse_params
    from omnilong.data.prepare import encoding_pool, prepare_stage
    from omnilong.models.loading import load_tokenizer

    tokenizer = load_tokenizer(root / "tokenizer")
    stage = {"corpora": [CORPUS], "seq_len": 64, "sp_size": 1}
    params = parse_params({
        "model": {"family": FAMILY, "path": "tokenizer"},
        "data": {"raw_dir": raw, "tokenized_dir": out, "prepare_workers": workers},
        # Only stage 1 is prepared; the others are there because params need them.
        "stages": {"stage1": stage, "stage2": stage, "stage3": {**stage, "video_frames": {"num_frames": 2}}},
    })
    jsonl = root / raw / "user" / CORPUS / "text" / "part-0.jsonl"
    if method == "datasets":  # imported only here: its libraries would add to the others' memory
        import datasets

        datasets.disable_progress_bars()
    started = time.perf_counter()
    if method == "ours":
        with encoding_pool(params, tokenizer) as pool:
            tokens = prepare_stage(params, "stage1", pool, None, root).num_tokens
        return {"seconds": time.perf_counter() - started, "tokens": tokens}
    if method == "plain":
        tokens = plain_loop(tokenizer, jsonl, root / out / "stage1")
        return {"seconds": time.perf_counter() - started, "tokens": tokens}
    loaded_ds = datasets.Dataset.from_json(str(jsonl), cache_dir=str(root / out / "cache"))
    loaded = time.perf_counter()
    tokenized = loaded_ds.map(
        lambda batch: tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False),
        batched=True, num_proc=workers if workers > 1 else None, remove_columns=loaded_ds.column_names,
    )
    ended = time.perf_counter()
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    return {"seconds": ended - started, "map_seconds": ended - loaded, "tokens": tokens,
            "documents": len(tokenized)}


def plain_loop(tokenizer, jsonl: Path, stage_dir: Path) -> int:
    """The per-document loop: one `tokenizer.encode` per record, as `prepare` did before batching."""
    import numpy as np

    from omnilong.data.prepare import DocumentEntry, TokenizedDocument, text_document, write_tokenized
    from omnilong.data.schemas import iter_records

    def documents():
        for record in iter_records(jsonl, "text"):
            token_ids, trainable = text_document(tokenizer, record)
            yield TokenizedDocument(DocumentEntry(id=record.id, corpus=CORPUS), np.asarray(token_ids, np.int32),
                                    np.asarray(trainable, bool))

    return write_tokenized(stage_dir, "stage1", FAMILY, tokenizer.pad_token_id, documents()).num_tokens


# --- the comparison ----------------------------------------------------------------------------------


def run_method(method: str, root: Path, size: str, workers: int, tag: str, log: Path) -> dict:
    from benchmarks.measure import run_with_peak_rss

    out = f"out/{method}-{workers}-{size}-{tag}"
    command = [sys.executable, "-m", "benchmarks.prepare_throughput", "--measure", method, "--root", str(root),
               "--raw", f"raw-{size}", "--tokenized", out, "--workers", str(workers)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    with log.open("a") as stderr:
        stdout, peak = run_with_peak_rss(command, stderr=stderr, env=env)
    result = {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_mib": round(peak / 2**20, 1), "out": out}
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    print(f"{method} x{workers} ({size}, {tag}): {result}", file=sys.stderr, flush=True)
    return result


def same_files(root: Path, a: str, b: str) -> bool:
    return all(filecmp.cmp(root / a / "stage1" / name, root / b / "stage1" / name, shallow=False)
               for name in COMPARED_FILES)


def compare(args: argparse.Namespace, root: Path) -> dict:
    texts = stdlib_texts()
    small = corpus_texts(texts, args.chars)
    longest = max(map(len, small))
    large = corpus_texts([text for text in texts if len(text) <= longest], 4 * sum(map(len, small)))
    corpus = {"small": write_corpus(root / "raw-small", small), "large": write_corpus(root / "raw-large", large)}
    save_tokenizer(texts, args.vocab, root / "tokenizer")
    log = root / "stderr.log"
    n = args.workers
    load_before = os.getloadavg()[0]

    def run(method: str, workers: int, size: str = "small", tag: str = "0") -> dict:
        return run_method(method, root, size, workers, tag, log)

    plain = run("plain", 1)
    # The one-process runs of ours and datasets are left out of a quick run (a test's: each run
    # costs a process start, seconds on a loaded machine).
    ours_1, datasets_1 = (None, None) if args.quick else (run("ours", 1), run("datasets", 1))
    ours_n, datasets_n = [], []
    for repeat in range(args.repeats):  # taking turns, so that load on the machine falls on both
        ours_n.append(run("ours", n, tag=str(repeat)))
        datasets_n.append(run("datasets", n, tag=str(repeat)))
    ours_large = run("ours", n, "large")
    best_ours = max(ours_n, key=lambda r: r["tokens_per_s"])
    best_datasets = max(datasets_n, key=lambda r: r["tokens_per_s"])
    best_datasets_map = min(r["map_seconds"] for r in datasets_n)

    identical = all(same_files(root, plain["out"], ours["out"]) for ours in (ours_1, *ours_n) if ours)
    documents = corpus["small"]["documents"]
    # datasets' rows hold the text's tokens only; ours and plain end each document with eos.
    same_tokens = datasets_n[0]["tokens"] + documents == best_ours["tokens"] == plain["tokens"]
    memory_ratio = ours_large["peak_rss_mib"] / best_ours["peak_rss_mib"]
    summary = {
        "benchmark": "prepare_throughput",
        "quick": args.quick,
        "workers": n,
        "cpu_count": os.cpu_count(),
        "load_avg_1m_before": round(load_before, 2),
        "ratio_vs_datasets": best_ours["tokens_per_s"] / best_datasets["tokens_per_s"],
        "ratio_vs_datasets_map_only": best_datasets_map / best_ours["seconds"],
        "ratio_vs_plain": best_ours["tokens_per_s"] / plain["tokens_per_s"],
        "ratio_1_worker_vs_datasets_1": ours_1 and ours_1["tokens_per_s"] / datasets_1["tokens_per_s"],
        "ratio_1_worker_vs_plain": ours_1 and ours_1["tokens_per_s"] / plain["tokens_per_s"],
        "memory_ratio_large_over_small": memory_ratio,
        "projected_hours_for_1_2b_tokens": RECIPE_TOKENS / ours_large["tokens_per_s"] / 3600,
        "identical_files_plain_ours": identical,
        "same_token_counts": same_tokens,
        "tokens_per_s": {"ours_n": best_ours["tokens_per_s"], "ours_n_large": ours_large["tokens_per_s"],
                         "ours_1": ours_1 and ours_1["tokens_per_s"], "plain": plain["tokens_per_s"],
                         "datasets_n": best_datasets["tokens_per_s"],
                         "datasets_1": datasets_1 and datasets_1["tokens_per_s"]},
        "seconds": {"ours_n": [r["seconds"] for r in ours_n], "datasets_n": [r["seconds"] for r in datasets_n],
                    "datasets_n_map": [r["map_seconds"] for r in datasets_n], "ours_1": ours_1 and ours_1["seconds"],
                    "plain": plain["seconds"], "datasets_1": datasets_1 and datasets_1["seconds"],
                    "ours_n_large": ours_large["seconds"]},
        "peak_rss_mib": {"ours_n_small": best_ours["peak_rss_mib"], "ours_n_large": ours_large["peak_rss_mib"],
                         "ours_1": ours_1 and ours_1["peak_rss_mib"], "plain": plain["peak_rss_mib"],
                         "datasets_n": best_datasets["peak_rss_mib"],
                         "datasets_1": datasets_1 and datasets_1["peak_rss_mib"]},
        "corpus": {**corpus, "tokens_small": plain["tokens"], "tokens_large": ours_large["tokens"],
                   "tokenizer_vocab": args.vocab},
        "targets": {"ratio_vs_datasets": 1.0, "memory_ratio_large_over_small": 1.1},
    }
    summary["meets_targets"] = bool(identical and same_tokens and summary["ratio_vs_datasets"] >= 1.0
                                    and memory_ratio <= 1.1)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small corpus and tokenizer (a test's run)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--chars", type=int, help="characters of the small corpus (the large one: 4x)")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--work", type=Path, help="keep the corpora and outputs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="also write the JSON line here")
    # One method's run, in the process the comparison starts for it.
    parser.add_argument("--measure", choices=("ours", "plain", "datasets"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--tokenized", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers < 2 and not args.measure:
        parser.error("--workers must be at least 2 (the comparison is of N processes against N)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure_one(args.measure, args.root, args.raw, args.tokenized, args.workers)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="prepare_throughput_"))
    try:
        summary = compare(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    from benchmarks.measure import emit_summary

    emit_summary(summary, args.out)


if __name__ == "__main__":
    main()
