"""Maildir mailboxes (cr.yp.to/proto/maildir.html): delivery, listing, and the path rules.

Layout is ``{data_dir}/mail/{domain}/{localpart}/{tmp,new,cur}`` with local parts lower-cased and
domains IDNA-encoded (see CONTRACT.md). Files are stored exactly as they came over SMTP, with CRLF
line ends: Dovecot and mutt read them, and POP3 can send them without conversion. Each file name
carries ``,S=<octets>,W=<octets>`` (as Dovecot does) so that sizes are known without opening the
file.

A delivery writes the file (an ``O_TMPFILE`` inode, or ``tmp/NAME`` where that is not available),
fsyncs it, links or renames it to ``new/NAME`` and fsyncs ``new/``; only then is it delivered.
The fsync of ``new/`` can be left to the caller, to be shared by concurrent deliveries.
NAME is derived from the queue id and recipient index, so after a crash the queue can ask
:func:`already_delivered` and never deliver the same message twice.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from pathlib import Path

from postroom.address import safe_local_part
from postroom.storage import files
from postroom.storage.files import write_all

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
        (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)


def _host_part(hostname: str) -> str:
    # The Maildir spec escapes "/" and ":" in the host part of a unique name.
    return hostname.replace("/", r"\057").replace(":", r"\072")


def unique_name(arrival: int, queue_id: str, index: int, hostname: str, size: int) -> str:
    """A deterministic unique name: the same delivery always gets the same name.

    ``,S=`` is the file size and ``,W=`` the size with CRLF line ends (Dovecot's fields); the
    file is CRLF already, so they are equal, which tells POP3 it needs no conversion.
    """
    return f"{arrival}.{queue_id}_{index}.{_host_part(hostname)},S={size},W={size}"


def already_delivered(path: Path, name: str) -> bool:
    """True if ``name`` is in new/ or (with any flags) in cur/ of the Maildir at ``path``."""
    if (path / "new" / name).exists():
        return True
    try:
        with os.scandir(path / "cur") as it:
            return any(e.name == name or e.name.startswith(name + ":") for e in it)
    except FileNotFoundError:
        return False


def write_unnamed(path: str, parts: Sequence[bytes]) -> int | None:
    """A new unnamed file (``O_TMPFILE``) in the Maildir's ``tmp/`` holding ``parts``, not
    fsync'ed yet: its descriptor, for the caller to fsync, :func:`link_unnamed` and close.
    None where the file system has no ``O_TMPFILE``: :func:`deliver` then.

    Why this way: the Maildir rule "never visible half-written" holds without a ``tmp/``
    entry, a crash leaves nothing behind (closing an inode that was never linked frees it),
    the inode is allocated outside the directory lock that concurrent deliveries to one
    mailbox contend for, and ``linkat`` refuses to replace an existing name where ``rename``
    would.
    """
    if not _tmpfile_ok:
        return None
    try:
        fd = os.open(os.path.join(path, "tmp"), os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            _no_tmpfile()
            return None
        raise
    try:
        write_all(fd, parts)
    except BaseException:
        os.close(fd)
        raise
    return fd


def link_unnamed(fd: int, path: str, name: str) -> bool | None:
    """Give the fsync'ed unnamed file ``fd`` its name ``new/name``: True; False if that name
    exists (this very message, delivered before a crash: names come from the queue id); None
    if it cannot be linked here (no ``/proc``): :func:`deliver` then. The caller fsyncs
    ``new/`` afterwards (once for many links)."""
    target = os.path.join(path, "new", name)
    try:
        # linkat(AT_SYMLINK_FOLLOW) through /proc, as open(2) documents for O_TMPFILE. Any
        # src_dir_fd makes Python call linkat (which follows the /proc link) rather than link
        # (which would not); the kernel ignores it for the absolute source, and the target is
        # read as any path is, against the working directory if relative.
        os.link(f"/proc/self/fd/{fd}", target, src_dir_fd=_any_dir_fd(), follow_symlinks=True)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EACCES) or (
            exc.errno == errno.ENOENT and not os.path.isdir("/proc/self/fd")
        ):
            _no_tmpfile()
            return None
        raise
    return True


def deliver(path: str | Path, name: str, parts: Sequence[bytes]) -> bool:
    """Write the message durably as ``new/name`` through ``tmp/`` and a rename, all blocking.

    Returns False, writing nothing, if ``new/name`` exists already. On
    return the file and its directory entry are on disk (file fsync'ed, then ``new/``).
    """
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, "new", name)):
        return False
    tmp = os.path.join(path, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, parts)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # never leave half a message behind (disk full)
        raise
    os.close(fd)
    new = os.path.join(path, "new")
    os.rename(tmp, os.path.join(new, name))
    files.fsync_dir(new)
    return True


_tmpfile_ok = hasattr(os, "O_TMPFILE")
_dir_fd: int | None = None


def _no_tmpfile() -> None:
    global _tmpfile_ok
    _tmpfile_ok = False


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
