"""Peak memory of this process: above a baseline (what a call adds), or over its whole life.

On CPU the kernel's high-water mark of resident memory (VmHWM), which `PeakMemory.reset` resets
to the current RSS (VmRSS) by writing "5" to /proc/self/clear_refs after a garbage collection
and a heap trim, so it follows the tensors a call makes; on GPU the CUDA allocator's peak.

On CPU glibc is first told to give every allocation of 256 KiB or more its own mapping
(`map_large_allocations`, mallopt M_MMAP_THRESHOLD). By default it raises that threshold up to
32 MiB as large blocks are freed, after which [tokens, hidden] tensors come from the heap, and a
freed one stays resident where a later, differently sized one cannot reuse it: the high-water
mark then counts fragmentation (measured on an 8K-token step of benchmarks/context_memory.py's
model at 2 layers: 831 MiB against torch's own peak of 357 MiB of live tensors; with the fixed
threshold, 348 MiB against 343 MiB).
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import torch


class PeakMemory:
    """Peak memory above a baseline taken at `reset()`: VmHWM on CPU, the CUDA allocator on GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        if device.type == "cpu":
            map_large_allocations()

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


def process_peak_bytes(device: torch.device) -> int:
    """The most memory this process has held since it started (unless a `PeakMemory` reset it):
    on CPU its resident high-water mark, everything the machine had to hold for it (libraries
    and the interpreter included); on GPU what the CUDA allocator reserved from the device at
    most (allocated tensors and the cache around them; the CUDA context itself is not counted)."""
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_reserved(device)
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value) * 1024
    raise RuntimeError(f"/proc/self/status: no {key} line (peak RSS needs Linux)")


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def map_large_allocations() -> None:
    """Serve allocations of 256 KiB or more from their own mappings from now on, so that freeing
    one returns it to the system at once (see the module docstring). Call before the work measured."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):  # not glibc: the peak may include freed heap
        pass


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed heap may stay mapped
        pass


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer or a peak reading sees all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
