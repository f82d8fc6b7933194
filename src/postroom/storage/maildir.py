"""Maildir mailboxes (cr.yp.to/proto/maildir.html): delivery, listing, and the path rules.

Layout is ``{data_dir}/mail/{domain}/{localpart}/{tmp,new,cur}`` with local parts lower-cased and
domains IDNA-encoded (see CONTRACT.md). Files are stored exactly as they came over SMTP, with CRLF
line ends: Dovecot and mutt read them, and POP3 can send them without conversion. Each file name
carries ``,S=<octets>,W=<octets>`` (as Dovecot does) so that sizes are known without opening the
file.

A delivery writes ``tmp/NAME``, fsyncs it, renames it to ``new/NAME`` and fsyncs ``new/``; only then
is it delivered. NAME is derived from the queue id and recipient index, so after a crash the
queue can ask :func:`already_delivered` and never deliver the same message twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
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


def write_to_tmp(path: Path, name: str, parts: Iterable[bytes | memoryview]) -> Path:
    """Write the message into ``tmp/name`` and fsync it; returns the tmp path."""
    tmp = path / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, parts)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        tmp.unlink(missing_ok=True)  # never leave half a message behind (disk full)
        raise
    os.close(fd)
    return tmp


def _write_all(fd: int, parts: Iterable[bytes | memoryview]) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            n = os.write(fd, view)
            view = view[n:]


def publish(path: Path, name: str) -> None:
    """Move ``tmp/name`` to ``new/name``; the caller fsyncs ``new/`` afterwards."""
    os.rename(path / "tmp" / name, path / "new" / name)


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
