"""`python -m benchmarks.gpu_suite --out DIR`: a lent GPU's few minutes turned into recorded figures.

One command, every part timed and guarded (a failing part records its error; the others still
run), one JSON line per part on stdout and in DIR/gpu_suite.jsonl, then a summary line:

- `environment`: torch, CUDA, the device, the packages the parts use;
- `matmul_peak`: the bf16 dense-matmul rate measured on this machine (MFU's denominator);
- `ring_attention`: the torch ring backend's kernels against PyTorch SDPA: out/dq/dk/dv in fp32
  and bf16 on packed documents with grouped K/V heads, at P = 1 and the block plans of P = 2
  and 4 replayed in one process (benchmarks/ring_replay.py); then time and peak memory of one
  forward+backward against SDPA's flash kernel (`sdpa`) and SDPA's own choice (`sdpa_any`: cuDNN
  on Hopper when it takes the shapes) on one causal document, 8K-128K tokens, and on a packed
  row of 64 documents (SDPA once per document);
- `kernel_probe`: the variable-length flash and the cuDNN kernels on packed documents (CUDA);
- `chunked_loss`: our chunked loss at Qwen2.5-7B's head (H 3,584, V 152,064) in bf16 against the
  full-logits loss transformers computes (and Liger's and Cut Cross-Entropy's fused losses when
  importable), 16K-128K tokens: peak memory and time, `oom` where one does not fit;
- `zero3_step`: the stage runner under torchrun on one rank (NCCL, DeepSpeed ZeRO-3, tracking
  off) training the bundle's tiny model on its packed rows (make gpu-bundle);
- `training_step`: a Qwen2.5-7B-shaped language model cut to a few layers, LoRA, bf16, built on
  the GPU, one training step through our path (ring attention at P = 1, chunked loss,
  activation checkpointing) at 32K-128K tokens: tokens/s, MFU and peak memory per length;
- `context_memory`: benchmarks/context_memory.py (memory per token against the floor the shapes
  force, the longest trainable length extrapolated to 28 layers) at the settings above.

MFU counts 6N FLOPs per token for trained weights and 4N for frozen ones (N: the decoder
layers' and the LM head's matmul weights; LoRA's own weights are trained), plus causal attention
6 * layers * S * d_model per token (2 S d forward, 4 S d backward, after halving for causality);
recompute is not counted. It is given against the measured bf16 peak and the 989 TFLOP/s spec.

`--quick --device cpu` runs every part at toy sizes (tests/test_gpu_suite.py), so the suite
cannot rot between GPU loans.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.measure import PeakMemory, free_port, release, sync
from benchmarks.model_shapes import QWEN2_5_7B, TOY, decoder_config

H200_BF16_SPEC_TFLOPS = 989.0
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """What each part runs at: the GPU figures, or toy shapes for `--quick`."""

    matmul_n: int
    attn_heads: tuple[int, int, int]  # query heads, K/V heads, head dim
    attn_check_len: int
    attn_doc_lens: tuple[int, ...]
    attn_replay_len: int
    attn_time_lens: tuple[int, ...]
    attn_packed_case: tuple[int, int]  # a packed row's length and its number of equal documents
    loss_hidden_vocab: tuple[int, int]
    loss_lens: tuple[int, ...]
    model_shapes: dict
    model_layers: int
    model_lens: tuple[int, ...]


GPU_SIZES = Sizes(
    matmul_n=8192,
    attn_heads=(28, 4, 128),
    attn_check_len=8192,
    attn_doc_lens=(4096, 2048, 1024, 512, 300),
    attn_replay_len=8192,
    attn_time_lens=(8192, 32768, 131072),
    attn_packed_case=(32768, 64),
    loss_hidden_vocab=(3584, 152064),
    loss_lens=(16384, 32768, 65536, 131072),
    model_shapes=QWEN2_5_7B,
    model_layers=4,
    model_lens=(32768, 65536, 131072),
)
QUICK_SIZES = Sizes(
    matmul_n=256,
    attn_heads=(4, 2, 16),
    attn_check_len=256,
    attn_doc_lens=(128, 64, 40),
    attn_replay_len=256,
    attn_time_lens=(256, 512),
    attn_packed_case=(512, 8),
    loss_hidden_vocab=(64, 1000),
    loss_lens=(256, 512),
    model_shapes=TOY,
    model_layers=2,
    model_lens=(256, 512),
)
# Stated tolerances of the ring's out/dq/dk/dv against SDPA computed in float64 from the same inputs.
# Ring attention's out/dq/dk/dv against per-document SDPA in float64 from the same inputs:
# `torch.testing.assert_close` with rtol, and atol as this fraction of the largest |expected|
# (gradients summed over 7 query heads per K/V head reach tens; an absolute atol would not scale).
TOLERANCES = {torch.float32: {"rtol": 1e-4, "atol_of_max": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol_of_max": 1e-2}}
# The chunked loss in bf16 against float64: max error over max value of loss and gradients.
LOSS_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Context:
    device: torch.device
    sizes: Sizes
    out: Path
    bundle: Path


def _timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> tuple[float, int]:
    """(median seconds of `fn` after one warm-up call, peak memory bytes of one call)."""
    meter = PeakMemory(device)
    fn()
    sync(device)
    meter.reset()
    fn()
    sync(device)
    peak = meter.peak_above_baseline()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2], peak


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------- parts

def part_environment(ctx: Context) -> dict:
    import importlib.metadata

    versions = {}
    for name in ("transformers", "deepspeed", "pydantic", "peft", "triton", "liger-kernel", "cut-cross-entropy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0], **versions}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


def part_matmul_peak(ctx: Context) -> dict:
    n = ctx.sizes.matmul_n
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    seconds, _ = _timed(lambda: a @ b, ctx.device, repeats=10)
    return {"n": n, "dtype": str(dtype), "seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12}


def _attention_reference(q, k, v, doc_lens, dout):
    """Per-document causal SDPA in float64 (public API, GQA by `enable_gqa`): out, dq, dk, dv."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    seq_len, outs, start = q.shape[2], [], 0
    for n in [*doc_lens, seq_len - sum(doc_lens)]:  # the padding after the documents is its own block
        if n:
            piece = slice(start, start + n)
            outs.append(F.scaled_dot_product_attention(q[:, :, piece], k[:, :, piece], v[:, :, piece],
                                                       is_causal=True, enable_gqa=True))
            start += n
    out = torch.cat(outs, dim=2)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def part_ring_attention(ctx: Context) -> dict:
    from benchmarks.ring_replay import replayed_ring_attention
    from omnilong.parallel.lse_kernels import cuda_kernel

    heads, kv_heads, head_dim = ctx.sizes.attn_heads
    scale = head_dim**-0.5
    generator = torch.Generator(device=ctx.device).manual_seed(0)

    def inputs(seq_len: int, dtype: torch.dtype):
        def rand(h):
            return torch.randn(1, seq_len, h, head_dim, device=ctx.device, dtype=dtype, generator=generator).transpose(1, 2)
        return rand(heads), rand(kv_heads), rand(kv_heads), rand(heads)

    checks, failures = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for sp_size, seq_len in ((1, ctx.sizes.attn_check_len), (2, ctx.sizes.attn_replay_len), (4, ctx.sizes.attn_replay_len)):
            doc_lens = list(ctx.sizes.attn_doc_lens)
            q, k, v, dout = inputs(seq_len, dtype)
            got = replayed_ring_attention(q, k, v, dout, [doc_lens], sp_size, scale)
            expected = _attention_reference(q, k, v, doc_lens, dout)
            record = {"dtype": str(dtype).removeprefix("torch."), "sp_size": sp_size, "seq_len": seq_len,
                      "kernel": cuda_kernel(q) if ctx.device.type == "cuda" else "cpu_flash"}
            for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
                record[f"rel_err_{name}"] = _relative_error(g, e)
                tolerance = TOLERANCES[dtype]
                try:
                    torch.testing.assert_close(g.double(), e, rtol=tolerance["rtol"],
                                               atol=tolerance["atol_of_max"] * float(e.abs().max()))
                except AssertionError as exc:
                    failures.append(f"{record['dtype']} P={sp_size} {name}: {str(exc).splitlines()[0]}")
            checks.append(record)
            del got, expected, q, k, v, dout
            release(ctx.device)
    timings = _ring_timings(ctx, inputs, scale)
    return {"heads": [heads, kv_heads, head_dim], "tolerances": {str(k).removeprefix("torch."): v for k, v in TOLERANCES.items()},
            "checks": checks, "check_failures": failures, "ok": not failures, "timings": timings}


def _ring_timings(ctx: Context, inputs, scale: float) -> list[dict]:
    """Ring (P = 1) against SDPA, forward + backward: one causal document of each length (SDPA's
    flash kernel, and SDPA's own choice), then a packed row of equal documents (SDPA called once
    per document, as a packed row needs without a variable-length kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from omnilong.parallel.documents import DocumentLayout
    from omnilong.parallel.ring_attention_torch import torch_ring_attention
    from omnilong.parallel.zigzag import SequenceLayout

    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    cases = [(seq_len, 1) for seq_len in ctx.sizes.attn_time_lens] + [ctx.sizes.attn_packed_case]
    rows = []
    for seq_len, num_docs in cases:
        row = {"seq_len": seq_len, "documents": num_docs, "dtype": str(dtype).removeprefix("torch.")}
        q, k, v, dout = inputs(seq_len, dtype)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        doc_len = seq_len // num_docs
        documents = DocumentLayout(SequenceLayout(seq_len, 1), 0, [[doc_len] * num_docs])

        def ours():
            torch.autograd.backward(torch_ring_attention(q, k, v, documents, None, scale), dout)

        def sdpa(backends):
            def call():
                with sdpa_kernel(backends):
                    outs = [F.scaled_dot_product_attention(q[:, :, piece], k[:, :, piece], v[:, :, piece],
                                                           is_causal=True, scale=scale, enable_gqa=True)
                            for piece in (slice(i * doc_len, (i + 1) * doc_len) for i in range(num_docs))]
                torch.autograd.backward(outs, [dout[:, :, i * doc_len:(i + 1) * doc_len] for i in range(num_docs)])
            return call

        variants = (("ours", ours), ("sdpa", sdpa([SDPBackend.FLASH_ATTENTION])),
                    ("sdpa_any", sdpa(list(SDPBackend.__members__.values()))))
        for name, fn in variants:
            try:
                seconds, peak = _timed(fn, ctx.device)
                row[f"{name}_seconds"], row[f"{name}_peak_mib"] = seconds, peak / 2**20
                # causal forward 2 * 2 * (S^2 / 2) * D * H per document, backward 2.5x that
                row[f"{name}_tflops"] = 3.5 * 2 * doc_len**2 * num_docs * q.shape[-1] * q.shape[1] / seconds / 1e12
            except Exception as exc:  # noqa: BLE001  (an OOM or a kernel refusal is a figure too)
                row[f"{name}_error"] = "oom" if _is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:300]}"
            q.grad = k.grad = v.grad = None
            release(ctx.device)
        for baseline in ("sdpa", "sdpa_any"):
            if "ours_seconds" in row and f"{baseline}_seconds" in row:
                row[f"time_ratio_ours_over_{baseline}"] = row["ours_seconds"] / row[f"{baseline}_seconds"]
                row[f"memory_ratio_ours_over_{baseline}"] = row["ours_peak_mib"] / max(row[f"{baseline}_peak_mib"], 1e-9)
        rows.append(row)
        q = k = v = dout = None  # freed before the next case's inputs
        release(ctx.device)
    return rows


def part_kernel_probe(ctx: Context) -> dict:
    """PyTorch's CUDA attention kernels the ring does not use yet, on packed documents with
    grouped K/V heads in bf16: their log-sum-exp layout and error against SDPA in float64,
    forward and backward. `varlen_flash`: the variable-length flash kernel (every document in
    one call); `cudnn`: the cuDNN kernel (Hopper's own instructions), on one causal document."""
    if ctx.device.type != "cuda":
        return {"skipped": "these kernels exist on CUDA only"}
    heads, kv_heads, head_dim = ctx.sizes.attn_heads
    doc_lens = list(ctx.sizes.attn_doc_lens)
    total, scale = sum(doc_lens), head_dim**-0.5
    generator = torch.Generator(device=ctx.device).manual_seed(1)
    q, k, v, dout = (torch.randn(total, h, head_dim, device=ctx.device, dtype=torch.bfloat16, generator=generator)
                     for h in (heads, kv_heads, kv_heads, heads))
    as_bhsd = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v, dout)]
    results = {"doc_lens": doc_lens, "heads": [heads, kv_heads, head_dim]}

    def errors(got, expected):
        return {f"rel_err_{name}": _relative_error(g, e) for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected)}

    def varlen_flash():
        bounds = torch.tensor([0, *torch.tensor(doc_lens).cumsum(0).tolist()], dtype=torch.int32, device=ctx.device)
        longest = max(doc_lens)
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, bounds, bounds, longest, longest, 0.0, True, False, scale=scale)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, bounds, bounds, longest, longest, 0.0, True, rng_state, unused, scale=scale)
        got = [t.transpose(0, 1).unsqueeze(0) for t in (out, dq, dk, dv)]
        return {"lse_shape": list(lse.shape), **errors(got, _attention_reference(*as_bhsd[:3], doc_lens, as_bhsd[3]))}

    def cudnn():
        n = doc_lens[0]
        qd, kd, vd, doutd = (t[:, :, :n] for t in as_bhsd)
        record = {}
        for label, (kk, vv) in (("gqa", (kd, vd)), ("repeated_heads", (kd.repeat_interleave(heads // kv_heads, 1),
                                                                       vd.repeat_interleave(heads // kv_heads, 1)))):
            try:
                out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    qd, kk, vv, None, True, 0.0, True, False, scale=scale)
                dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                    doutd, qd, kk, vv, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)
                if kk.shape[1] != kv_heads:
                    dk, dv = (g.unflatten(1, (kv_heads, heads // kv_heads)).sum(2) for g in (dk, dv))
                record[label] = {"lse_shape": list(lse.shape), "lse_dtype": str(lse.dtype),
                                 **errors((out, dq, dk, dv), _attention_reference(qd, kd, vd, [n], doutd))}
            except Exception as exc:  # noqa: BLE001
                record[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        return record

    for name, probe in (("varlen_flash", varlen_flash), ("cudnn", cudnn)):
        try:
            results[name] = probe()
        except Exception as exc:  # noqa: BLE001
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        release(ctx.device)
    return results


def part_chunked_loss(ctx: Context) -> dict:
    from omnilong.loss import linear_cross_entropy

    hidden_size, vocab = ctx.sizes.loss_hidden_vocab
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, device=ctx.device, dtype=dtype, generator=generator) * 0.02).requires_grad_()
    impls: dict[str, Callable] = {
        "ours": lambda h, y, weight=weight: linear_cross_entropy(h, weight, y)[0],
        # What transformers' ForCausalLMLoss does: full logits, upcast to float32 (summed here).
        "naive": lambda h, y, weight=weight: F.cross_entropy((h @ weight.T).float(), y, reduction="sum"),
    }
    carried = {}
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction)
        impls["liger"] = lambda h, y, weight=weight: LigerFusedLinearCrossEntropyFunction.apply(
            h, weight, y, None, None, -100, 0.0, 0.0, "sum")[0]
        carried["liger"] = True
    except Exception as exc:  # noqa: BLE001
        carried["liger"] = f"not importable: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["cce"] = lambda h, y, weight=weight: cce(h, weight, y, reduction="sum")
        carried["cce"] = True
    except Exception as exc:  # noqa: BLE001
        carried["cce"] = f"not importable: {type(exc).__name__}: {str(exc)[:200]}"
    rows = []
    for tokens in ctx.sizes.loss_lens:
        hidden = torch.randn(tokens, hidden_size, device=ctx.device, dtype=dtype, generator=generator).requires_grad_()
        labels = torch.randint(0, vocab, (tokens,), device=ctx.device, generator=generator)
        row: dict = {"tokens": tokens}
        if tokens == ctx.sizes.loss_lens[0]:
            row["accuracy"] = _loss_accuracy(impls, hidden, labels, weight)
        for name, impl in impls.items():
            def step():
                impl(hidden, labels).backward()
            try:
                seconds, peak = _timed(step, ctx.device, repeats=2)
                row[f"{name}_seconds"], row[f"{name}_peak_mib"] = seconds, peak / 2**20
            except Exception as exc:  # noqa: BLE001
                row[f"{name}_error"] = "oom" if _is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:300]}"
            hidden.grad = weight.grad = None
            release(ctx.device)
        for name in impls:
            if name != "ours" and f"{name}_seconds" in row and "ours_seconds" in row:
                row[f"memory_ratio_{name}_over_ours"] = row[f"{name}_peak_mib"] / row["ours_peak_mib"]
                row[f"time_ratio_ours_over_{name}"] = row["ours_seconds"] / row[f"{name}_seconds"]
        rows.append(row)
        hidden = labels = None  # freed before the next length's inputs
        release(ctx.device)
    accuracy = rows[0]["accuracy"]
    return {"hidden": hidden_size, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."), "carried": carried,
            "rows": rows, "ok": all(err <= LOSS_TOLERANCE for err in accuracy["ours"].values())}


def _loss_accuracy(impls: dict, hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> dict:
    """Each loss's sum, hidden and weight gradients against the full-logits loss in float64
    (max absolute error over max absolute value)."""
    def run(impl, dtype):
        h, w = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
        loss = impl(h, labels, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    hidden, labels = hidden[:4096], labels[:4096]  # enough rows; the float64 logits stay a few GB
    expected = run(lambda h, y, w: F.cross_entropy(h @ w.T, y, reduction="sum"), torch.float64)
    report = {}
    for name, impl in impls.items():
        got = run(lambda h, y, w, impl=impl: impl(h, y, weight=w), hidden.dtype)
        report[name] = {part: _relative_error(g, e) for part, g, e in zip(("loss", "grad_hidden", "grad_weight"), got, expected)}
        release(hidden.device)
    return report


def part_zero3_step(ctx: Context) -> dict:
    project = ctx.bundle / "project"
    if not (project / "params.yaml").is_file():
        raise FileNotFoundError(f"{project / 'params.yaml'}: no bundle project; run `make gpu-bundle` first")
    import yaml

    model_dir = yaml.safe_load((project / "params.yaml").read_text())["model"]["path"]
    work = Path(tempfile.mkdtemp(prefix="zero3_step_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
               "-m", "omnilong.train.runner", "--stage", "stage1", "--params", "params.yaml",
               "--init", model_dir, "--out", str(work / "out"), "--checkpoints", str(work / "checkpoints")]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=240)
    step_lines = [line for line in result.stdout.splitlines() if "] step " in line]
    record = {"returncode": result.returncode, "seconds": time.perf_counter() - started, "step_lines": step_lines,
              "exported": (work / "out" / "model" / "model.safetensors").is_file()}
    if result.returncode != 0:
        record["stderr_tail"] = result.stderr[-3000:]
    record["ok"] = result.returncode == 0 and record["exported"]
    return record


def _matmul_weights(model) -> tuple[int, int]:
    """(trained, frozen) weights of the decoder layers' and LM head's matmuls."""
    trained = frozen = 0
    for name, param in model.named_parameters():
        if param.dim() != 2 or "visual" in name or "embed_tokens" in name:
            continue
        if "layers." in name or "lm_head" in name:
            if param.requires_grad:
                trained += param.numel()
            else:
                frozen += param.numel()
    return trained, frozen


def part_training_step(ctx: Context, peak_tflops: float | None) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from omnilong.config import LoraParams, LossParams
    from omnilong.parallel.documents import DocumentLayout
    from omnilong.parallel.hf_adapter import register_ring_attention, ring_attention_context
    from omnilong.parallel.zigzag import SequenceLayout
    from omnilong.train.lora import add_lora
    from omnilong.train.training_module import TrainingModule, language_model_positions

    layers = ctx.sizes.model_layers
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    config = decoder_config(ctx.sizes.model_shapes, layers)
    torch.manual_seed(0)
    with ctx.device:  # initialised where it trains: the weights never exist on the host
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.set_attn_implementation(register_ring_attention())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, LoraParams())
    module = TrainingModule(model, "qwen2_5_vl", LossParams())
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    trained, frozen = _matmul_weights(module)
    hidden = config.text_config.hidden_size
    rows = []
    for seq_len in ctx.sizes.model_lens:
        row: dict = {"seq_len": seq_len}
        input_ids = torch.randint(0, config.text_config.vocab_size, (1, seq_len), device=ctx.device)
        labels = torch.roll(input_ids, -1, dims=1)
        labels[:, -1] = -100
        positions = language_model_positions("qwen2_5_vl", torch.arange(seq_len).unsqueeze(0), [[seq_len]]).to(ctx.device)
        documents = DocumentLayout(SequenceLayout(seq_len, 1), 0, [[seq_len]])

        def step():
            with ring_attention_context(documents, None, "torch"):
                loss_sum, count = module(input_ids, labels, positions)
                (loss_sum / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            seconds, peak = _timed(step, ctx.device, repeats=1)
            flops_per_token = 6 * trained + 4 * frozen + 6 * layers * seq_len * hidden
            achieved = flops_per_token * seq_len / seconds / 1e12
            row.update(seconds=seconds, tokens_per_s=seq_len / seconds, peak_mib=peak / 2**20, model_tflops=achieved,
                       mfu_vs_spec=achieved / H200_BF16_SPEC_TFLOPS)
            if peak_tflops:
                row["mfu_vs_measured_peak"] = achieved / peak_tflops
        except Exception as exc:  # noqa: BLE001
            row["error"] = "oom" if _is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        release(ctx.device)
    fits = [r for r in rows if "peak_mib" in r]
    result = {"layers": layers, "dtype": str(dtype).removeprefix("torch."), "finetune": "lora",
              "trained_matmul_weights": trained, "frozen_matmul_weights": frozen, "rows": rows}
    if len(fits) >= 2:
        # Memory grows linearly in tokens; the slope per token, and per token per layer.
        (l0, m0), (l1, m1) = (fits[0]["seq_len"], fits[0]["peak_mib"]), (fits[-1]["seq_len"], fits[-1]["peak_mib"])
        slope_bytes = (m1 - m0) * 2**20 / (l1 - l0)
        result["peak_bytes_per_token"] = slope_bytes
        result["peak_bytes_per_token_per_layer_upper_bound"] = slope_bytes / layers
    return result


PARTS = ("environment", "matmul_peak", "ring_attention", "kernel_probe", "chunked_loss", "zero3_step", "training_step",
         "context_memory")
# On one GPU: Qwen2.5-7B's language model with LoRA in bf16 at 2 and 4 layers, tiled MLPs and
# offloaded checkpoints, lengths that fit the suite's minutes (the benchmark's own default
# reaches 512K); extrapolated by the benchmark to 28 layers and labelled so.
CONTEXT_MEMORY_GPU = ["--shapes", "7b", "--finetune", "lora", "--dtype", "bf16", "--layers", "2,4",
                      "--lengths", "65536,131072", "--naive-lengths", "16384,32768", "--offload-activations",
                      "--train-option", "tiled_mlp.enabled=true"]


def part_context_memory(ctx: Context) -> dict:
    """benchmarks/context_memory.py in its own processes (it starts torchrun); its JSON line."""
    line_file = ctx.out / "context_memory.json"
    args = ["--quick"] if ctx.sizes is QUICK_SIZES else CONTEXT_MEMORY_GPU
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "benchmarks.context_memory", *args, "--out", str(line_file)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return {"ok": False, "returncode": result.returncode, "stderr_tail": result.stderr[-3000:]}
    return {"args": args, "result": json.loads(line_file.read_text())}


def run_suite(ctx: Context, parts: tuple[str, ...]) -> dict:
    ctx.out.mkdir(parents=True, exist_ok=True)
    log = ctx.out / "gpu_suite.jsonl"
    results: dict[str, dict] = {}
    for part in parts:
        started = time.perf_counter()
        try:
            if part == "training_step":
                peak = results.get("matmul_peak", {}).get("tflops") if ctx.device.type == "cuda" else None
                body = part_training_step(ctx, peak)
            else:
                body = globals()[f"part_{part}"](ctx)
            record = {"ok": body.pop("ok", True), **body}
        except Exception as exc:  # noqa: BLE001  (one failing part must not lose the others)
            record = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        record = {"benchmark": "gpu_suite", "part": part, "device": str(ctx.device),
                  "part_seconds": round(time.perf_counter() - started, 2), **record}
        results[part] = record
        line = json.dumps(record, default=str)
        print(line, flush=True)
        with log.open("a") as handle:
            handle.write(line + "\n")
        release(ctx.device)
    summary = {"benchmark": "gpu_suite", "part": "summary", "device": str(ctx.device),
               "ok": {part: results[part]["ok"] for part in parts},
               "seconds": {part: results[part]["part_seconds"] for part in parts}}
    line = json.dumps(summary)
    print(line, flush=True)
    with log.open("a") as handle:
        handle.write(line + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for gpu_suite.jsonl.")
    parser.add_argument("--quick", action="store_true", help="Toy sizes (any device), for the CPU test.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bundle", type=Path, default=REPO / ".gpu-bundle", help="What `make gpu-bundle` wrote.")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"Comma-separated subset of {','.join(PARTS)}.")
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; expected some of {', '.join(PARTS)}")
    ctx = Context(torch.device(args.device), QUICK_SIZES if args.quick else GPU_SIZES, args.out, args.bundle)
    results = run_suite(ctx, parts)
    if not all(record["ok"] for record in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
