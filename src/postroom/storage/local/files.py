"""File-system helpers shared by the journal, the deferred store and the Maildirs, and the
file modes of everything under ``data_dir`` (0700 directories, 0600 files, whatever the umask:
:func:`make_dirs` makes every level it creates 0700, each ``open`` asks 0600).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IOV_MAX = 1024  # Linux's limit on the pieces of one writev
SUN_PATH = 108  # the octets of an AF_UNIX address (sockaddr_un.sun_path), its NUL included


def write_all(fd: int, parts: Sequence[bytes | bytearray]) -> None:
    """Write every part, in one ``writev`` unless the kernel takes less."""
    if len(parts) > IOV_MAX:
        parts = [b"".join(parts)]
    written = os.writev(fd, parts)
    if written < sum(len(p) for p in parts):
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def replace_durably(
    path: str | Path, data: bytes, tmp: str | Path, mtime: float | None = None
) -> None:
    """Write ``data`` to ``tmp`` (0600 from the first octet), fsync it and rename it over
    ``path``; the caller fsyncs the directory. ``mtime``: the file's, set before the rename.
    A write that fails (a full disk) takes its ``tmp`` away: each would hold an inode."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            write_all(fd, (data,))
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """``path`` as an AF_UNIX address to bind or connect to while the block runs: itself, or
    when it is too long for one (a ``data_dir`` of some 95 characters) the same file reached
    through a descriptor of its directory, ``/proc/self/fd/N/NAME`` (Linux)."""
    if len(os.fsencode(path)) < SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


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


# Everything under data_dir is the server user's alone: accounts (password hashes, SCRAM
# keys), queued and delivered mail, private keys. A umask of 077 makes every directory 0700
# and every file 0600 whatever the mode a library asks for (SQLite asks 0644); the tree walk
# tightens what an older version or another tool left looser.
PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_umask() -> None:
    """Create files for the owner only from now on (this process and its children)."""
    os.umask(PRIVATE_UMASK)


# What the walk re-owns and tightens; a FIFO or device node someone placed is left alone.
_TIGHTENED = (stat.S_ISDIR, stat.S_ISREG, stat.S_ISSOCK)


@dataclass
class _Links:
    """Files with several names that are not the user's yet, by (device, inode): each is
    given away only if all its names are in the tree (counted by a first walk); otherwise it
    may be another's file that the user hard-linked in (``fs.protected_hardlinks`` allows a
    file the user may read and write), and root must not make it the user's, nor chmod it."""

    names: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # nlink, seen
    inside: set[tuple[int, int]] | None = None  # after the first walk: all names in the tree


def _tighten_at(name: str, dir_fd: int, ids: tuple[int, int] | None, links: _Links) -> None:
    """Tighten one entry of the directory ``dir_fd``, through a descriptor of the entry itself
    (``O_PATH``: opening it reads nothing and starts no device), never through a link:
    ``serve`` runs this as root over a tree the server's user can write, and a path checked
    and then changed could be swapped for a symlink in between. A file with another name that
    the user does not own yet waits for :class:`_Links` to say all its names are here."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:  # a file that went meanwhile
        return
    try:
        st = os.fstat(fd)
        if not any(is_kind(st.st_mode) for is_kind in _TIGHTENED):
            return  # (a symlink is opened as itself: never followed)
        owner = ids[0] if ids is not None else os.geteuid()
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and st.st_uid != owner:
            key = (st.st_dev, st.st_ino)
            if links.inside is None:  # the first walk counts its names
                nlink, seen = links.names.get(key, (st.st_nlink, 0))
                links.names[key] = (nlink, seen + 1)
                return
            if key not in links.inside or links.names[key][0] != st.st_nlink:
                logging.getLogger("postroom").warning(
                    "%s: left as it is (uid %d, mode %o): it has a name outside the data directory",
                    name,
                    st.st_uid,
                    stat.S_IMODE(st.st_mode),
                )
                return
        # An O_PATH descriptor allows no fchmod/fchown; its /proc name reaches the same inode.
        inode = f"/proc/self/fd/{fd}"
        if ids is not None and (st.st_uid, st.st_gid) != ids:
            os.chown(inode, *ids)
        want = DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(inode, want)
    finally:
        os.close(fd)


def make_data_dir(data_dir: str | Path) -> None:
    """``data_dir`` (0700) and the parents it lacks: those 0755 whatever the umask, as
    /var/lib is, so that the server's ``user`` can pass through parents that root made (its
    own directory keeps everybody else out)."""
    data_dir = Path(data_dir)
    missing = []
    parent = data_dir.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory)
            os.chmod(directory, 0o755)  # noqa: S103 - a way through, not a place to read
    with contextlib.suppress(FileExistsError):
        os.mkdir(data_dir, 0o700)


# How deep the walk goes (it holds a descriptor per level): a Maildir tree is a few levels;
# one its user nested thousands deep must not stop the server from starting.
TIGHTEN_DEPTH = 64
# A directory opened by the walk: never through a link (ELOOP), never anything else, such as
# a FIFO that would block the start (ENOTDIR).
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def tighten(path: str | Path, ids: tuple[int, int] | None = None, deep: bool = True) -> None:
    """Directories 0700 and files 0600 (and owner ``ids`` if given) for ``path`` and, with
    ``deep``, everything below it (to :data:`TIGHTEN_DEPTH` levels); without ``deep``, only
    its direct entries. Links are never followed (:func:`_tighten_at`); each directory is
    opened by name in the one above it (``O_NOFOLLOW``, ``O_DIRECTORY``), so one swapped for
    a link or a FIFO while the walk runs takes it nowhere else and never blocks it.
    (``os.fwalk`` opens them with a plain ``O_RDONLY``, and recurses.)"""
    links = _Links()
    _walk(os.path.abspath(path), ids, deep, links)
    links.inside = {key for key, (nlink, seen) in links.names.items() if seen >= nlink}
    if links.inside:  # (rare: the copies a run as root linked for several recipients)
        _walk(os.path.abspath(path), ids, deep, links)


def _walk(top: str, ids: tuple[int, int] | None, deep: bool, links: _Links) -> None:
    parent_fd = os.open(os.path.dirname(top), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _tighten_at(os.path.basename(top), parent_fd, ids, links)
        top_fd = _open_dir(os.path.basename(top), parent_fd)
    finally:
        os.close(parent_fd)
    if top_fd is None:
        return
    # Depth first; the descriptors open are those of the directories on the way down.
    stack = [(top_fd, _tighten_entries(top_fd, ids, links))]
    try:
        while stack:
            dir_fd, subdirs = stack[-1]
            if not deep or not subdirs:
                os.close(stack.pop()[0])
                continue
            sub = _open_dir(subdirs.pop(), dir_fd)
            if sub is None:
                continue
            if len(stack) >= TIGHTEN_DEPTH:
                os.close(sub)
                logging.getLogger("postroom").warning(
                    "%s: not tightened below %d levels: nested too deep", top, TIGHTEN_DEPTH
                )
                continue
            stack.append((sub, _tighten_entries(sub, ids, links)))
    finally:
        for dir_fd, _subdirs in stack:
            os.close(dir_fd)


def _open_dir(name: str, dir_fd: int) -> int | None:
    """The directory ``name`` of ``dir_fd``, open; None if it is none (any more)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link
            return None
        raise


def _tighten_entries(dir_fd: int, ids: tuple[int, int] | None, links: _Links) -> list[str]:
    """Tighten every entry of the directory ``dir_fd``; the names of those that looked like
    directories (each is opened as one, or not at all, by :func:`_open_dir`)."""
    subdirs = []
    with os.scandir(dir_fd) as entries:
        listed = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in listed:
        _tighten_at(name, dir_fd, ids, links)
        if is_dir:
            subdirs.append(name)
    return subdirs


class NotRegular(OSError):
    """A file that is no regular file (a directory, a FIFO, a device in its place)."""


def open_regular(path: Path | str, *, follow_links: bool = True) -> int:
    """A blocking descriptor of the regular file ``path``, opened without blocking (a FIFO
    in its place would hang the opener: a reload waited for one, deaf to SIGTERM) and,
    unless ``follow_links``, without following a link; NotRegular for anything else."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR):  # a link (not followed), a directory
            raise NotRegular(exc.errno, exc.strerror) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path | str, *, follow_links: bool = True, limit: int | None = None) -> bytes:
    """The octets of the regular file ``path`` (:func:`open_regular`); NotRegular also for one
    larger than ``limit`` octets (``/dev/zero`` ran a reload out of memory)."""
    with open(open_regular(path, follow_links=follow_links), "rb") as f:
        if limit is not None and os.fstat(f.fileno()).st_size > limit:
            raise NotRegular(errno.EFBIG, f"larger than {limit} octets")
        return f.read()
