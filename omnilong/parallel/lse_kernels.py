"""PyTorch's own attention kernels that return the log-sum-exp, behind one forward/backward pair.

Ring attention computes softmax(q k^T * scale) v block by block and merges the blocks by their
log-sum-exp, so it needs kernels that return it and whose backward accepts the *merged* output
and log-sum-exp (the flash backward recomputes each block's probabilities from them). These are
ATen's private SDPA ops:
- CPU: the flash kernel (GQA native), one call per document; the reference the tests hold every
  other path to.
- CUDA, fp16/bf16 with a head dim the kernels take: cuDNN's kernel on Hopper and later, the flash
  kernel (FlashAttention-2) before; both read grouped K/V heads as they are (no repeated copy)
  and sum their gradients themselves. The documents of a diagonal block go to the flash
  kernel's variable-length form in one call.
- CUDA otherwise (fp32, odd head dims): the memory-efficient kernel, one call per document, K/V
  heads repeated for it and their gradients summed back.
`cuda_kernel` names the choice; benchmarks/gpu_suite.py checks each against SDPA on a GPU.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten
# The CUDA efficient kernel pads its log-sum-exp to a multiple of this many queries.
_EFFICIENT_LSE_ALIGN = 32
# FlashAttention-2 in PyTorch: half precision, head dims up to 256 in multiples of 8.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256
_CUDNN_MAX_HEAD_DIM = 128


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs and log-sum-exps accumulate in float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def cuda_kernel(q_BHQD: torch.Tensor) -> str:
    """The fastest of PyTorch's CUDA kernels with log-sum-exp that takes a dense block of `q`'s
    dtype and head dim: "cudnn" on Hopper and later (its kernel uses Hopper's own instructions:
    1.6x the flash kernel's rate on an H200, benchmarks/RESULTS.md), "flash" (FlashAttention-2)
    on earlier GPUs, both in half precision; "efficient" otherwise (fp32, odd head dims)."""
    head_dim = q_BHQD.shape[-1]
    if not _flash_fits(q_BHQD):
        return "efficient"
    if (head_dim <= _CUDNN_MAX_HEAD_DIM and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q_BHQD.device) >= (9, 0)):
        return "cudnn"
    return "flash"


def _flash_fits(q_BHQD: torch.Tensor) -> bool:
    head_dim = q_BHQD.shape[-1]
    return q_BHQD.dtype in _FLASH_DTYPES and head_dim % 8 == 0 and head_dim <= _FLASH_MAX_HEAD_DIM


def attention_forward(
    q_BHQD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, *, segments: tuple[int, ...] | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Q, D], lse [B, H, Q] in `accumulator_dtype`) of one block of the ring.

    `segments` None: every query attends every key (a rectangle). A tuple: queries and keys are
    the same tokens (Q = S), tiled by documents of these lengths, each attending causally to
    itself alone: on CUDA in half precision one variable-length flash call for all of them,
    elsewhere one call per document.
    """
    if q_BHQD.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"ring attention (torch backend): no attention kernel for device {q_BHQD.device}")
    if segments is None or len(segments) == 1:
        return _dense_forward(q_BHQD, k_BKSD, v_BKSD, causal=segments is not None, scale=scale)
    if q_BHQD.device.type == "cuda" and _flash_fits(q_BHQD):
        return _varlen_forward(q_BHQD, k_BKSD, v_BKSD, segments, scale=scale)
    batch, heads, queries, _ = q_BHQD.shape
    out = torch.empty_like(q_BHQD)
    lse = q_BHQD.new_empty(batch, heads, queries, dtype=accumulator_dtype(q_BHQD.dtype))
    for piece in _pieces(segments):
        out[:, :, piece], lse[:, :, piece] = _dense_forward(
            q_BHQD[:, :, piece], k_BKSD[:, :, piece], v_BKSD[:, :, piece], causal=True, scale=scale)
    return out, lse


def attention_backward(
    dout_BHQD: torch.Tensor,
    q_BHQD: torch.Tensor,
    k_BKSD: torch.Tensor,
    v_BKSD: torch.Tensor,
    out_BHQD: torch.Tensor,
    lse_BHQ: torch.Tensor,
    *,
    segments: tuple[int, ...] | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block (`segments` as in `attention_forward`), given the merged output
    and log-sum-exp of its query rows."""
    if segments is None or len(segments) == 1:
        return _dense_backward(dout_BHQD, q_BHQD, k_BKSD, v_BKSD, out_BHQD, lse_BHQ,
                               causal=segments is not None, scale=scale)
    if q_BHQD.device.type == "cuda" and _flash_fits(q_BHQD):
        return _varlen_backward(dout_BHQD, q_BHQD, k_BKSD, v_BKSD, out_BHQD, lse_BHQ, segments, scale=scale)
    dq, dk, dv = torch.empty_like(q_BHQD), torch.empty_like(k_BKSD), torch.empty_like(v_BKSD)
    for piece in _pieces(segments):
        dq[:, :, piece], dk[:, :, piece], dv[:, :, piece] = _dense_backward(
            dout_BHQD[:, :, piece], q_BHQD[:, :, piece], k_BKSD[:, :, piece], v_BKSD[:, :, piece],
            out_BHQD[:, :, piece], lse_BHQ[:, :, piece], causal=True, scale=scale)
    return dq, dk, dv


def _pieces(segments: tuple[int, ...]) -> list[slice]:
    bounds = [0]
    for length in segments:
        bounds.append(bounds[-1] + length)
    return [slice(start, end) for start, end in zip(bounds[:-1], bounds[1:])]


def _dense_forward(q_BHQD, k_BKSD, v_BKSD, *, causal: bool, scale: float):
    """One rectangle or one causal square (top-left aligned, Q = S)."""
    if q_BHQD.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q_BHQD, k_BKSD, v_BKSD, 0.0, causal, scale=scale)
    kernel = cuda_kernel(q_BHQD)
    if kernel == "cudnn":
        out, lse_BHQ1, *_ = aten._scaled_dot_product_cudnn_attention(
            q_BHQD, k_BKSD, v_BKSD, None, True, 0.0, causal, False, scale=scale)
        return out, lse_BHQ1.squeeze(-1)
    if kernel == "flash":
        out, lse, *_ = aten._scaled_dot_product_flash_attention(q_BHQD, k_BKSD, v_BKSD, 0.0, causal, scale=scale)
        return out, lse
    groups = q_BHQD.shape[1] // k_BKSD.shape[1]
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
        q_BHQD, _repeat_heads(k_BKSD, groups), _repeat_heads(v_BKSD, groups), None, True, 0.0, causal, scale=scale
    )
    return out, lse[..., : q_BHQD.shape[2]]


def _dense_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.contiguous(), 0.0, causal, scale=scale
        )
    kernel = cuda_kernel(q)
    if kernel == "cudnn":
        return _cudnn_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    if kernel == "flash":
        return _flash_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    return _efficient_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)


def _tokens_first(x_BHQD: torch.Tensor) -> torch.Tensor:
    """[B, H, Q, D] -> [B * Q, H, D], the variable-length kernels' layout (a view when B = 1 and
    the tensor is a slice of transformers' [B, S, H, D] memory)."""
    batch, heads, queries, head_dim = x_BHQD.shape
    return x_BHQD.transpose(1, 2).reshape(batch * queries, heads, head_dim)


def _heads_first(x_TKD: torch.Tensor, batch: int) -> torch.Tensor:
    return x_TKD.unflatten(0, (batch, -1)).transpose(1, 2)


def _cumulative_lengths(segments: tuple[int, ...], batch: int, device: torch.device) -> torch.Tensor:
    """Start of each document in the [B * Q] token layout, then the end: every row is tiled alike."""
    lengths = torch.tensor(segments * batch, dtype=torch.int32)
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32)]).to(device)


def _varlen_forward(q_BHQD, k_BKSD, v_BKSD, segments: tuple[int, ...], *, scale: float):
    batch = q_BHQD.shape[0]
    bounds = _cumulative_lengths(segments, batch, q_BHQD.device)
    longest = max(segments)
    out_TKD, lse_HT, *_ = aten._flash_attention_forward(
        _tokens_first(q_BHQD), _tokens_first(k_BKSD), _tokens_first(v_BKSD), bounds, bounds, longest, longest,
        0.0, True, False, scale=scale,
    )
    # The variable-length kernel's log-sum-exp is [H, B * Q] (benchmarks/gpu_suite.py, kernel_probe).
    return _heads_first(out_TKD, batch), lse_HT.unflatten(1, (batch, -1)).transpose(0, 1)


def _varlen_backward(dout, q, k, v, out, lse_BHQ, segments: tuple[int, ...], *, scale: float):
    batch = q.shape[0]
    bounds = _cumulative_lengths(segments, batch, q.device)
    longest = max(segments)
    no_rng = torch.empty((), dtype=torch.int64, device=q.device)  # no dropout: no random state read
    dq, dk, dv = aten._flash_attention_backward(
        _tokens_first(dout), _tokens_first(q), _tokens_first(k), _tokens_first(v), _tokens_first(out),
        lse_BHQ.transpose(0, 1).reshape(lse_BHQ.shape[1], -1).contiguous(), bounds, bounds, longest, longest,
        0.0, True, no_rng, no_rng, scale=scale,
    )
    return _heads_first(dq, batch), _heads_first(dk, batch), _heads_first(dv, batch)


def _flash_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    # Without dropout the flash backward reads no random state (empty seed/offset); no cumulative
    # lengths: a dense batch, not the variable-length layout.
    no_rng = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2],
        0.0, causal, no_rng, no_rng, scale=scale,
    )
    return dq, dk, dv


def _cudnn_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    # As for flash: no dropout, so no random state is read; a dense batch, no cumulative lengths.
    no_rng = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.contiguous().unsqueeze(-1), no_rng, no_rng, None, None, None, q.shape[2], k.shape[2],
        0.0, causal, scale=scale,
    )
    return dq, dk, dv


def _efficient_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    batch, heads, queries, _ = q.shape
    groups = heads // k.shape[1]
    padded = -(-queries // _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN
    lse_padded = lse.new_zeros(batch, heads, padded)
    lse_padded[..., :queries] = lse
    no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, _repeat_heads(k, groups), _repeat_heads(v, groups), None, out, lse_padded,
        no_dropout, no_dropout, 0.0, [True, True, True, False], causal, scale=scale,
    )
    return dq, _sum_heads(dk, groups), _sum_heads(dv, groups)


def _repeat_heads(x_BKSD: torch.Tensor, groups: int) -> torch.Tensor:
    return x_BKSD if groups == 1 else x_BKSD.repeat_interleave(groups, dim=1)


def _sum_heads(grad_BHSD: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return grad_BHSD
    return grad_BHSD.unflatten(1, (grad_BHSD.shape[1] // groups, groups)).sum(2)
