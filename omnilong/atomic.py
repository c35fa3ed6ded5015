"""Atomic outputs: a reader sees the old file or directory, or the complete new one, never half.

Everything the pipeline writes goes through here, so a crashed step leaves the previous good
state in place and a rerun starts clean.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
        # NamedTemporaryFile is private (0600); the output gets the usual umask permissions.
        os.fchmod(tmp.fileno(), 0o666 & ~_umask())
    os.replace(tmp.name, path)
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory that replaces `path` only if the block succeeds.

    The old directory, if any, is moved aside and deleted after the swap, so at every
    instant `path` holds either the old complete contents or the new ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.staging."))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = None
    if path.exists():
        retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
        os.replace(path, retired / path.name)
    os.replace(staging, path)
    _fsync_dir(path.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
