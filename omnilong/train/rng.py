"""The random number generators a stage draws from: seeded at start, saved and restored per rank.

Training draws random numbers for dropout (LoRA's included) and whatever else a model samples;
an exact resume needs each rank to continue the stream it was on. The data does not come from
here: the row order is a pure function of the seed and the step (omnilong/train/row_order.py),
and the loader's workers draw nothing random (their generators, seeded afresh by each run, are
not restored).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture() -> dict[str, Any]:
    """This process's generator states, to store in its rank's checkpoint file."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore(states: dict[str, Any]) -> None:
    """Put back the states `capture` returned (in the same rank's process)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
