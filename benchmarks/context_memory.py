"""`python -m benchmarks.context_memory`: peak memory per token of a whole training step, ours
against the naive path, against the floor the model's shapes force.

Model: a Qwen2.5-VL config whose language model has Qwen2-0.5B's shapes (`--shapes 0.5b`, the
default; `7b`: Qwen2.5-7B's; `toy`: the tests' toy shapes) cut to `--layers` (a comma-separated
list: each count is measured), a one-block vision tower, random weights. Each length trains one
whole step (forward, backward, optimizer) on one packed row of one document:

- naive: transformers' own loss on the full logits, SDPA, activation checkpointing, one process,
  AdamW; the model built where it trains (`with device:`). Measured in this process.
- ours: the stage runner's path (`omnilong.train.runner.build_engine` / `train_step`: ZeRO-3,
  the chunked loss, ring attention at `sp_size` 2 on CPU (2 gloo ranks under torchrun) and the
  runner's own attention at sp_size 1 on one GPU, activation checkpointing), under torchrun, each
  rank measuring its own peak (benchmarks/context_memory_worker.py). `--train-option KEY=VALUE`
  sets `stages.stage1.train.KEY` (dotted keys reach nested fields; values are YAML) so the train
  techniques (tiled MLP, activation offload) are switched on by name; `--offload-activations`
  sets `offload_activations: true` and moves the floor's checkpoint term to host memory.

Peak memory: the CUDA allocator's peak, or on CPU the process's resident high-water mark, above
the memory held just before the step (benchmarks/measure.py); ours takes the larger rank's.
Memory = fixed + slope x tokens is fitted by least squares over the lengths; the slope is per
token of the whole sequence (at sp_size 2 each rank holds half its activations).

The floor per token (bytes, per token of the whole sequence, divided by sp_size), term by term:
  (i)   layer-boundary checkpoints: layers x hidden x bytes (host memory with activation offload);
  (ii)  the one layer being recomputed: its input gradient and output gradient, the normed
        input, q, k, v and the attention output each with its gradient (hidden or K/V widths
        x bytes), the attention's log-sum-exp (heads x 4 bytes, fp32);
  (iii) the hidden-state gradient the chunked loss keeps from forward to backward: hidden x bytes.
A tile of the MLP, a chunk of the loss and the weights count as fixed.

The longest sequence under `--cap-gib` per rank is read off each fit (fixed + slope x L <= cap),
rounded down to a multiple of 2 x sp_size, and labelled extrapolated. With two or more layer
counts, fixed and slope are fitted linearly in layers and extrapolated to the whole model
(`--extrapolate-layers`, default the named model's depth), labelled so; with activation offload
the host's `--host-cap-gib` bounds that length too.

Which phase of the step sets the peak: the decoder layers' backward (the floor's terms: a
recomputed layer, the checkpoints, the loss's hidden gradient) grows fastest with the tokens; the
loss's phase holds more fixed memory (under ZeRO-3 the LM head's weight gathered, in full
fine-tuning its float32 gradient, at Qwen2-0.5B's vocabulary 519 MiB each) and fewer tokens'
worth. Below the length where the two cross, the step's peak is the loss's, and its slope is
not the layers' per-token cost. `--vocab-size` moves that crossing: the per-token terms and the
floor stay the same, the head's fixed memory shrinks.

`--quick`: toy shapes, layers 1,2, short lengths (tests/test_context_memory.py), under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.measure import emit_summary, free_port, peak_per_length, release
from benchmarks.model_shapes import FULL_LAYERS, SHAPES, decoder_config

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
LSE_BYTES = 4  # ring attention keeps its log-sum-exp in float32 whatever the model's dtype


# ------------------------------------------------------------------------------------------ the floor

def floor_terms(shapes: dict, layers: int, dtype_bytes: int, sp_size: int) -> dict[str, int | float]:
    """Bytes per token of the whole sequence that a step cannot avoid holding, term by term."""
    hidden, heads, kv_heads = shapes["hidden_size"], shapes["num_attention_heads"], shapes["num_key_value_heads"]
    head_dim = hidden // heads
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    terms = {
        "i_layer_checkpoints": layers * hidden * dtype_bytes,
        "ii_layer_input_grad": hidden * dtype_bytes,
        "ii_layer_output_grad": hidden * dtype_bytes,
        "ii_normed_input": hidden * dtype_bytes,
        "ii_q_and_grad": 2 * q_width * dtype_bytes,
        "ii_k_and_grad": 2 * kv_width * dtype_bytes,
        "ii_v_and_grad": 2 * kv_width * dtype_bytes,
        "ii_attention_output_and_grad": 2 * q_width * dtype_bytes,
        "ii_attention_lse": heads * LSE_BYTES,
        "iii_loss_hidden_grad": hidden * dtype_bytes,
    }
    return {name: value / sp_size for name, value in terms.items()}


def floor_summary(shapes: dict, layers: int, dtype_bytes: int, sp_size: int, offload_activations: bool) -> dict:
    terms = floor_terms(shapes, layers, dtype_bytes, sp_size)
    host = terms["i_layer_checkpoints"] if offload_activations else 0.0
    return {"terms_bytes_per_token": terms, "device_bytes_per_token": sum(terms.values()) - host,
            "host_bytes_per_token": host}


# --------------------------------------------------------------------------------------- fits, ceilings

def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x -> (a, b)."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError(f"a linear fit needs two distinct x values, given {xs}")
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def longest_under(cap_bytes: float, fixed: float, slope: float, multiple: int) -> int | None:
    """The longest length L (a multiple of `multiple`) with fixed + slope x L <= cap; None if none."""
    if slope <= 0:
        return None
    longest = int((cap_bytes - fixed) // slope) // multiple * multiple
    return longest if longest > 0 else None


def fitted(rows: list[dict], cap_bytes: float, multiple: int) -> dict:
    """The rows with their fit; a path that ran out of memory below two lengths has no fit.

    The slope is `resolved` when the growth it predicts over the measured lengths is positive and
    at least twice the fit's RMS residual: otherwise the peaks did not grow beyond their own
    scatter (the fixed part set the peak at every length, see the module docstring), and no
    per-token figure, ratio or longest length is read off it."""
    measured = [r for r in rows if "peak_bytes" in r]
    if len({r["seq_len"] for r in measured}) < 2:
        return {"rows": rows, "fixed_bytes": None, "slope_bytes_per_token": None, "slope_resolved": False,
                "residual_bytes": None, "longest_under_cap_extrapolated": None}
    lengths, peaks = [r["seq_len"] for r in measured], [r["peak_bytes"] for r in measured]
    fixed, slope = linear_fit(lengths, peaks)
    residual = (sum((peak - fixed - slope * n) ** 2 for n, peak in zip(lengths, peaks)) / len(peaks)) ** 0.5
    resolved = slope > 0 and slope * (max(lengths) - min(lengths)) >= 2 * residual
    return {"rows": rows, "fixed_bytes": fixed, "slope_bytes_per_token": slope, "slope_resolved": resolved,
            "residual_bytes": residual,
            "longest_under_cap_extrapolated": longest_under(cap_bytes, fixed, slope, multiple) if resolved else None}


def resolved_slope(fit: dict) -> float | None:
    return fit["slope_bytes_per_token"] if fit["slope_resolved"] else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def extrapolate_layers(per_layers: dict[int, dict], target_layers: int, floor_at, cap_bytes: float,
                       host_cap_bytes: float, multiple: int) -> dict:
    """Fixed and slope of ours, fitted linearly in layers, at `target_layers`; the longest length
    within the device cap and, with checkpoints offloaded, within the host's cap."""
    counts = sorted(per_layers)
    fixed0, fixed_per_layer = linear_fit(counts, [per_layers[n]["fixed_bytes"] for n in counts])
    slope0, slope_per_layer = linear_fit(counts, [per_layers[n]["slope_bytes_per_token"] for n in counts])
    fixed, slope = fixed0 + fixed_per_layer * target_layers, slope0 + slope_per_layer * target_layers
    floor = floor_at(target_layers)
    longest = longest_under(cap_bytes, fixed, slope, multiple)
    host_longest = None
    if floor["host_bytes_per_token"]:
        host_longest = int(host_cap_bytes // floor["host_bytes_per_token"]) // multiple * multiple
        longest = min(longest, host_longest) if longest else None
    return {"extrapolated": True, "layers": target_layers, "from_layers": counts,
            "fixed_bytes": fixed, "slope_bytes_per_token": slope, "slope_bytes_per_token_per_layer": slope_per_layer,
            "floor": floor, "ours_over_floor": slope / floor["device_bytes_per_token"],
            "longest_within_host_cap": host_longest, "longest_under_cap": longest}


# -------------------------------------------------------------------------------------------- naive

def naive_rows(config, lengths: list[int], warmup_len: int, device: torch.device, dtype: torch.dtype,
               finetune: str) -> list[dict]:
    """transformers' own path: full logits and its loss, SDPA, activation checkpointing, AdamW."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from omnilong.config import LoraParams
    from omnilong.train.lora import add_lora

    torch.manual_seed(0)
    with device:  # built where it trains: the weights never exist on the host
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if finetune == "lora":
        model = add_lora(model, LoraParams())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(seq_len: int) -> None:
        generator = torch.Generator().manual_seed(seq_len)
        input_ids = torch.randint(0, config.text_config.vocab_size, (1, seq_len), generator=generator).to(device)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(warmup_len)  # the optimizer's states are made once, not per length
    rows = peak_per_length(step, lengths, device, "naive")
    optimizer.zero_grad(set_to_none=True)  # an out-of-memory step may have left gradients
    return rows


# --------------------------------------------------------------------------------------------- ours

def parse_train_options(options: list[str]) -> dict:
    """`KEY=VALUE` pairs (dotted keys nest, values are YAML) -> a nested mapping for `train`."""
    train: dict = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise SystemExit(f"--train-option: expected KEY=VALUE (e.g. tiled_mlp.enabled=true), given {option!r}")
        *parents, leaf = key.split(".")
        node = train
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return train


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def ours_params(params_file: Path, *, world: int, sp_size: int, seq_len: int, finetune: str, precision: str,
                train_options: dict) -> dict:
    """params.yaml's mapping with stage 1 set up for the measurement; validated here, so a bad
    option is reported before any rank starts."""
    from omnilong.config import parse_params

    raw = yaml.safe_load(params_file.read_text())
    raw["parallel"] = {**raw.get("parallel", {}), "nnodes": 1, "nproc_per_node": world}
    stage = raw["stages"]["stage1"]
    stage.update(seq_len=seq_len, sp_size=sp_size, context_schedule=[])
    stage["train"] = _merged(stage.get("train") or {}, {"finetune": finetune, "precision": precision,
                                                         "activation_checkpointing": True})
    stage["train"] = _merged(stage["train"], train_options)
    for name in ("stage2", "stage3"):  # their sp_size must divide this run's world size
        raw["stages"][name]["sp_size"] = 1
    parse_params(raw, source=f"{params_file} with the benchmark's settings")
    return raw


def ours_rows(params_raw: dict, model_dirs: dict[int, str], lengths: list[int], warmup_len: int, world: int,
              work: Path, timeout: float) -> dict[int, list[dict]]:
    """Each rank's peaks from the worker under torchrun -> per layer count, the larger rank's row."""
    spec = work / "spec.json"
    spec.write_text(json.dumps({"params": params_raw, "model_dirs": {str(k): v for k, v in model_dirs.items()},
                                "lengths": lengths, "warmup_len": warmup_len}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
               "-m", "benchmarks.context_memory_worker", "--spec", str(spec), "--out", str(work)]
    # The ranks' stderr (their progress, and any traceback) goes to ours; their stdout is DeepSpeed's chatter.
    result = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ours: torchrun failed with exit status {result.returncode} (the ranks' stderr is above)")
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(world)]
    merged = {}
    for layers in model_dirs:
        per_rank = [rank[str(layers)]["rows"] for rank in ranks]
        merged[layers] = [{"seq_len": rows[0]["seq_len"], "error": "oom"} if any("error" in r for r in rows) else
                          {"seq_len": rows[0]["seq_len"], "peak_bytes": max(r["peak_bytes"] for r in rows),
                           "peak_bytes_per_rank": [r["peak_bytes"] for r in rows],
                           "seconds": max(r["seconds"] for r in rows)} for rows in zip(*per_rank)]
    return merged


def save_model(config, dtype: torch.dtype, device: torch.device, directory: Path) -> str:
    """Random weights in a model directory, for the runner's loader (built on `device`)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    with device:
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    return str(directory)


# --------------------------------------------------------------------------------------------- main

def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Toy shapes, layers 1,2, short lengths (the CPU test).")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default=None, help="Language-model shapes (default 0.5b).")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="Replace the shapes' vocabulary. The floor per token does not depend on it; the "
                             "fixed memory of the loss's phase does (see the module docstring).")
    parser.add_argument("--layers", type=_ints, default=None, help="Decoder layer counts, e.g. 2,4 (default 4).")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="Default: bf16 on GPU, fp32 on CPU.")
    parser.add_argument("--finetune", choices=("full", "lora"), default="full")
    parser.add_argument("--naive-lengths", type=_ints, default=None, help="Default: 1K-8K on CPU, 16K-64K on GPU.")
    parser.add_argument("--lengths", type=_ints, default=None, help="Ours; default: 4K-32K on CPU, 128K-512K on GPU.")
    parser.add_argument("--sp-size", type=int, default=1 if on_gpu else 2, help="Ranks sharing a sequence (ours).")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="Memory per rank the longest lengths are read against (default: the GPU's, or 16 on CPU).")
    parser.add_argument("--host-cap-gib", type=float, default=128.0, help="Host memory for offloaded checkpoints.")
    parser.add_argument("--extrapolate-layers", type=int, default=None, help="Default: the named model's depth.")
    parser.add_argument("--offload-activations", action="store_true",
                        help="train.offload_activations: true; the floor's checkpoints counted in host memory.")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                        help="stages.stage1.train.KEY := VALUE (YAML) for ours, e.g. tiled_mlp.enabled=true.")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="Base params file for ours.")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON line here.")
    parser.add_argument("--timeout", type=float, default=7200.0, help="Seconds for ours' torchrun.")
    args = parser.parse_args(argv)
    quick = args.quick
    args.shapes = args.shapes or ("toy" if quick else "0.5b")
    args.layers = args.layers or ([1, 2] if quick else [4])
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.naive_lengths = args.naive_lengths or ([128, 256, 512] if quick else
                                                [16384, 32768, 65536] if on_gpu else [1024, 2048, 4096, 8192])
    args.lengths = args.lengths or ([128, 256, 512] if quick else
                                    [131072, 262144, 524288] if on_gpu else [4096, 8192, 16384, 32768])
    args.extrapolate_layers = args.extrapolate_layers or FULL_LAYERS[args.shapes]
    if args.cap_gib is None:
        args.cap_gib = torch.cuda.get_device_properties(0).total_memory / GIB if on_gpu else 16.0
    multiple = 2 * args.sp_size
    bad = [n for n in args.lengths if n % multiple]
    if bad:
        parser.error(f"--lengths: expected multiples of 2 x sp_size = {multiple}, given {bad}")
    return args


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dtype_bytes = 2 if args.dtype == "bf16" else 4
    shapes = {**SHAPES[args.shapes], **({"vocab_size": args.vocab_size} if args.vocab_size else {})}
    world = args.sp_size  # one sequence-parallel group: every rank shares the one row
    cap, host_cap, multiple = args.cap_gib * GIB, args.host_cap_gib * GIB, 2 * args.sp_size
    train_options = parse_train_options(args.train_option)
    if args.offload_activations:
        train_options["offload_activations"] = True
    params_raw = ours_params(args.params, world=world, sp_size=args.sp_size, seq_len=max(args.lengths),
                             finetune=args.finetune, precision=args.dtype, train_options=train_options)

    def floor_at(layers: int) -> dict:
        return floor_summary(shapes, layers, dtype_bytes, args.sp_size, args.offload_activations)

    warmup_len = 2 * multiple * 8
    runs = []
    with tempfile.TemporaryDirectory(prefix="context_memory_") as tmp:
        work = Path(tmp)
        configs = {layers: decoder_config(shapes, layers) for layers in args.layers}
        model_dirs = {layers: save_model(configs[layers], dtype, device, work / f"model_{layers}")
                      for layers in args.layers}
        release(device)
        ours = ours_rows(params_raw, model_dirs, args.lengths, warmup_len, world, work, args.timeout)
        for layers in args.layers:
            floor = floor_at(layers)
            record = {"layers": layers, "floor": floor, "ours": fitted(ours[layers], cap, multiple)}
            record["ours_over_floor"] = _ratio(resolved_slope(record["ours"]), floor["device_bytes_per_token"])
            if not args.skip_naive:
                rows = naive_rows(configs[layers], args.naive_lengths, warmup_len, device, dtype, args.finetune)
                release(device)  # the naive model of this layer count is gone: its memory too
                record["naive"] = fitted(rows, cap, 2)
                record["naive_over_ours"] = _ratio(resolved_slope(record["naive"]), resolved_slope(record["ours"]))
            runs.append(record)
    summary = {
        "benchmark": "context_memory", "device": str(device), "quick": args.quick,
        "shapes": args.shapes, "shape_values": shapes, "dtype": args.dtype, "finetune": args.finetune,
        "sp_size": args.sp_size, "train_options": train_options, "cap_gib": args.cap_gib,
        "naive_lengths": [] if args.skip_naive else args.naive_lengths, "lengths": args.lengths, "runs": runs,
    }
    if len(args.layers) >= 2 and all(r["ours"]["slope_resolved"] for r in runs):
        summary["whole_model"] = extrapolate_layers({r["layers"]: r["ours"] for r in runs}, args.extrapolate_layers,
                                                    floor_at, cap, host_cap, multiple)
    summary["seconds"] = time.perf_counter() - started
    return summary


def _figure(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def table(summary: dict) -> str:
    """The figures as a Markdown table (bytes per token; longest lengths extrapolated from the fits)."""
    header = ("| layers | naive B/token | ours B/token | floor B/token (device + host) | ours / floor | "
              "naive / ours | naive longest | ours longest |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        naive, floor = r.get("naive", {}), r["floor"]
        lines.append(
            f"| {r['layers']} | {_figure(naive.get('slope_bytes_per_token'))} | "
            f"{_figure(r['ours']['slope_bytes_per_token'])} | {_figure(floor['device_bytes_per_token'])} + "
            f"{_figure(floor['host_bytes_per_token'])} | {_figure(r['ours_over_floor'], '.2f')} | "
            f"{_figure(r.get('naive_over_ours'), '.1f')} | {_figure(naive.get('longest_under_cap_extrapolated'), ',')} | "
            f"{_figure(r['ours']['longest_under_cap_extrapolated'], ',')} |")
    whole = summary.get("whole_model")
    if whole:
        lines.append(f"| {whole['layers']} (extrapolated) | | {_figure(whole['slope_bytes_per_token'])} | "
                     f"{_figure(whole['floor']['device_bytes_per_token'])} + {_figure(whole['floor']['host_bytes_per_token'])} | "
                     f"{_figure(whole['ours_over_floor'], '.2f')} | | | {_figure(whole['longest_under_cap'], ',')} |")
    for r in summary["runs"]:
        for path in ("naive", "ours"):
            fit = r.get(path)
            if fit and fit["slope_bytes_per_token"] is not None and not fit["slope_resolved"]:
                lines.append(f"\n{path} at {r['layers']} layers: slope not resolved (the peaks did not grow beyond "
                             f"their scatter, RMS residual {fit['residual_bytes'] / 2**20:,.0f} MiB): the fixed part "
                             "set the peak at every length; no per-token figure is read off it")
    last = summary["runs"][-1]
    lines += ["", f"floor terms at {last['layers']} layers (bytes per token of the whole sequence, / sp_size): "
              + ", ".join(f"{name} {value:,.1f}" for name, value in last["floor"]["terms_bytes_per_token"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = run(args)
    print(table(summary))
    emit_summary(summary, args.out)


if __name__ == "__main__":
    main()
