"""File-system helpers shared by the spool (``queue/store.py``) and the Maildirs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

IOV_MAX = 1024  # Linux's limit on the pieces of one writev


def write_all(fd: int, parts: Sequence[bytes]) -> None:
    """Write every part, in one ``writev`` unless the kernel takes less."""
    if len(parts) > IOV_MAX:
        parts = [b"".join(parts)]
    written = os.writev(fd, parts)
    if written < sum(len(p) for p in parts):
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def fsync_dir(path: str | Path) -> None:
    """Make the directory's entries (a create, rename, link or unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
