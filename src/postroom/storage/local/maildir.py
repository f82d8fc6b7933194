"""Maildir mailboxes (cr.yp.to/proto/maildir.html): delivery, listing, and the path rules.

Layout is ``{data_dir}/mail/{domain}/{localpart}/{tmp,new,cur}`` with local parts lower-cased and
domains IDNA-encoded. Files end their lines with LF, the Unix convention that Dovecot, mutt and
other Maildir tools expect (SMTP refuses bare CR and LF, so the conversion is lossless; POP3
sends CRLF). Each file name carries ``,S=<file size>,W=<size with CRLF line ends>`` as Dovecot
writes them, so that POP3 knows its octet counts without opening the file.

A copy is an unnamed file made ahead (:class:`Spares`) linked in as ``new/NAME``, a hard link
to a file the journal holds already (:func:`link_copy`: a large message is written once), or
else ``tmp/NAME`` renamed to ``new/NAME`` (:func:`publish`); the flushes are left to the caller
(the journal makes the copy durable first, and the files later, in bulk). Every copy of one
message is the same octets (no per-recipient header), so the copies after the first are links.
NAME is derived from the queue id and recipient index, so after a crash :func:`find` tells
whether a copy was delivered already.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from postroom.address import safe_local_part
from postroom.storage.local.files import make_dirs, write_all

SUBDIRS = ("tmp", "new", "cur")


def mailbox_path(data_dir: Path, key: str) -> Path:
    """The Maildir of ``local@domain`` (an :attr:`Address.key`); the local part is vetted."""
    local, _, domain = key.rpartition("@")
    return data_dir / "mail" / domain / safe_local_part(local)


def ensure(path: Path) -> None:
    """Create the Maildir (and its parents) if it does not exist yet."""
    if (path / "cur").is_dir():
        return
    for sub in SUBDIRS:
        make_dirs(path / sub)


def _host_part(hostname: str) -> str:
    # The Maildir spec escapes "/" and ":" in the host part of a unique name.
    return hostname.replace("/", r"\057").replace(":", r"\072")


def unique_name(
    arrival: int, queue_id: str, index: int, hostname: str, size: int, lines: int
) -> str:
    """A deterministic unique name: the same delivery always gets the same name.

    ``,S=`` is the file size and ``,W=`` the size with CRLF line ends (Dovecot's fields): the
    file has ``lines`` LF line ends, each one octet longer on the wire.
    """
    host = _host_part(hostname)
    return f"{arrival}.{queue_id}_{index}.{host},S={size},W={size + lines}"


def find(box: str, name: str) -> str | None:
    """The file of a delivered copy: ``new/name``, or ``cur/name`` with any flags."""
    path = os.path.join(box, "new", name)
    if os.path.exists(path):
        return path
    with contextlib.suppress(FileNotFoundError), os.scandir(os.path.join(box, "cur")) as it:
        for e in it:
            if e.name == name or e.name.startswith(name + ":"):
                return e.path
    return None


def publish(box: str, name: str, parts: Sequence[bytes], where: str | None = None) -> int:
    """Write ``parts`` as ``tmp/name`` and give it the name ``where`` (default ``new/name``,
    which must not exist yet: FileExistsError), making the Maildir if need be. Nothing is
    flushed: the open descriptor is returned for the caller to fsync (or not) and close, and
    the caller fsyncs the directory."""
    tmp = os.path.join(box, "tmp", name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:  # a Maildir not made yet, or removed meanwhile
        ensure(Path(box))
        fd = os.open(tmp, flags, 0o600)
    move = os.rename if where is not None else os.link  # a link refuses to replace
    dest = where or os.path.join(box, "new", name)
    try:
        write_all(fd, parts)
        try:
            move(tmp, dest)
        except FileNotFoundError:  # new/ removed meanwhile
            ensure(Path(box))
            move(tmp, dest)
        if where is None:
            os.unlink(tmp)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # never leave half a message behind (disk full)
        raise
    return fd


class Spares:
    """Unnamed files (``O_TMPFILE``) made ahead of need, in a directory on the Maildirs' file
    system. Creating an inode is the dearest step of a copy (~100 µs here, against ~20 µs for
    a link), so the Maildir writer makes them while it waits for its next job, and a copy then
    costs a write and a :func:`link_unnamed`. Off for good (``ok`` False) where the file system,
    ``/proc`` or the layout (Maildirs on another file system) does not allow it."""

    LIMIT = 256

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.ok = hasattr(os, "O_TMPFILE")
        self._fds: deque[int] = deque()

    def take(self) -> int | None:
        return self._fds.popleft() if self.ok and self._fds else None

    def refill(self, wanted: int) -> None:
        while self.ok and len(self._fds) < min(wanted, self.LIMIT):
            try:
                fd = os.open(self.directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            except OSError:
                self.off()
                return
            self._fds.append(fd)

    def off(self) -> None:
        self.ok = False
        while self._fds:
            os.close(self._fds.pop())


def link_copy(path: str, box: str, name: str) -> None:
    """Give the file ``path`` the name ``new/name`` too (a hard link; FileExistsError if the
    name is taken), making the Maildir if need be."""
    target = os.path.join(box, "new", name)
    try:
        os.link(path, target)
    except FileNotFoundError:
        if not os.path.exists(path):
            raise
        ensure(Path(box))
        os.link(path, target)


def link_unnamed(fd: int, box: str, name: str) -> None:
    """Give the unnamed file ``fd`` the name ``new/name`` (FileExistsError if it is taken)."""
    # linkat(AT_SYMLINK_FOLLOW) through /proc, as open(2) documents for O_TMPFILE. Any
    # src_dir_fd makes Python call linkat (which follows the /proc link) rather than link
    # (which would not); the kernel ignores it for the absolute source, and the target is
    # read as any path is, against the working directory if relative.
    target = os.path.join(box, "new", name)
    os.link(f"/proc/self/fd/{fd}", target, src_dir_fd=_any_dir_fd(), follow_symlinks=True)


_dir_fd: int | None = None


def _any_dir_fd() -> int:
    global _dir_fd
    if _dir_fd is None:
        _dir_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _dir_fd


def name_field(name: str, key: str) -> int | None:
    """The number of the ``,KEY=`` field in a Maildir file name (``S``: the file's size,
    ``W``: its size with CRLF line ends, as Dovecot names them), if it has one."""
    prefix = key + "="
    for field in name.split(":", 1)[0].split(",")[1:]:
        if field.startswith(prefix) and field[len(prefix) :].isdigit():
            return int(field[len(prefix) :])
    return None
