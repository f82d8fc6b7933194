"""Maildir helpers: count delivered files, empty a mailbox, and pre-fill one for POP3 runs.

Pre-filled messages are identical for every server: LF line ends (as postroom, Postfix and
Dovecot store them) and Dovecot-style names carrying ``,S=<octets on disk>,W=<octets with CRLF>``,
so neither server has to open a file to learn a size; both convert to CRLF on the wire.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

SUBDIRS = ("new", "cur", "tmp")
LINE = b"The quick brown fox jumps over the lazy dog while the bench counts 0123456789.\n"


def ensure(mailbox: Path, owner: tuple[int, int] | None = None) -> None:
    """Create ``mailbox`` with new/cur/tmp (and chown them when ``owner`` is given)."""
    for sub in SUBDIRS:
        (mailbox / sub).mkdir(parents=True, exist_ok=True)
    if owner is not None:
        for path in (mailbox, *(mailbox / sub for sub in SUBDIRS)):
            os.chown(path, *owner)


def count(mailbox: Path, sub: str = "new") -> int:
    """Number of entries in ``mailbox/sub`` (0 when it does not exist yet)."""
    try:
        with os.scandir(mailbox / sub) as entries:
            return sum(1 for _ in entries)
    except FileNotFoundError:
        return 0


def count_messages(mailbox: Path) -> int:
    return count(mailbox, "new") + count(mailbox, "cur")


def clear(mailbox: Path) -> None:
    """Empty new/, cur/ and tmp/ (index files stay) without deleting a file now.

    Each non-empty folder is renamed into a trash directory beside the mail root and replaced
    by an empty one; the trash goes with the bench tree at the end. Unlinking thousands of
    files here would tax the next server's measurement: ext4 without a journal (as on the
    bench VMs) skips inodes freed in the last minute when it allocates new ones, and scans
    past each of them on every file creation.
    """
    trash = mailbox.parent.parent / ".bench-trash"
    trash.mkdir(exist_ok=True)
    for sub in SUBDIRS:
        folder = mailbox / sub
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            if next(entries, None) is None:
                continue
        st = folder.stat()
        folder.rename(trash / f"{mailbox.name}-{sub}-{time.time_ns()}")
        folder.mkdir(mode=stat.S_IMODE(st.st_mode))
        os.chown(folder, st.st_uid, st.st_gid)


def make_message(index: int, size: int, sender: str, rcpt: str) -> bytes:
    """A plain RFC 5322 message of about ``size`` octets with LF line ends."""
    header = (
        f"Return-Path: <{sender}>\nFrom: <{sender}>\nTo: <{rcpt}>\n"
        f"Subject: bench message {index}\nMessage-ID: <{index}.{time.time_ns()}@bench.test>\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\n\n"
    ).encode()
    lines = max(1, (size - len(header)) // len(LINE))
    return header + LINE * lines


def fill(
    mailbox: Path,
    messages: int,
    size: int,
    rcpt: str,
    owner: tuple[int, int] | None = None,
    crlf: bool = False,
) -> int:
    """Write ``messages`` files into new/ (no fsync: setup, not measured); returns octets.

    ``crlf``: store CRLF line ends (older postroom files) instead of LF."""
    ensure(mailbox, owner)
    clear(mailbox)
    body = make_message(0, size, "sender@src.test", rcpt)
    wire_size = len(body) + body.count(b"\n")
    if crlf:
        body = body.replace(b"\n", b"\r\n")
    stamp = int(time.time())
    pid = os.getpid()
    new = mailbox / "new"
    for i in range(messages):
        name = f"{stamp}.M{i}P{pid}.bench,S={len(body)},W={wire_size}"
        path = new / name
        path.write_bytes(body)
        if owner is not None:
            os.chown(path, *owner)
    return messages * wire_size
