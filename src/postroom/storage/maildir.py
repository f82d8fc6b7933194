"""Maildir mailboxes (cr.yp.to/proto/maildir.html): delivery, listing, and the path rules.

Layout is ``{data_dir}/mail/{domain}/{localpart}/{tmp,new,cur}`` with local parts lower-cased and
domains IDNA-encoded (see CONTRACT.md). Files are stored exactly as they came over SMTP, with CRLF
line ends: Dovecot and mutt read them, and POP3 can send them without conversion. Each file name
carries ``,S=<octets>,W=<octets>`` (as Dovecot does) so that sizes are known without opening the
file.

A delivery writes the file (an ``O_TMPFILE`` inode, or ``tmp/NAME`` where that is not available),
fsyncs it, links or renames it to ``new/NAME`` and fsyncs ``new/``; only then is it delivered.
NAME is derived from the queue id and recipient index, so after a crash the queue can ask
:func:`already_delivered` and never deliver the same message twice.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from postroom.address import safe_local_part

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


def deliver(path: str | Path, name: str, parts: Sequence[bytes]) -> bool:
    """Write the message durably as ``new/name`` of the Maildir at ``path``.

    Returns False, writing nothing, if ``new/name`` exists already: names are derived from the
    queue id, so that is this very message, delivered before a crash. On return the file and
    its directory entry are on disk (file fsync'ed, then ``new/`` fsync'ed).

    Where the file system allows, the file is made with ``O_TMPFILE`` (an unnamed inode) and
    linked into ``new/`` once complete: the Maildir rule "never visible half-written" holds
    without a ``tmp/`` entry, nothing is left behind by a crash, the inode is allocated
    outside the directory lock that concurrent deliveries to the same mailbox contend for, and
    ``linkat`` fails on an existing name where ``rename`` would replace it. Elsewhere, the
    classic ``tmp/`` write and rename.
    """
    global _tmpfile_ok
    path = os.fspath(path)
    new_fd = os.open(os.path.join(path, "new"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        linked: bool | None = None
        if _tmpfile_ok:
            linked = _deliver_tmpfile(path, name, new_fd, parts)
            if linked is None:
                _tmpfile_ok = False
        if linked is None:
            linked = _deliver_renamed(path, name, new_fd, parts)
        if linked:
            _sync_new(path, new_fd)
        return linked
    finally:
        os.close(new_fd)


_tmpfile_ok = hasattr(os, "O_TMPFILE")


class _DirState:
    __slots__ = ("busy", "issued", "synced", "users")

    def __init__(self) -> None:
        self.issued = self.synced = self.users = 0
        self.busy = False


_sync_cond = threading.Condition()
_sync_states: dict[str, _DirState] = {}


def _sync_new(key: str, new_fd: int) -> None:
    """fsync ``new/`` after this thread's link, sharing the fsync with concurrent deliveries.

    Group commit across worker threads: each caller takes a ticket after its link; an fsync
    that *started* after the ticket covers it. So when 20 sessions deliver to one mailbox at
    once, a handful of directory fsyncs serve all of them instead of 20.
    """
    with _sync_cond:
        state = _sync_states.get(key)
        if state is None:
            state = _sync_states[key] = _DirState()
        state.issued += 1
        ticket = state.issued
        state.users += 1
        try:
            while state.synced < ticket:
                if state.busy:
                    _sync_cond.wait()
                    continue
                state.busy = True
                target = state.issued
                done = False
                _sync_cond.release()
                try:
                    os.fsync(new_fd)
                    done = True
                finally:
                    _sync_cond.acquire()
                    state.busy = False
                    if done:
                        state.synced = max(state.synced, target)
                    _sync_cond.notify_all()
        finally:
            state.users -= 1
            if state.users == 0:
                del _sync_states[key]


def _deliver_tmpfile(path: str, name: str, new_fd: int, parts: Sequence[bytes]) -> bool | None:
    """The O_TMPFILE way; None if this file system (or a missing /proc) does not allow it."""
    try:
        fd = os.open(os.path.join(path, "tmp"), os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise
    try:
        _write_all(fd, parts)
        os.fsync(fd)
        try:
            # linkat(AT_SYMLINK_FOLLOW) through /proc, as open(2) documents for O_TMPFILE; a
            # dst_dir_fd makes Python call linkat rather than link.
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=new_fd, follow_symlinks=True)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EXDEV, errno.EPERM, errno.EACCES):
                return None  # no /proc here: the caller writes the message the other way
            raise
        return True
    finally:
        os.close(fd)  # an unlinked O_TMPFILE inode is freed here


def _deliver_renamed(path: str, name: str, new_fd: int, parts: Sequence[bytes]) -> bool:
    if os.path.exists(os.path.join(path, "new", name)):
        return False
    tmp = Path(path, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, parts)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        tmp.unlink(missing_ok=True)  # never leave half a message behind (disk full)
        raise
    os.close(fd)
    os.rename(tmp, name, dst_dir_fd=new_fd)
    return True


def _write_all(fd: int, parts: Sequence[bytes]) -> None:
    """All of ``parts``, in one ``writev`` unless the kernel takes less."""
    total = sum(len(p) for p in parts)
    written = os.writev(fd, parts)
    if written < total:
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def size_from_name(name: str) -> int | None:
    """The ``,S=`` size in a Maildir file name, if it has one."""
    base = name.split(":", 1)[0]
    for field in base.split(",")[1:]:
        if field.startswith("S=") and field[2:].isdigit():
            return int(field[2:])
    return None
