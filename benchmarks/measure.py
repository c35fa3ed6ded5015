"""What every benchmark does the same way: peak memory per length, its JSON line, a port.

Peak memory (`PeakMemory`, `sync`) is the library's (omnilong/train/peak_memory.py): the probe
measures with it too. `run_with_peak_rss` measures a command that starts processes of its own.
"""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from omnilong.atomic import write_text
from omnilong.train.peak_memory import PeakMemory, sync

__all__ = ["PeakMemory", "emit_summary", "free_port", "peak_per_length", "release", "run_with_peak_rss", "sync"]


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


def run_with_peak_rss(command: list[str], interval_s: float = 0.02, **popen) -> tuple[str, int]:
    """Run `command` to its end; its stdout and the peak of the resident memory of it and all its
    descendants together (RSS summed, sampled every `interval_s`: libraries mapped by several
    processes count once per process, and a peak shorter than the interval can be missed)."""
    import psutil

    # A file, not a pipe: a pipe no one reads while the command runs could block it.
    with tempfile.TemporaryFile("w+") as stdout_file:
        process = subprocess.Popen(command, stdout=stdout_file, text=True, **popen)
        root, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            total = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:  # it ended since the poll
                break
            for member in tree:
                try:
                    total += member.memory_info().rss
                except psutil.NoSuchProcess:  # ended between the listing and the reading
                    pass
            peak = max(peak, total)
            time.sleep(interval_s)
        process.wait()
        stdout_file.seek(0)
        stdout = stdout_file.read()
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command, stdout)
    return stdout, peak
