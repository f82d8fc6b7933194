"""A POP3 maildrop: the user's Maildir as seen by one session (RFC 1939 semantics).

At login the Maildir's ``new/`` and ``cur/`` are listed once (the snapshot): message numbers
refer to it, and mail arriving meanwhile appears in the next session. Sizes come from the file
names, never from reading bodies: ``,W=`` (Dovecot's CRLF size) if present, else ``,S=``
(postroom writes CRLF files, so that is the octet count RETR sends). Files from other tools
without either are measured once, counting each bare LF as CRLF, and remembered in a small
cache file so that the next session does not read them again. Every message goes out with CRLF
line ends (RFC 1939 §3), so LIST and STAT equal the octets RETR sends.

UIDLs are the Maildir unique names (the base name up to the first ``,`` or ``:``, as Dovecot
keys them; hashed if unfit for RFC 1939 §7), so they survive flag changes, are stable across
sessions and are never reused; messages imported from Dovecot keep the UIDL Dovecot gave them
(the mailbox's UIDL map, see ``dovecot_import.py``). Deletions are applied only at QUIT (the
UPDATE state, RFC 1939 §6); a dropped connection deletes nothing. Messages retrieved and kept
move from ``new/`` to ``cur/`` with the ``S`` (seen) flag, as Maildir readers expect.

One session per mailbox: an exclusive ``flock`` on a lock file, held for the session and
released by the kernel when the descriptor is closed or the process dies, so a crashed session
never locks a mailbox for good.

All methods do blocking file work: the asyncio glue calls them from a worker thread (or inline
for small, fast operations). :class:`CrlfConverter` and :class:`TopFilter` are pure.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from postroom.storage.local import maildir
from postroom.storage.local.dovecot_import import load_uidl_map
from postroom.wire.framing import to_crlf

LOCK_NAME = ".postroom-pop3.lock"
SIZE_CACHE = ".postroom-pop3-sizes"
READ_CHUNK = 1 << 18
UPDATE_THREADS = 4
PARALLEL_UPDATE_MIN = 256  # below this, one thread: the hand-off would cost more than it saves
_pool: ThreadPoolExecutor | None = None


def _update_pool() -> ThreadPoolExecutor:
    """The threads that share a large UPDATE (made on first use, shared by all sessions)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(UPDATE_THREADS, thread_name_prefix="pop3-update")
    return _pool


class MailboxInUse(Exception):
    """Another session holds the mailbox (answered with ``-ERR [IN-USE]``, RFC 2449 §8.1.1)."""


@dataclass(slots=True)
class Entry:
    """One message of the snapshot."""

    subdir: str  # "new" or "cur"
    name: str  # file name in that directory
    size: int  # octets as sent by RETR (CRLF line ends, before dot-stuffing)
    uid: str
    crlf: bool = False  # known to have CRLF line ends only (see :func:`crlf_only`)
    deleted: bool = False
    retrieved: bool = False

    @property
    def base(self) -> str:
        """The Maildir unique name, without the ``:2,FLAGS`` info."""
        return self.name.split(":", 1)[0]


def unique_id(name: str) -> str:
    """The UIDL of a Maildir file name: its unique part, up to the first ``,`` or ``:``."""
    base = name.split(":", 1)[0].split(",", 1)[0]
    # RFC 1939 §7: 1 to 70 characters in the range 0x21 to 0x7E.
    if 0 < len(base) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in base):
        return base
    return hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def size_from_name(name: str) -> int | None:
    """``,W=`` from a file name: the size with CRLF line ends (Dovecot's field), which is what
    RETR sends. ``,S=`` alone is the file's size: Courier and maildrop name LF files so, and
    their RETR is longer than that; such a file is measured (RFC 1939 §5: exact sizes)."""
    return maildir.name_field(name, "W")


def crlf_only(name: str) -> bool:
    """True if the name promises a file with no bare LF: ``,S=`` (file size) equals ``,W=``
    (size with every LF as CRLF), as postroom and Dovecot name CRLF files. RETR then sends
    the file as it is, without scanning it for line ends."""
    wire = maildir.name_field(name, "W")
    return wire is not None and wire == maildir.name_field(name, "S")


class CrlfConverter:
    """Turns bare LF into CRLF in a stream of pieces; joined output == ``to_crlf(whole)``.

    The only state carried between pieces is a CR that ended one piece: it may pair with an
    LF at the start of the next.
    """

    def __init__(self) -> None:
        self._cr = b""

    def feed(self, data: bytes) -> bytes:
        data = self._cr + data
        self._cr = b"\r" if data.endswith(b"\r") else b""
        return to_crlf(data[: len(data) - len(self._cr)])

    def finish(self) -> bytes:
        out, self._cr = self._cr, b""
        return out


class TopFilter:
    """Passes the header section, the blank line and ``lines`` body lines (RFC 1939 §7 TOP).

    Fed CRLF text in pieces; the joined output does not depend on how it was cut, and
    :attr:`done` turns True once nothing more is needed. A message without a blank line is all
    header and is passed whole.
    """

    def __init__(self, lines: int) -> None:
        self.lines = lines
        self.done = False
        self._in_body = False
        # The last octets of the header section seen so far, to find CRLF CRLF across pieces;
        # it starts as a line end so that a message opening with an empty line has no header.
        self._tail = b"\r\n"
        self._cr = False  # the body so far ends with CR (its LF may come next)

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        out = b""
        if not self._in_body:
            text = self._tail + data
            end = text.find(b"\r\n\r\n")
            if end < 0:
                self._tail = text[-3:]
                return data
            cut = end + 4 - len(self._tail)  # where the body starts in ``data``
            out, data = data[:cut], data[cut:]
            self._in_body = True
        if self.lines == 0:
            self.done = True
            return out
        prefix = b"\r" if self._cr else b""
        text = prefix + data
        pos = 0
        while self.lines > 0:
            i = text.find(b"\r\n", pos)
            if i < 0:
                break
            pos = i + 2
            self.lines -= 1
        if self.lines == 0:
            self.done = True
            return out + text[len(prefix) : pos]
        self._cr = text.endswith(b"\r")
        return out + data


class Maildrop:
    """The locked snapshot of one Maildir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[Entry] = []
        self._lock_fd: int | None = None
        # new/ and cur/, open for the session: files are opened, renamed and unlinked relative
        # to them, which saves a path walk per message.
        self._dirs: dict[str, int] = {}

    # -- open and close --------------------------------------------------------------------

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
        try:
            for subdir in ("new", "cur"):
                self._dirs[subdir] = os.open(
                    self.path / subdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                )
            self.entries = self._snapshot()
        except BaseException:
            self.close()
            raise

    def _snapshot(self) -> list[Entry]:
        entries: list[Entry] = []
        unknown: list[tuple[str, str]] = []
        for subdir in ("cur", "new"):
            with os.scandir(self.path / subdir) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    size = size_from_name(e.name)
                    if size is None:
                        unknown.append((subdir, e.name))
                        continue
                    entries.append(
                        Entry(subdir, e.name, size, unique_id(e.name), crlf_only(e.name))
                    )
        if unknown:
            entries += self._measure_all(unknown)
        kept = load_uidl_map(self.path)  # UIDLs of messages moved over from Dovecot
        if kept:
            for entry in entries:
                entry.uid = kept.get(entry.uid, entry.uid)
        # Oldest first: Maildir unique names start with the delivery time in seconds.
        entries.sort(key=lambda en: en.base)
        return entries

    def _measure_all(self, files: list[tuple[str, str]]) -> list[Entry]:
        """Sizes of files without ``,W=``, through the cache (keyed by name and raw size)."""
        cache_path = self.path / SIZE_CACHE
        cache: dict[str, tuple[int, int]] = {}
        try:
            for line in cache_path.read_text("utf-8", "surrogateescape").splitlines():
                key, raw_text, crlf_text = line.rsplit("\t", 2)
                cache[key] = (int(raw_text), int(crlf_text))
        except (OSError, ValueError):
            cache = {}
        fresh: dict[str, tuple[int, int]] = {}
        entries: list[Entry] = []
        for subdir, name in files:
            path = self.path / subdir / name
            uid = unique_id(name)
            try:
                raw = path.stat().st_size
            except FileNotFoundError:
                continue
            known = cache.get(uid)
            if known is not None and known[0] == raw:
                size = known[1]
            else:
                try:
                    size = measure(path)
                except FileNotFoundError:
                    continue
            fresh[uid] = (raw, size)
            entries.append(Entry(subdir, name, size, uid))
        if fresh != cache:
            tmp = cache_path.with_name(SIZE_CACHE + ".tmp")
            try:
                tmp.write_text(
                    "".join(f"{u}\t{r}\t{s}\n" for u, (r, s) in fresh.items()),
                    "utf-8",
                    "surrogateescape",
                )
                os.replace(tmp, cache_path)
            except OSError:
                pass  # only a cache: the next session measures again
        return entries

    def close(self) -> None:
        """Release the lock (nothing is applied: that is :meth:`update`)."""
        for dir_fd in self._dirs.values():
            os.close(dir_fd)
        self._dirs.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the commands ----------------------------------------------------------------------

    def get(self, number: int) -> Entry | None:
        """The live (not deleted) message with this 1-based number."""
        if 1 <= number <= len(self.entries):
            entry = self.entries[number - 1]
            if not entry.deleted:
                return entry
        return None

    def stat(self) -> tuple[int, int]:
        count = size = 0
        for e in self.entries:
            if not e.deleted:
                count += 1
                size += e.size
        return count, size

    def listing(self, uids: bool) -> bytes:
        """The body of LIST or UIDL without an argument, ending with ``.\\r\\n``."""
        if uids:
            lines = [f"{i} {e.uid}\r\n" for i, e in enumerate(self.entries, 1) if not e.deleted]
        else:
            lines = [f"{i} {e.size}\r\n" for i, e in enumerate(self.entries, 1) if not e.deleted]
        lines.append(".\r\n")
        return "".join(lines).encode()

    def file(self, entry: Entry) -> Path:
        return self.path / entry.subdir / entry.name

    def locate(self, entry: Entry) -> Path:
        """Find a message moved by another Maildir tool (new -> cur, flags) and follow it.

        Raises FileNotFoundError if the message is gone.
        """
        base = entry.base
        for subdir in ("cur", "new"):
            with os.scandir(self.path / subdir) as it:
                for e in it:
                    if e.name == base or e.name.startswith(base + ":"):
                        entry.subdir, entry.name = subdir, e.name
                        return self.path / subdir / e.name
        raise FileNotFoundError(str(self.file(entry)))

    def _open_fd(self, entry: Entry) -> int:
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            return os.open(entry.name, flags, dir_fd=self._dirs[entry.subdir])
        except FileNotFoundError:
            return os.open(self.locate(entry), flags)

    def open_message(self, entry: Entry) -> BinaryIO:
        return os.fdopen(self._open_fd(entry), "rb")  # the caller closes it

    def read(self, entry: Entry) -> bytes:
        """The whole message with CRLF line ends (for small messages).

        One ``read`` of the expected size plus one octet does for a file whose size matches
        its name (postroom's own CRLF files): the short read is the end of the file. Any
        other file is read on until ``read`` returns nothing.
        """
        fd = self._open_fd(entry)
        try:
            data = os.read(fd, entry.size + 1)
            if len(data) != entry.size:
                parts = [data]
                while piece := os.read(fd, READ_CHUNK):
                    parts.append(piece)
                data = b"".join(parts)
        finally:
            os.close(fd)
        return data if entry.crlf else to_crlf(data)

    def reset(self) -> None:
        for e in self.entries:
            e.deleted = False

    def update(self) -> int:
        """The UPDATE state (RFC 1939 §6): delete what was marked; mark what was read as seen.

        Returns how many deletions failed (the answer to QUIT is then -ERR, RFC 1939 §6).
        Large batches are split over a few threads: an unlink holds the directory's lock only
        for the name, while freeing the inode's blocks (most of its cost) runs in parallel.
        """
        work: list[tuple[Entry, str | None]] = []
        for e in self.entries:
            if e.deleted:
                work.append((e, None))
            elif not e.retrieved:
                continue
            elif e.subdir == "new":
                work.append((e, f"{e.name}:2,S"))
            elif ":2," in e.name and "S" not in e.name.split(":2,", 1)[1]:
                head, flags = e.name.split(":2,", 1)
                work.append((e, f"{head}:2,{''.join(sorted(flags + 'S'))}"))
        if len(work) < PARALLEL_UPDATE_MIN:
            results = [self._apply_all(work)]
        else:
            step = -(-len(work) // UPDATE_THREADS)
            parts = [work[i : i + step] for i in range(0, len(work), step)]
            results = list(_update_pool().map(self._apply_all, parts))
        changed = set().union(*(r[1] for r in results))
        for subdir in changed:
            # The changes are made; only their durability across a power cut is at stake.
            with contextlib.suppress(OSError):
                os.fsync(self._dirs[subdir])
        return sum(r[0] for r in results)

    def _apply_all(self, work: list[tuple[Entry, str | None]]) -> tuple[int, set[str]]:
        """Apply a slice of the UPDATE; (deletions failed, subdirectories changed)."""
        failed = 0
        changed: set[str] = set()
        for entry, target in work:
            try:
                self._apply(entry, target)
            except FileNotFoundError:
                continue  # removed by someone else meanwhile: the end result is the same
            except OSError:
                failed += 1 if target is None else 0
                continue
            changed.add(entry.subdir)
            if target is not None:
                changed.add("cur")
        return failed, changed

    def _apply(self, entry: Entry, target: str | None) -> None:
        """Unlink the message (``target`` None) or rename it to ``cur/target``."""
        for attempt in (1, 2):
            if attempt == 2:
                self.locate(entry)  # moved by another tool? FileNotFoundError if gone
            src_fd = self._dirs[entry.subdir]
            try:
                if target is None:
                    os.unlink(entry.name, dir_fd=src_fd)
                else:
                    os.rename(entry.name, target, src_dir_fd=src_fd, dst_dir_fd=self._dirs["cur"])
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise


def measure(path: Path) -> int:
    """The octets RETR sends for a file (before stuffing), read in pieces: each bare LF
    becomes CRLF, and a last line without a line end gets one (RFC 1939 §3)."""
    size = 0
    last = b"\n"
    conv = CrlfConverter()
    with open(path, "rb") as fh:
        while piece := fh.read(READ_CHUNK):
            size += len(conv.feed(piece))
            last = piece[-1:]
    return size + len(conv.finish()) + (0 if last == b"\n" else 2)


def chunks(fh: BinaryIO, size: int = READ_CHUNK) -> Iterator[bytes]:
    """The file's contents with CRLF line ends, in pieces of about ``size`` octets."""
    conv = CrlfConverter()
    while piece := fh.read(size):
        out = conv.feed(piece)
        if out:
            yield out
    tail = conv.finish()
    if tail:
        yield tail
