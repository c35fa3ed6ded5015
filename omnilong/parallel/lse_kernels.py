"""PyTorch's own attention kernels that return the log-sum-exp, behind one forward/backward pair.

Ring attention computes softmax(q k^T * scale) v block by block and merges the blocks by their
log-sum-exp, so it needs kernels that return it and whose backward accepts the *merged* output
and log-sum-exp (the flash backward recomputes each block's probabilities from them). These are
ATen's private SDPA ops:
- CPU: the flash kernel (GQA native); the reference the tests hold every other path to.
- CUDA, fp16/bf16 with a head dim the flash kernel takes: the flash kernel (FlashAttention-2),
  which reads grouped K/V heads as they are (no repeated copy) and sums their gradients itself.
- CUDA otherwise (fp32, odd head dims): the memory-efficient kernel, K/V heads repeated for it
  and their gradients summed back.
`cuda_kernel` names the choice; benchmarks/gpu_suite.py checks both against SDPA on a GPU.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten
# The CUDA efficient kernel pads its log-sum-exp to a multiple of this many queries.
_EFFICIENT_LSE_ALIGN = 32
# FlashAttention-2 in PyTorch: half precision, head dims up to 256 in multiples of 8.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs and log-sum-exps accumulate in float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def cuda_kernel(dtype: torch.dtype, head_dim: int) -> str:
    """"flash" or "efficient": the fastest of PyTorch's CUDA kernels with log-sum-exp that fits."""
    if dtype in _FLASH_DTYPES and head_dim % 8 == 0 and head_dim <= _FLASH_MAX_HEAD_DIM:
        return "flash"
    return "efficient"


def attention_forward(
    q_BHQD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, *, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Q, D], lse [B, H, Q] in `accumulator_dtype`); causal is top-left aligned (Q = S)."""
    if q_BHQD.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q_BHQD, k_BKSD, v_BKSD, 0.0, causal, scale=scale)
    if q_BHQD.device.type == "cuda":
        if cuda_kernel(q_BHQD.dtype, q_BHQD.shape[-1]) == "flash":
            out, lse, *_ = aten._scaled_dot_product_flash_attention(q_BHQD, k_BKSD, v_BKSD, 0.0, causal, scale=scale)
            return out, lse
        groups = q_BHQD.shape[1] // k_BKSD.shape[1]
        out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
            q_BHQD, _repeat_heads(k_BKSD, groups), _repeat_heads(v_BKSD, groups), None, True, 0.0, causal, scale=scale
        )
        return out, lse[..., : q_BHQD.shape[2]]
    raise NotImplementedError(f"ring attention (torch backend): no attention kernel for device {q_BHQD.device}")


def attention_backward(
    dout_BHQD: torch.Tensor,
    q_BHQD: torch.Tensor,
    k_BKSD: torch.Tensor,
    v_BKSD: torch.Tensor,
    out_BHQD: torch.Tensor,
    lse_BHQ: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block, given the merged output and log-sum-exp of its query rows."""
    if q_BHQD.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_BHQD, q_BHQD, k_BKSD, v_BKSD, out_BHQD, lse_BHQ.contiguous(), 0.0, causal, scale=scale
        )
    if q_BHQD.device.type == "cuda":
        if cuda_kernel(q_BHQD.dtype, q_BHQD.shape[-1]) == "flash":
            return _flash_backward(dout_BHQD, q_BHQD, k_BKSD, v_BKSD, out_BHQD, lse_BHQ, causal=causal, scale=scale)
        return _efficient_backward(dout_BHQD, q_BHQD, k_BKSD, v_BKSD, out_BHQD, lse_BHQ, causal=causal, scale=scale)
    raise NotImplementedError(f"ring attention (torch backend): no attention kernel for device {q_BHQD.device}")


def _flash_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    # Without dropout the flash backward reads no random state (empty seed/offset); no cumulative
    # lengths: a dense batch, not the variable-length layout.
    no_rng = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2],
        0.0, causal, no_rng, no_rng, scale=scale,
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
