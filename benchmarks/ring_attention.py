"""Ring attention (torch backend, CPU, gloo) vs full attention: error, memory, work balance, time.

    python -m benchmarks.ring_attention [--quick] [--out FILE]

Shapes: one row of S tokens, 28 query heads and 4 K/V heads of dim 128 (the attention of
Qwen2.5-VL-7B and LLaVA-OneVision-7B's Qwen2: GQA 7:1), fp32; S = 8192 (--quick: 2048); ring
sizes P = 2 and 4. The memory and time runs use one causal document (the case full attention
handles without a dense mask); errors are also reported for packed documents of uneven lengths
(S = 2048) against SDPA run document by document.

Accounting. Every memory figure is measured; none is computed from shapes.
- Each variant (full attention; the ring at each P) runs in fresh processes: one for full
  attention, P gloo ranks for the ring. Each process runs with glibc's MALLOC_MMAP_THRESHOLD_
  fixed at 1 MiB, so every large buffer is a mapping of its own and is unmapped on free: the
  peak RSS follows the live tensors.
- A warm-up call on a small shape first pays one-time state (thread pools, gloo connections);
  `gc.collect()` and `malloc_trim(0)` return what it freed. Then the baseline: writing "5" to
  /proc/self/clear_refs resets the kernel's peak RSS (VmHWM) to the current RSS (VmRSS).
- The measured call: make the inputs (q, k, v and the output gradient, laid out as
  transformers passes them, [B, S, H, D] in memory), forward, backward. Peak = VmHWM - baseline
  after the forward, and after the backward (the headline): inputs, outputs, gradients, ring
  buffers, accumulators and the kernels' workspace, at the worst moment.
- memory_ratio = P x (largest peak over the P ranks) / (peak of full attention in one process).
  Target <= 1.6 (ring-flash-attn puts its own floor at about 2x: it double-buffers whole K/V
  shards; this ring streams half-shard chunks, see omnilong/parallel/ring_comm.py).
- Work imbalance: query-key pairs each rank computes (`DocumentLayout.score_count`, counted over
  the very kernel calls the ring makes), max / mean over ranks, for zigzag and contiguous
  sharding. Target for zigzag <= 1.05.
- Time: wall clock of the measured forward+backward (inputs excluded), the slowest rank for
  the ring. Full attention uses all cores; the P ranks share the same cores (one thread each
  on this 2-core machine), so the ratio shows the ring's overhead, not a speed-up.
- Error: max |ring - full| over the output and dq, dk, dv, same inputs.
The last line printed is one JSON object: {"benchmark": "ring_attention", ...}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks.measure import PeakMemory, emit_summary, free_port
from omnilong.parallel.documents import DocumentLayout
from omnilong.parallel.ring_attention_torch import torch_ring_attention
from omnilong.parallel.zigzag import SequenceLayout, unshard_sequence

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
FULL_SEQ_LEN, QUICK_SEQ_LEN = 8192, 2048
SP_SIZES = (2, 4)
PACKED_SEQ_LEN = 2048
PACKED_DOC_LENS = [[301, 1100, 7, 433]]  # then 207 tokens of padding
BLOCK = 256  # inputs are drawn block by block, so every sharding sees the same numbers
MMAP_THRESHOLD_BYTES = 1 << 20
TARGETS = {"memory_ratio": 1.6, "imbalance_zigzag": 1.05}


# --- inputs and measurement ---------------------------------------------------------------------


def make_inputs(seq_len: int, layout: SequenceLayout | None, rank: int) -> dict[str, torch.Tensor]:
    """q, k, v, dout of the tokens rank `rank` holds (all tokens if `layout` is None), [B, H, n, D]
    over [B, n, H, D] memory; drawn per block of BLOCK tokens from seeds of (tensor, block)."""
    spans = [(0, seq_len)] if layout is None else [layout.chunk_span(c) for c in layout.chunks(rank)]
    inputs = {}
    for index, (name, heads) in enumerate((("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS), ("dout", HEADS))):
        tensor = torch.empty(1, sum(end - start for start, end in spans), heads, HEAD_DIM)
        at = 0
        for start, end in spans:
            for block_start in range(start, end, BLOCK):
                size = min(BLOCK, end - block_start)
                generator = torch.Generator().manual_seed(index * 1_000_003 + block_start)
                tensor[:, at : at + size] = torch.randn(1, size, heads, HEAD_DIM, generator=generator)
                at += size
        inputs[name] = tensor.transpose(1, 2)
    return inputs


def measured_call(make_inputs_fn, attend) -> dict:
    """Baseline, then inputs, `attend(q, k, v)` forward and backward: peaks, time and results."""
    meter = PeakMemory(torch.device("cpu"))
    meter.reset()
    inputs = make_inputs_fn()
    q, k, v = (inputs[name].requires_grad_() for name in "qkv")
    start = time.perf_counter()
    out = attend(q, k, v)
    forward_peak = meter.peak_above_baseline() / 2**20
    out.backward(inputs["dout"])
    elapsed = time.perf_counter() - start
    return {
        "peak_mib": meter.peak_above_baseline() / 2**20, "forward_peak_mib": forward_peak, "time_s": elapsed,
        "tensors": {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad},
    }


def _full_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


# --- workers (fresh processes) ----------------------------------------------------------------


def full_worker(_rank: int, seq_len: int, out_dir: str) -> None:
    measured_call(lambda: make_inputs(BLOCK, None, 0), _full_attention)  # warm-up
    torch.save(measured_call(lambda: make_inputs(seq_len, None, 0), _full_attention), Path(out_dir) / "full.pt")


def ring_worker(rank: int, sp_size: int, seq_len: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // sp_size))
    dist.init_process_group("gloo", rank=rank, world_size=sp_size)

    def run(run_seq_len: int, doc_lens) -> dict:
        layout = SequenceLayout(run_seq_len, sp_size)
        documents = DocumentLayout(layout, rank, doc_lens)
        dist.barrier()  # start together: the slowest rank's time is the ring's
        return measured_call(
            lambda: make_inputs(run_seq_len, layout, rank), lambda q, k, v: torch_ring_attention(q, k, v, documents)
        )

    run(BLOCK * sp_size, [[BLOCK * sp_size]])  # warm-up
    result = run(seq_len, [[seq_len]])
    result["packed"] = run(PACKED_SEQ_LEN, PACKED_DOC_LENS)["tensors"]
    torch.save(result, Path(out_dir) / f"ring{sp_size}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _spawn(worker, nprocs: int, args: tuple) -> None:
    mp.start_processes(worker, args=args, nprocs=nprocs, start_method="spawn")


# --- report ---------------------------------------------------------------------------------------


def packed_reference() -> dict[str, torch.Tensor]:
    """Full attention document by document (and the padding tail alone), in one process."""
    inputs = make_inputs(PACKED_SEQ_LEN, None, 0)
    sizes = PACKED_DOC_LENS[0] + [PACKED_SEQ_LEN - sum(PACKED_DOC_LENS[0])]
    q, k, v = (inputs[name].requires_grad_() for name in "qkv")
    pieces, start = [], 0
    for size in sizes:
        span = slice(start, start + size)
        pieces.append(_full_attention(q[:, :, span], k[:, :, span], v[:, :, span]))
        start += size
    out = torch.cat(pieces, dim=2)
    out.backward(inputs["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def max_error(shards: list[dict], layout: SequenceLayout, reference: dict) -> float:
    return max(
        (unshard_sequence([s[name] for s in shards], layout, dim=2) - reference[name]).abs().max().item()
        for name in reference
    )


def imbalance(layout: SequenceLayout, doc_lens) -> float:
    work = [DocumentLayout(layout, rank, doc_lens).score_count() for rank in range(layout.sp_size)]
    return max(work) / (sum(work) / len(work))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="S = 2048, under a minute")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    seq_len = QUICK_SEQ_LEN if args.quick else FULL_SEQ_LEN
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)  # read by the fresh processes

    print(f"shape: S={seq_len}, B=1, heads={HEADS}, kv_heads={KV_HEADS}, head_dim={HEAD_DIM}, fp32, CPU")
    with tempfile.TemporaryDirectory(prefix="ring_attention_bench.") as tmp:
        _spawn(full_worker, 1, (seq_len, tmp))
        full = torch.load(Path(tmp) / "full.pt")
        print(f"full attention: peak {full['peak_mib']:.0f} MiB (forward {full['forward_peak_mib']:.0f}), "
              f"{full['time_s']:.2f} s")
        reference_packed = packed_reference()
        rows = []
        for sp_size in SP_SIZES:
            _spawn(ring_worker, sp_size, (sp_size, seq_len, free_port(), tmp))
            ranks = [torch.load(Path(tmp) / f"ring{sp_size}_rank{r}.pt") for r in range(sp_size)]
            layout = SequenceLayout(seq_len, sp_size)
            row = {
                "sp_size": sp_size,
                "max_abs_error": max_error([r["tensors"] for r in ranks], layout, full["tensors"]),
                "max_abs_error_packed": max_error(
                    [r["packed"] for r in ranks], SequenceLayout(PACKED_SEQ_LEN, sp_size), reference_packed
                ),
                "peak_mib_per_rank": [round(r["peak_mib"], 1) for r in ranks],
                "memory_ratio": sp_size * max(r["peak_mib"] for r in ranks) / full["peak_mib"],
                "memory_ratio_forward": sp_size * max(r["forward_peak_mib"] for r in ranks) / full["forward_peak_mib"],
                "imbalance_zigzag": imbalance(layout, [[seq_len]]),
                "imbalance_contiguous": imbalance(SequenceLayout(seq_len, sp_size, "contiguous"), [[seq_len]]),
                "imbalance_zigzag_packed": imbalance(SequenceLayout(PACKED_SEQ_LEN, sp_size), PACKED_DOC_LENS),
                "time_ring_s": max(r["time_s"] for r in ranks),
                "time_ratio": max(r["time_s"] for r in ranks) / full["time_s"],
            }
            rows.append(row)
            print(
                f"P={sp_size}: max abs error {row['max_abs_error']:.1e} (packed documents "
                f"{row['max_abs_error_packed']:.1e}); peak per rank {row['peak_mib_per_rank']} MiB, "
                f"x P / full = {row['memory_ratio']:.2f} (forward only {row['memory_ratio_forward']:.2f}); "
                f"causal work max/mean zigzag {row['imbalance_zigzag']:.3f} vs contiguous "
                f"{row['imbalance_contiguous']:.3f}; time {row['time_ring_s']:.2f} s "
                f"= {row['time_ratio']:.2f} x full"
            )
    summary = {
        "benchmark": "ring_attention",
        "quick": args.quick,
        "shape": {"seq_len": seq_len, "batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "dtype": "float32", "device": "cpu", "packed_seq_len": PACKED_SEQ_LEN},
        "full_peak_mib": round(full["peak_mib"], 1),
        "full_time_s": full["time_s"],
        "results": rows,
        "targets": TARGETS,
        "meets_targets": all(
            row["memory_ratio"] <= TARGETS["memory_ratio"] and row["imbalance_zigzag"] <= TARGETS["imbalance_zigzag"]
            for row in rows
        ),
    }
    emit_summary(summary, args.out)


if __name__ == "__main__":
    main()
