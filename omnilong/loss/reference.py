"""The plain linear cross-entropy: full [N, V] logits. The spec the chunked loss must match.

Only for checks (tests, the benchmark, tiny runs with `loss.impl: reference`): at 64K tokens
and Qwen2.5's 151,936-entry vocabulary its fp32 logits alone are ~37 GiB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_linear_cross_entropy(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [N]
    bias: torch.Tensor | None = None,  # [V]
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss summed over valid tokens, number of valid tokens); the loss in fp32 (fp64 for fp64)."""
    accum_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    logits = logits.to(accum_dtype)  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss_sum = F.cross_entropy(
        logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
    )
    valid = labels != ignore_index
    if z_loss:
        loss_sum = loss_sum + z_loss * torch.logsumexp(logits[valid], dim=-1).square().sum()
    return loss_sum, valid.sum()
