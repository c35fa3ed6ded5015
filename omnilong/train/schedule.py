"""Learning-rate schedule: linear warmup, then cosine decay to `lr * min_lr_ratio`."""

from __future__ import annotations

import math

from omnilong.config import TrainParams


def lr_factor(step: int, train: TrainParams) -> float:
    """Multiplier of `train.lr` for optimizer step `step` (0-based)."""
    if step < train.warmup_steps:
        return (step + 1) / (train.warmup_steps + 1)
    decay_steps = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine
