"""A POP3 maildrop: the user's Maildir as seen by one session (RFC 1939 semantics).

At login the Maildir's ``new/`` and ``cur/`` are listed once (the snapshot): message numbers
refer to it, and mail arriving meanwhile appears in the next session. Sizes come from the
``,S=`` in the file names (postroom writes CRLF files, so that is the octet count RETR sends);
files from other tools without it are measured once, counting LF as CRLF. UIDLs are the Maildir
base names (hashed if too long for RFC 1939 §7), so they are stable and never reused.
Deletions are applied only at QUIT (the UPDATE state); messages retrieved and kept move from
``new/`` to ``cur/`` with the ``S`` flag, as Maildir readers expect.

One session per mailbox: an exclusive ``flock`` on a lock file, held for the session and
released by the kernel if the process dies, so a crash never locks a mailbox for good.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from postroom.smtp.framing import to_crlf
from postroom.storage import maildir

LOCK_NAME = ".postroom-pop3.lock"
READ_CHUNK = 1 << 18


class MailboxInUse(Exception):
    """Another session holds the mailbox."""


@dataclass
class Entry:
    """One message of the snapshot."""

    subdir: str  # "new" or "cur"
    name: str  # file name in that directory
    size: int
    uid: str
    deleted: bool = False
    retrieved: bool = False
    crlf: bool = True  # the file already has CRLF line ends

    @property
    def base(self) -> str:
        return self.name.split(":", 1)[0]


def _uid(base: str) -> str:
    # RFC 1939 §7: 1 to 70 characters in the range 0x21 to 0x7E.
    if 0 < len(base) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in base):
        return base
    return hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class Maildrop:
    """The locked snapshot of one Maildir. Blocking file work: call from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[Entry] = []
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Lock the mailbox and take the snapshot; MailboxInUse if another session has it."""
        maildir.ensure(self.path)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MailboxInUse(str(self.path)) from None
        self._lock_fd = fd
        entries: list[Entry] = []
        for subdir in ("cur", "new"):
            with os.scandir(self.path / subdir) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    size = maildir.size_from_name(e.name)
                    crlf = True
                    if size is None:
                        size, crlf = self._measure(self.path / subdir / e.name)
                    base = e.name.split(":", 1)[0]
                    entries.append(Entry(subdir, e.name, size, _uid(base), crlf=crlf))
        # Oldest first: Maildir names start with the delivery time.
        entries.sort(key=lambda en: en.base)
        self.entries = entries

    @staticmethod
    def _measure(path: Path) -> tuple[int, bool]:
        data = path.read_bytes()
        converted = to_crlf(data)
        return len(converted), converted is data

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the commands --------------------------------------------------------------------------

    def get(self, number: int) -> Entry | None:
        """The live (not deleted) message with this 1-based number."""
        if 1 <= number <= len(self.entries):
            entry = self.entries[number - 1]
            if not entry.deleted:
                return entry
        return None

    def stat(self) -> tuple[int, int]:
        live = [e for e in self.entries if not e.deleted]
        return len(live), sum(e.size for e in live)

    def file(self, entry: Entry) -> Path:
        return self.path / entry.subdir / entry.name

    def read(self, entry: Entry) -> bytes:
        data = self.file(entry).read_bytes()
        return data if entry.crlf else to_crlf(data)

    def reset(self) -> None:
        for e in self.entries:
            e.deleted = False

    def update(self) -> int:
        """The UPDATE state (RFC 1939 §6): delete what was marked; move what was read to cur/.

        Returns how many deletions failed (the answer to QUIT is then -ERR).
        """
        failed = 0
        for e in self.entries:
            src = self.file(e)
            try:
                if e.deleted:
                    os.unlink(src)
                elif e.retrieved and e.subdir == "new":
                    os.rename(src, self.path / "cur" / f"{e.name}:2,S")
            except FileNotFoundError:
                continue  # removed by someone else meanwhile: the end result is the same
            except OSError:
                failed += 1 if e.deleted else 0
        return failed
