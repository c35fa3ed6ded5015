"""The PyTorch calls whose names differ between the releases we support (2.11 and later).

torch 2.13 renamed the single-tensor collectives (`all_gather_into_tensor` ->
`all_gather_single`, `reduce_scatter_tensor` -> `reduce_scatter_single`) and deprecated the old
names; GPU clusters run releases from before the rename. Callers use these wrappers, which take
the new name where it exists.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Every rank's `input` (same shape on all) concatenated along dim 0 into `output`."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """The sum over ranks of `input`, split along dim 0; this rank's part into `output`."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, input, group=group)


def silence_deprecated_collective_names() -> None:
    """DeepSpeed's ZeRO-3 fetches call the collectives torch 2.13 deprecated (all_gather_into_tensor,
    reduce_scatter_tensor) on every step; their warning would bury a rank's own log."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
