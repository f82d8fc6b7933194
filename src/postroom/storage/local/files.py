"""File-system helpers shared by the journal, the deferred store and the Maildirs.

Everything postroom creates under ``data_dir`` is for the server's user alone: directories
0700 (:func:`make_dirs`, every level it makes), files 0600 (each ``open`` says so).
"""

from __future__ import annotations

import contextlib
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


def make_dirs(path: str | Path) -> None:
    """Create ``path`` and any missing parents, each 0700 (``Path.mkdir(parents=True)``
    makes the parents with the umask's mode)."""
    path = Path(path)
    if path.is_dir():
        return
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
