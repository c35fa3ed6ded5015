"""One entry point for the LM head's loss: the chunked path or the plain reference beside it."""

from __future__ import annotations

from typing import Literal

import torch

from omnilong.loss.chunked_ce import ChunkedLinearCrossEntropy, LossOptions, auto_chunk_tokens
from omnilong.loss.reference import reference_linear_cross_entropy

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20


def linear_cross_entropy(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [N]
    bias: torch.Tensor | None = None,  # [V]
    *,
    ignore_index: int = -100,
    chunk_tokens: int | Literal["auto"] = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: Literal["chunked", "reference"] = "chunked",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss summed over valid tokens, number of valid tokens) of the LM head on `hidden`.

    Both implementations compute, up to rounding,

        logits = (hidden @ weight.T + bias).float()                 # [N, V]
        if softcap: logits = softcap * tanh(logits / softcap)
        loss_sum = F.cross_entropy(logits, labels, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing, reduction="sum")
                 + z_loss * (logsumexp(logits, -1)[labels != ignore_index] ** 2).sum()

    `chunked` never allocates the [N, V] logits or their gradient (see chunked_ce.py);
    `reference` is that expression as written. The loss is a sum so callers normalise by the
    valid-token count summed over all ranks. The loss is fp32 for bf16/fp16 inputs.
    `chunk_tokens="auto"` picks the most tokens whose chunk workspace fits `memory_budget_bytes`.
    """
    _check_inputs(hidden, weight, labels, bias)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], given {label_smoothing!r}")
    if z_loss < 0:
        raise ValueError(f"z_loss: expected a coefficient >= 0, given {z_loss!r}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap: expected None (off) or a value > 0, given {softcap!r}")
    labels = labels.long()
    if impl == "reference":
        return reference_linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
    if impl != "chunked":
        raise ValueError(f"impl: expected 'chunked' or 'reference', given {impl!r}")
    if chunk_tokens == "auto":
        chunk_tokens = auto_chunk_tokens(
            weight.shape[0], weight.shape[1], hidden.dtype, memory_budget_bytes, softcap=softcap is not None
        )
    elif not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected a positive integer or 'auto', given {chunk_tokens!r}")
    compute_grads = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (hidden, weight, bias)
    )
    options = LossOptions(ignore_index, label_smoothing, z_loss, softcap)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_tokens, options, compute_grads)


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden, weight: expected shapes [N, H] and [V, H], given {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels: expected shape [{hidden.shape[0]}], given {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor, given {labels.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias: expected shape [{weight.shape[0]}], given {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"hidden, weight, bias: expected one dtype, given {hidden.dtype}, {weight.dtype}"
            f"{'' if bias is None else f', {bias.dtype}'}"
        )
