"""What every benchmark does the same way: peak memory per length, its JSON line, a port.

Peak memory (`PeakMemory`, `sync`) is the library's (omnilong/train/peak_memory.py): the probe
measures with it too.
"""

from __future__ import annotations

import gc
import json
import socket
from pathlib import Path

import torch

from omnilong.atomic import write_text
from omnilong.train.peak_memory import PeakMemory, sync

__all__ = ["PeakMemory", "emit_summary", "free_port", "peak_per_length", "release", "sync"]


def release(device: torch.device) -> None:
    """Free what the dropped objects held: Python's cycles, and the CUDA allocator's cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_per_length(step, lengths: list[int], device: torch.device, label: str) -> list[dict]:
    """`step(seq_len)` once per length, each with its peak memory and time; the first length
    that does not fit ends the list with an `oom` row (longer ones would not fit either)."""
    import sys
    import time

    meter, rows = PeakMemory(device), []
    for seq_len in lengths:
        meter.reset()
        started = time.perf_counter()
        try:
            step(seq_len)
            sync(device)
        except torch.OutOfMemoryError:
            rows.append({"seq_len": seq_len, "error": "oom"})
            break
        rows.append({"seq_len": seq_len, "peak_bytes": meter.peak_above_baseline(),
                     "seconds": time.perf_counter() - started})
        print(f"{label}: {rows[-1]}", file=sys.stderr, flush=True)  # a long run's progress
    return rows


def free_port() -> int:
    """A TCP port free on loopback now, for a process group's rendezvous or a server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def emit_summary(summary: dict, out: Path | None) -> None:
    """Print the benchmark's one JSON line (and write it to `out` when given)."""
    line = json.dumps(summary)
    if out:
        write_text(out, line + "\n")
    print(line)
