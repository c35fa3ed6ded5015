"""Chunked linear cross-entropy vs the plain reference: peak memory and time of forward+backward.

    python -m benchmarks.chunked_loss [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]

Shapes: H=896 and V=151,936 (Qwen2.5-0.5B's LM head); ours at N in {2K, 4K, 8K, 16K}, the
reference at N in {2K, 4K, 8K} (at 16K its [N, V] tensors alone exceed 20 GB). The headline
ratios are at N=8192. `--quick` runs a small shape in well under a minute. Our chunk size is
`auto` from a 64 MiB workspace budget (104 tokens for this shape in fp32): the one chunk of
logits it holds is most of our transient memory, while the time hardly depends on it (the
matmuls keep their efficiency from 64 tokens up on CPU).

Accounting. Every figure is measured; none is computed from shapes.
- Each variant (implementation x N) runs in a fresh subprocess of this module (`--variant`), so
  no allocator cache, library state or earlier peak carries over from another variant.
- In that process the inputs are made first: hidden [N, H] and the weight [V, H], both leaves
  that require grad, and labels [N] (all valid), from a seeded generator, identical in every
  process. A first call in a process also allocates ~20 MiB of one-time library state (thread
  pools, BLAS buffers), which a training process has paid long before its thousandth step:
  one warm-up call on 256 rows pays it before the baseline. Its gradients are dropped,
  `gc.collect()` runs, and on glibc `malloc_trim(0)` hands freed heap back to the OS, so memory
  freed before the measurement cannot hide allocations made during it. Each process runs with
  glibc's MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB: otherwise its dynamic threshold lets freed
  buffers under 32 MiB (a --quick chunk of logits) stay in a thread's heap arena and adds one
  or two chunks to the peak RSS at random. Fixed, every large buffer is a mapping of its own,
  unmapped on free, so the peak RSS follows the live tensors, as the CUDA allocator's peak does
  on GPU. The reference's [N, V] buffers are above 32 MiB and mapped either way.
- The baseline is then taken and the measured call runs: the loss forward and
  `loss.backward()`. CPU: writing "5" to /proc/self/clear_refs resets the kernel's peak RSS
  (VmHWM) to the current RSS, which is the baseline (VmRSS); after the call, the peak is VmHWM.
  GPU: `torch.cuda.reset_peak_memory_stats()`, baseline = `memory_allocated()`, peak =
  `max_memory_allocated()`.
- total = peak - baseline: everything the call added at its worst moment, gradients included
  (what Cut Cross-Entropy's published table counts).
- grads = the bytes of the gradients the call returns (hidden.grad and weight.grad, read from
  those tensors after the call). transient = total - grads.
- floor_ratio = our total / grads: the gradients must exist, so 1.0 is the physical floor.
- Time: wall clock of the same measured call (after a CUDA synchronize on GPU); the process's
  CPU time beside it. On a shared machine wall time is noisy (other processes take cores), so
  at the headline N the call is repeated (`--repeats`, default 2) and the fastest one counts;
  memory is always that of the first call in the fresh process.
- Agreement: after measuring, each process saves its loss and gradients to a temporary
  directory; where both implementations ran at one N, the parent asserts they agree (fp32:
  rtol 1e-5, atol 1e-4 x max|reference|; bf16: rtol 1.6e-2, atol 2e-2 x max|reference|). The
  fp32 atol is wider than the unit tests' 1e-5 because at V=151,936 the fp32 reference itself
  is ~2e-5 (of the max) off an fp64 truth in the hidden gradient (ours: ~1e-6). That is
  measured too: on 64 sampled rows the hidden gradient of both is compared with an fp64 truth,
  ours is asserted within 1e-5 of it (bf16: 2e-2), and both errors are reported.
The last line printed is one JSON object: {"benchmark": "chunked_loss", "memory_ratio": ...}.
Targets at N=8192: memory_ratio <= 0.01, total_memory_ratio <= 0.05, floor_ratio <= 1.15,
time_ratio <= 0.9. On a GPU, run it again with `--device cuda --dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.measure import PeakMemory, emit_summary, sync
from omnilong.loss import auto_chunk_tokens, linear_cross_entropy

REPO = Path(__file__).resolve().parents[1]
HEADLINE_TOKENS = 8192
FULL_BUDGET_MB, QUICK_BUDGET_MB = 64, 8
FULL = {"hidden": 896, "vocab": 151_936, "ours": [2048, 4096, 8192, 16384], "reference": [2048, 4096, 8192]}
# A smoke run in well under a minute: the same accounting, but at a small H the per-chunk
# update of the [V, H] gradient dominates our time, so its ratios are not the targets'.
QUICK = {"hidden": 256, "vocab": 32_000, "ours": [512, 1024, 2048], "reference": [512, 1024]}
QUICK_HEADLINE_TOKENS = 1024
TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (1.6e-2, 2e-2)}  # (rtol, atol as a fraction of max|ref|)
TRUTH_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # of max|truth|
TRUTH_ROWS = 64
WARMUP_TOKENS = 256  # more than two chunks: the same kernels as the measured call
SEED = 0
MMAP_THRESHOLD_BYTES = 2**20


@dataclass(frozen=True)
class Variant:
    impl: str  # "chunked" | "reference"
    tokens: int
    hidden: int
    vocab: int
    dtype: str
    device: str
    chunk_tokens: int | str  # or "auto": from memory_budget_mb
    memory_budget_mb: int
    save_dir: str
    repeats: int  # measured calls; memory from the first, time the fastest


def make_inputs(variant: Variant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], labels [N]; logits spread ~3 so the softmax is not flat."""
    generator = torch.Generator().manual_seed(SEED)
    dtype, device = getattr(torch, variant.dtype), torch.device(variant.device)
    hidden = torch.randn(variant.tokens, variant.hidden, generator=generator)
    weight = torch.randn(variant.vocab, variant.hidden, generator=generator) * (3.0 / variant.hidden**0.5)
    labels = torch.randint(0, variant.vocab, (variant.tokens,), generator=generator)
    return (
        hidden.to(device, dtype).requires_grad_(),
        weight.to(device, dtype).requires_grad_(),
        labels.to(device),
    )


def run_variant(variant: Variant) -> dict:
    """Inputs, warm-up, then one measured forward+backward; returns the figures."""
    device = torch.device(variant.device)
    hidden, weight, labels = make_inputs(variant)

    def loss_and_backward(hidden_rows: torch.Tensor, labels_rows: torch.Tensor) -> torch.Tensor:
        loss_sum, _count = linear_cross_entropy(
            hidden_rows,
            weight,
            labels_rows,
            impl=variant.impl,
            chunk_tokens=variant.chunk_tokens,
            memory_budget_bytes=variant.memory_budget_mb * 2**20,
        )
        loss_sum.backward()
        return loss_sum.detach()

    warmup_rows = hidden.detach()[:WARMUP_TOKENS].requires_grad_()
    loss_and_backward(warmup_rows, labels[:WARMUP_TOKENS])
    del warmup_rows
    weight.grad = None

    def timed_call() -> tuple[torch.Tensor, float, float]:
        hidden.grad, weight.grad = None, None
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        loss_sum = loss_and_backward(hidden, labels)
        sync(device)
        return loss_sum, time.perf_counter() - wall_start, time.process_time() - cpu_start

    meter = PeakMemory(device)
    meter.reset()
    loss_sum, wall_s, cpu_s = timed_call()
    total = meter.peak_above_baseline()
    grads = hidden.grad.nbytes + weight.grad.nbytes
    torch.save(
        {"loss": loss_sum.cpu(), "hidden_grad": hidden.grad.cpu(), "weight_grad": weight.grad.cpu()},
        Path(variant.save_dir) / f"{variant.impl}_{variant.tokens}.pt",
    )
    # Further calls only for time: the fastest is the one least disturbed by other processes.
    wall_samples, cpu_samples = [wall_s], [cpu_s]
    for _ in range(variant.repeats - 1):
        _, wall_s, cpu_s = timed_call()
        wall_samples.append(wall_s)
        cpu_samples.append(cpu_s)
    return {
        **asdict(variant),
        "loss": loss_sum.item(),
        "total_bytes": total,
        "grads_bytes": grads,
        "transient_bytes": total - grads,
        "wall_s": min(wall_samples),
        "cpu_s": min(cpu_samples),
        "wall_s_samples": wall_samples,
    }


def _spawn(variant: Variant) -> dict:
    """Run one variant in a fresh interpreter; its last stdout line is the JSON result."""
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.chunked_loss", "--variant", json.dumps(asdict(variant))],
        cwd=REPO,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)},
        capture_output=True,
        text=True,
    )
    if process.returncode != 0:
        raise RuntimeError(
            f"variant {variant.impl} N={variant.tokens} failed (exit {process.returncode}):\n{process.stderr[-3000:]}"
        )
    return json.loads(process.stdout.strip().splitlines()[-1])


def _check_room(variant: Variant) -> None:
    """Refuse to start a reference run the machine cannot hold, rather than be OOM-killed mid-way."""
    if variant.device != "cpu" or variant.impl != "reference":
        return
    available = _meminfo_bytes("MemAvailable")
    # Its log-softmax output and the two gradients of the logits are [N, V] each.
    needed = 3 * variant.tokens * variant.vocab * getattr(torch, variant.dtype).itemsize
    if available < needed:
        raise RuntimeError(
            f"reference at N={variant.tokens} needs about {needed / 2**30:.1f} GiB free, "
            f"{available / 2**30:.1f} GiB available; rerun on an idle machine or with --quick"
        )


def _meminfo_bytes(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/meminfo: no {key} line")


def _assert_agree(save_dir: Path, variant: Variant) -> dict:
    """Ours vs the reference at one N, and both vs an fp64 truth on sampled hidden-gradient rows."""
    ours = torch.load(save_dir / f"chunked_{variant.tokens}.pt")
    reference = torch.load(save_dir / f"reference_{variant.tokens}.pt")
    rtol, atol_fraction = TOLERANCE[variant.dtype]
    max_diff = {}
    for name in ("loss", "hidden_grad", "weight_grad"):
        expected = reference[name].float()
        scale = expected.abs().max().item()
        torch.testing.assert_close(
            ours[name].float(),
            expected,
            rtol=rtol,
            atol=atol_fraction * scale,
            msg=lambda m: f"N={variant.tokens} {name}: {m}",
        )
        max_diff[name] = (ours[name].float() - expected).abs().max().item() / max(scale, 1e-30)

    # A row of the hidden gradient depends on its own row only, so an fp64 truth for a sample
    # of rows is cheap; it tells on which side a difference lies.
    hidden, weight, labels = make_inputs(replace(variant, device="cpu"))
    rows = torch.linspace(0, variant.tokens - 1, TRUTH_ROWS).long()
    truth_rows = hidden.detach()[rows].double().requires_grad_()
    truth_loss, _ = linear_cross_entropy(truth_rows, weight.detach().double(), labels[rows], impl="reference")
    (truth,) = torch.autograd.grad(truth_loss, truth_rows)
    del hidden, weight
    scale = truth.abs().max().item()
    errors = {
        impl: (saved["hidden_grad"][rows].double() - truth).abs().max().item() / scale
        for impl, saved in (("chunked", ours), ("reference", reference))
    }
    assert errors["chunked"] <= TRUTH_TOLERANCE[variant.dtype], (
        f"N={variant.tokens}: our hidden gradient is {errors['chunked']:.2e} (of its max) off the fp64 truth"
    )
    return {"max_diff_over_max": max_diff, "hidden_grad_rows_error_vs_fp64": errors}


def main_parent(args: argparse.Namespace) -> dict:
    shape = QUICK if args.quick else FULL
    headline = QUICK_HEADLINE_TOKENS if args.quick else HEADLINE_TOKENS
    results: dict[tuple[str, int], dict] = {}
    agreement = {}
    with tempfile.TemporaryDirectory(prefix="chunked_loss_bench.") as save_dir:
        for tokens in sorted(set(shape["ours"]) | set(shape["reference"])):
            for impl in ("reference", "chunked"):
                if tokens not in shape["ours" if impl == "chunked" else "reference"]:
                    continue
                variant = Variant(
                    impl,
                    tokens,
                    shape["hidden"],
                    shape["vocab"],
                    args.dtype,
                    args.device,
                    args.chunk_tokens,
                    args.memory_budget_mb,
                    save_dir,
                    args.repeats if tokens == headline else 1,
                )
                _check_room(variant)
                result = _spawn(variant)
                results[(impl, tokens)] = result
                print(
                    f"{impl:9s} N={tokens:6d}  total {result['total_bytes'] / 2**20:9.1f} MiB  "
                    f"transient {result['transient_bytes'] / 2**20:9.1f} MiB  "
                    f"grads {result['grads_bytes'] / 2**20:7.1f} MiB  "
                    f"wall {result['wall_s']:7.2f} s  cpu {result['cpu_s']:7.2f} s",
                    flush=True,
                )
            if tokens in shape["reference"] and tokens in shape["ours"]:
                agreement[tokens] = _assert_agree(Path(save_dir), variant)

    ours, reference = results[("chunked", headline)], results[("reference", headline)]
    summary = {
        "benchmark": "chunked_loss",
        "memory_ratio": ours["transient_bytes"] / reference["transient_bytes"],
        "total_memory_ratio": ours["total_bytes"] / reference["total_bytes"],
        "floor_ratio": ours["total_bytes"] / ours["grads_bytes"],
        "time_ratio": ours["wall_s"] / reference["wall_s"],
        "cpu_time_ratio": ours["cpu_s"] / reference["cpu_s"],
        "tokens": headline,
        "hidden": shape["hidden"],
        "vocab": shape["vocab"],
        "dtype": args.dtype,
        "device": args.device,
        "chunk_tokens": _resolved_chunk_tokens(args, shape),
        "memory_budget_mb": args.memory_budget_mb,
        "quick": args.quick,
        "transient_mib": {
            impl: {str(n): round(r["transient_bytes"] / 2**20, 1) for (i, n), r in results.items() if i == impl}
            for impl in ("chunked", "reference")
        },
        "total_mib": {
            impl: {str(n): round(r["total_bytes"] / 2**20, 1) for (i, n), r in results.items() if i == impl}
            for impl in ("chunked", "reference")
        },
        "wall_s": {
            impl: {str(n): round(r["wall_s"], 2) for (i, n), r in results.items() if i == impl}
            for impl in ("chunked", "reference")
        },
        "agreement": {str(n): figures for n, figures in agreement.items()},
    }
    return summary


def _chunk_tokens_arg(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _resolved_chunk_tokens(args: argparse.Namespace, shape: dict) -> int:
    if args.chunk_tokens != "auto":
        return args.chunk_tokens
    return auto_chunk_tokens(shape["vocab"], shape["hidden"], getattr(torch, args.dtype), args.memory_budget_mb * 2**20)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small shape, under a minute")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    parser.add_argument(
        "--chunk-tokens", type=_chunk_tokens_arg, default="auto", help="tokens per chunk of ours, or auto"
    )
    parser.add_argument(
        "--memory-budget-mb",
        type=int,
        help=f"chunk workspace budget that `auto` fits, MiB (default {FULL_BUDGET_MB}; {QUICK_BUDGET_MB} with --quick)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed calls at the headline N (the fastest counts)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one measured run, in a child
    args = parser.parse_args(argv)
    if args.memory_budget_mb is None:
        args.memory_budget_mb = QUICK_BUDGET_MB if args.quick else FULL_BUDGET_MB
    if args.variant:
        print(json.dumps(run_variant(Variant(**json.loads(args.variant)))))
        return
    emit_summary(main_parent(args), args.out)


if __name__ == "__main__":
    main()
