"""Chunked linear cross-entropy: the LM head and its loss, `chunk_tokens` rows at a time.

The spec is the naive expression it replaces (`reference.py`), without ever allocating the
[N, V] product or its gradient:

    logits = (hidden @ weight.T + bias).float()                    # [N, V]
    logits = softcap * tanh(logits / softcap)                      # if softcap
    loss_sum = F.cross_entropy(logits, labels, ignore_index=ignore_index,
                               label_smoothing=eps, reduction="sum")
             + z_loss * (logsumexp(logits, -1)[valid] ** 2).sum()

Per valid token, with s its (capped) logits row, lse = logsumexp(s), p = softmax(s), V the vocab:

    loss      = lse - (1 - eps) * s[y] - eps / V * sum_j s[j] + z_loss * lse**2
    dloss/ds  = (1 + 2 * z_loss * lse) * p - (1 - eps) * onehot(y) - eps / V
    ds/dlogit = 1 - (s / softcap)**2

The loss is a scalar, so its upstream gradient is a scalar: the gradients for hidden, weight
and bias are computed in the forward pass, one chunk of logits at a time, and backward only
scales them. The logits are made once (recomputing them in backward would cost a third more
matmul work) and at most one chunk of them, turned in place into its own gradient, exists at
any moment. Only valid tokens are processed: ignored rows cost nothing and get zero gradient.
Low-precision inputs (bf16, fp16) are multiplied in their dtype; the softmax, the loss and the
weight/bias gradients are accumulated in fp32 and cast to the parameter dtype in backward. The
hidden gradient is made in the input dtype before the upstream gradient (a loss scale) is
known: fine for bf16's range; with fp16, its smallest terms may underflow. Backward scales all
three in fp32 by the fp32 upstream gradient and rounds once, so none is biased against the
others by a rounded scale (1 / token count is rarely a bf16 value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP32_BYTES = 4


@dataclass(frozen=True)
class LossOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None


def chunk_bytes_per_token(vocab_size: int, hidden_size: int, dtype: torch.dtype, *, softcap: bool = False) -> int:
    """Workspace one token of a chunk needs in the loop below, in bytes."""
    accum_bytes = max(dtype.itemsize, FP32_BYTES)
    per_token = vocab_size * accum_bytes  # logits row, turned in place into its gradient
    if dtype.itemsize < FP32_BYTES:
        # The low-precision matmul output before its upcast, later the gradient cast back for
        # the hidden-state matmul; never both at once.
        per_token += vocab_size * dtype.itemsize
    if softcap:
        per_token += vocab_size * accum_bytes  # tanh(logits / cap), kept for the cap's derivative
    # Hidden rows gathered and upcast, and their gradient.
    return per_token + hidden_size * (2 * dtype.itemsize + accum_bytes)


def auto_chunk_tokens(
    vocab_size: int, hidden_size: int, dtype: torch.dtype, budget_bytes: int, *, softcap: bool = False
) -> int:
    """The most tokens per chunk whose workspace fits `budget_bytes` (a multiple of 8 from 8 up).

    Beside the chunk workspace, a call holds the gradients it returns, [N, H] in the input dtype
    and [V, H] in the accumulation dtype (fp32 for bf16/fp16 inputs): not a matter of chunk size.
    """
    per_token = chunk_bytes_per_token(vocab_size, hidden_size, dtype, softcap=softcap)
    tokens = budget_bytes // per_token
    if tokens < 1:
        raise ValueError(
            f"memory budget of the chunked loss (loss.memory_budget_mb): expected at least "
            f"{per_token:,} bytes, the workspace of one token at vocab size {vocab_size} in {dtype}, "
            f"given {budget_bytes:,} bytes"
        )
    return tokens if tokens < 8 else tokens - tokens % 8


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """autograd Function behind `linear_cross_entropy(..., impl="chunked")`; see the module docstring."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [N, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        labels: torch.Tensor,  # [N] int64
        chunk_tokens: int,
        options: LossOptions,
        compute_grads: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        needs_hidden, needs_weight, needs_bias = (
            compute_grads and needed for needed in ctx.needs_input_grad[:3]
        )
        accum_dtype = torch.promote_types(hidden.dtype, torch.float32)
        valid_rows = (labels != options.ignore_index).nonzero().squeeze(1)  # [M]

        loss_sum = torch.zeros((), dtype=accum_dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = weight.new_zeros(weight.shape, dtype=accum_dtype) if needs_weight else None
        grad_bias = bias.new_zeros(bias.shape, dtype=accum_dtype) if needs_bias else None
        for start in range(0, valid_rows.numel(), chunk_tokens):
            rows = valid_rows[start : start + chunk_tokens]  # [C]
            hidden_chunk = hidden.index_select(0, rows)  # [C, H]
            targets = labels.index_select(0, rows)[:, None]  # [C, 1]
            logits = hidden_chunk @ weight.T if bias is None else torch.addmm(bias, hidden_chunk, weight.T)
            logits = logits.to(accum_dtype)  # [C, V], the chunk's only vocab-sized buffer
            loss_sum += _loss_rows(logits, targets, options, to_grad=compute_grads).sum()
            if compute_grads:  # logits now holds dloss/dlogits [C, V]
                if needs_bias:
                    grad_bias += logits.sum(0)
                # In the inputs' dtype, as the matmuls of autograd's backward would read it.
                dlogits_low = logits.to(hidden.dtype)
                if needs_weight:
                    _accumulate_weight_grad(grad_weight, logits, dlogits_low, hidden_chunk)
                if needs_hidden:
                    grad_hidden.index_copy_(0, rows, dlogits_low @ weight)
                del dlogits_low
            del logits  # before the next chunk's is allocated

        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.chunk_tokens = chunk_tokens
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        valid_count = torch.tensor(valid_rows.numel(), device=labels.device)
        ctx.mark_non_differentiable(valid_count)
        return loss_sum, valid_count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_count: torch.Tensor | None):
        if ctx.grads is None:
            raise RuntimeError(
                "chunked linear cross-entropy: backward ran twice over one forward; its gradients "
                "are computed in forward and handed over once (retain_graph is not supported)"
            )
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        weight_dtype, bias_dtype = ctx.param_dtypes
        # Weight and bias are scaled in the accumulation dtype before their cast, so a loss scale
        # cannot overflow fp16 there; hidden rows were each made by one matmul in their own dtype.
        if grad_hidden is not None:
            grad_hidden = _scale_rows(grad_hidden, grad_loss, ctx.chunk_tokens)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(grad_loss).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _accumulate_weight_grad(
    grad_weight_VH: torch.Tensor, dlogits_CV: torch.Tensor, dlogits_low_CV: torch.Tensor, hidden_CH: torch.Tensor
) -> None:
    """grad_weight += dlogits.T @ hidden, summed over chunks in `grad_weight`'s float32.

    On CUDA with half-precision inputs the product runs on the tensor cores from `dlogits_low`
    (dlogits in the inputs' dtype) and adds into the float32 sum in the same GEMM (`out_dtype`):
    a float32 GEMM there runs at a tenth of the rate (benchmarks/gpu_suite.py measured the whole
    loss 5x slower than Liger's with it). Elsewhere the float32 GEMM is the accurate choice.
    """
    if hidden_CH.is_cuda and hidden_CH.dtype != grad_weight_VH.dtype:
        torch.addmm(grad_weight_VH, dlogits_low_CV.T, hidden_CH, out_dtype=grad_weight_VH.dtype, out=grad_weight_VH)
    else:
        grad_weight_VH.addmm_(dlogits_CV.T, hidden_CH.to(grad_weight_VH.dtype))


def _scale_rows(grad: torch.Tensor, scale: torch.Tensor, block_rows: int) -> torch.Tensor:
    """`grad *= scale` in place, multiplied in `scale`'s dtype and rounded once to `grad`'s.

    A low-precision `grad` is upcast `block_rows` rows at a time (a chunk's rows: their upcast
    fits the chunk workspace), not whole, which would cost [N, H] in fp32.
    """
    if grad.dtype == scale.dtype:
        return grad.mul_(scale)
    for start in range(0, grad.shape[0], block_rows):
        block = grad[start : start + block_rows]
        block.copy_(block.to(scale.dtype).mul_(scale))
    return grad


def _loss_rows(
    logits: torch.Tensor,  # [C, V] accumulation dtype; overwritten
    targets: torch.Tensor,  # [C, 1]
    options: LossOptions,
    *,
    to_grad: bool,
) -> torch.Tensor:
    """Per-row loss [C]. With `to_grad`, leaves dloss/dlogits in `logits`, else garbage.

    In place, so one [C, V] buffer holds the logits, their probabilities and their gradient
    in turn (plus tanh(logits / cap), which the cap's derivative needs, when capped).
    """
    eps, vocab_size = options.label_smoothing, logits.shape[1]
    tanh = None
    if options.softcap is not None:
        logits.div_(options.softcap).tanh_()
        if to_grad:
            tanh = logits.clone()
        logits.mul_(options.softcap)
    loss = -(1.0 - eps) * logits.gather(1, targets).squeeze(1)
    if eps:
        loss -= eps / vocab_size * logits.sum(1)
    row_max = logits.amax(1, keepdim=True)  # [C, 1]
    logits.sub_(row_max).exp_()
    sum_exp = logits.sum(1, keepdim=True)  # [C, 1]
    lse = row_max + sum_exp.log()  # [C, 1]
    loss += lse.squeeze(1)
    if options.z_loss:
        loss += options.z_loss * lse.squeeze(1).square()
    if not to_grad:
        return loss
    # p * (1 + 2 z lse) in one pass over the chunk: exp(s - max) * (1 + 2 z lse) / sum_exp
    logits.mul_((1.0 + 2.0 * options.z_loss * lse) / sum_exp)
    logits.scatter_add_(1, targets, torch.full_like(lse, eps - 1.0))
    if eps:
        logits.sub_(eps / vocab_size)
    if tanh is not None:
        logits.mul_(tanh.square_().neg_().add_(1.0))  # ds/dlogits = 1 - tanh**2
    return loss
