"""The non-finite guard: a NaN or inf loss or gradient skips the update on every rank.

DeepSpeed's ZeRO-3 looks for overflow only when training in fp16 (the loss scaler's check); in
bf16 and fp32 a NaN gradient would reach the optimizer and poison every weight it touches. So
after backward and before the optimizer step each rank reports whether its loss or its partition
of the gradients is non-finite, together with that partition's squared norm, in one all-reduce
over all ranks: every rank comes to the same decision, and the global gradient norm (before
clipping, as DeepSpeed's) comes for free.

A skipped step still consumes its batch and advances the step counter and the LR schedule, as if
the update had been zero: step N always trains on batch N at the LR of step N, so the row order,
the resume position (`next_step`) and the schedule's end stay those of a run without the fault,
and a batch that made the loss non-finite is not fed again. (DeepSpeed's own fp16 overflow skip
leaves the LR scheduler where it was; there the skips are routine loss-scale probes.)
`train.max_nonfinite_steps` such steps in a row stop the stage: the data or the LR is wrong,
and the last checkpoint, written before the streak, is what to resume from once it is fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

class NonFiniteStepsError(RuntimeError):
    """`train.max_nonfinite_steps` optimizer steps in a row had a non-finite loss or gradient."""


@dataclass(frozen=True)
class GradientCheck:
    finite: bool
    """Whether the loss and the gradients were finite on every rank."""
    grad_norm: float
    """The global L2 norm of the gradients before clipping (non-finite when `finite` is false)."""


def _trainable(engine) -> list[torch.nn.Parameter]:
    return [param for param in engine.module.parameters() if param.requires_grad]


def check_gradients(engine, local_loss: float, device: torch.device) -> GradientCheck:
    """Collective, at the accumulation boundary after the last backward: whether any rank's loss
    or gradient partition is non-finite, and the global gradient norm."""
    from deepspeed.utils import safe_get_local_grad

    # This rank's partition of each gradient (ZeRO-3 has reduce-scattered them during backward);
    # per-tensor norms in fp32 as DeepSpeed takes them, their squares summed in fp64, on the
    # device: one synchronisation for the whole check.
    norms = [torch.linalg.vector_norm(safe_get_local_grad(param)).to(device) for param in _trainable(engine)]
    squares = torch.stack(norms).double().square().sum()
    local_nonfinite = ~torch.isfinite(squares) | (not math.isfinite(local_loss))
    totals = torch.stack([local_nonfinite.double(), squares])
    dist.all_reduce(totals)
    nonfinite_ranks, global_squares = totals.tolist()
    finite = nonfinite_ranks == 0
    return GradientCheck(finite, math.sqrt(global_squares) if finite else float("nan"))


def skip_update(engine) -> None:
    """End the accumulation boundary without updating anything, on every rank.

    The gradient partitions are zeroed (a parameter that gets no gradient next step would
    otherwise keep this step's NaN), and DeepSpeed's engine steps through its overflow path:
    the optimizer reports `overflow`, so the engine counts a skipped step, keeps its counters
    and ZeRO-3's accumulation state in order, and steps neither the optimizer nor the scheduler.
    The LR schedule then advances here (see the module docstring).
    """
    from deepspeed.utils import safe_set_local_grad

    optimizer = engine.optimizer
    for param in _trainable(engine):
        safe_set_local_grad(param, torch.zeros_like(param.ds_tensor))

    def discard_update(closure=None) -> None:
        optimizer.zero_grad(set_to_none=True)  # also restarts ZeRO-3's accumulation (micro_step_id)
        optimizer.overflow = True

    optimizer.step = discard_update  # shadows the method for this one boundary
    try:
        engine.step()
    finally:
        del optimizer.step
        optimizer.overflow = False
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step()


class NonFiniteStreak:
    """Skipped steps, in all and in a row; too many in a row stop the stage. Carried by the
    checkpoints, so a resume neither forgets a streak nor restarts the logged count."""

    def __init__(self, limit: int, saved: dict[str, int] | None = None):
        self.limit = limit
        self.in_a_row = saved["in_a_row"] if saved else 0
        self.total = saved["total"] if saved else 0

    def state(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def count(self, skipped: bool) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += skipped

    def stop_if_too_many(self, step: int, max_steps: int) -> None:
        """Raise once `limit` steps in a row were skipped (every rank counts the same steps)."""
        if self.in_a_row >= self.limit:
            raise NonFiniteStepsError(
                f"step {step + 1}/{max_steps}: {self.in_a_row} optimizer steps in a row had a non-finite loss "
                f"or gradient norm (train.max_nonfinite_steps: {self.limit}); stopping the stage. Their updates "
                "were skipped; check the data and lower train.lr, then resume from the last checkpoint."
            )
