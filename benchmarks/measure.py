"""What every benchmark does the same way: peak memory above a baseline, its JSON line, a port.

Peak memory: on CPU the kernel's high-water mark of resident memory (VmHWM), reset to the
current RSS (VmRSS) by writing "5" to /proc/self/clear_refs after a garbage collection and a
heap trim, so it follows the tensors a call makes; on GPU the CUDA allocator's peak.
"""

from __future__ import annotations

import ctypes
import gc
import json
import socket
from pathlib import Path

import torch

from omnilong.atomic import write_text


class PeakMemory:
    """Peak memory above a baseline taken at `reset()`: VmHWM on CPU, the CUDA allocator on GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0

    def reset(self) -> None:
        gc.collect()
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        _trim_heap()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.baseline = _proc_status_bytes("VmRSS")

    def peak_above_baseline(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.baseline
        return _proc_status_bytes("VmHWM") - self.baseline


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value) * 1024
    raise RuntimeError(f"/proc/self/status: no {key} line (peak RSS needs Linux)")


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed heap may stay mapped
        pass


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer or a peak reading sees all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


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
