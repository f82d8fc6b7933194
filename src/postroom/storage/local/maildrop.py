"""The Maildir backend of :class:`postroom.storage.interfaces.Maildrop` (POP3's view of a mailbox).

At login ``new/`` and ``cur/`` are listed once (the snapshot): message numbers refer to it, and
mail arriving meanwhile appears in the next session. Sizes come from the file names, never from
reading bodies: ``,W=`` is the size with CRLF line ends (Dovecot's field, and what RETR sends),
``,S=`` the file's own size. Files are stored with LF line ends (postroom's writer, Dovecot,
Postfix), or with CRLF (older postroom files, some tools): each bare LF goes out as CRLF (RFC
1939 §3; a CRLF file is recognised by counting), so LIST and STAT equal the octets RETR sends
(RFC 1939 §5). A file whose octets do not come to its ``,W=`` (a tool named it wrongly) is not
sent, and its size fields are taken out of its name, so the next session measures it. Files
from other tools without ``,W=`` are measured once and remembered in a small cache file, so
that the next session does not read them again.
An entry that is no regular file (a directory, a FIFO, a device, a symbolic link, which may
point anywhere) or cannot be read is left out with a warning: it must neither lock the user
out, nor hang the login, nor serve a file from elsewhere. A file is opened without following
links or blocking, and read only if it is still a regular file of the size listed.

UIDLs are the Maildir unique names (the base name up to the first ``,`` or ``:``, as Dovecot
keys them; hashed if unfit for RFC 1939 §7), so they survive flag changes, are stable across
sessions and are never reused; messages moved over from Dovecot keep the UIDL Dovecot gave
them (the mailbox's UIDL map, written by ``dovecot_import.py``). Deletions are applied only by
:meth:`MaildirMaildrop.update` (RFC 1939 §6), written down before the first is made, so that
the next session finishes those a crash cut short: a QUIT deletes all or none. Messages
retrieved and kept move from ``new/`` to ``cur/`` with the ``S`` (seen) flag added to the
flags their names have at that moment (another tool may have set some during the session), as
Maildir readers expect.

One session per mailbox: an exclusive ``flock`` on a lock file, held for the session and
released by the kernel when the descriptor is closed or the process dies, so a crashed session
never locks a mailbox for good. Listing, locking, large reads and the UPDATE run in the blocking
pool's threads; a small message (the common case) is read on the event loop, which costs less
than the hand-off to a thread when the file is in the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import threading
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from postroom.blocking import BlockingPool
from postroom.errors import MailboxInUse
from postroom.storage.interfaces import MessageInfo
from postroom.storage.local import files, maildir
from postroom.storage.local.dovecot_import import load_uidl_map
from postroom.wire.framing import CrlfConverter, to_crlf

LOCK_NAME = ".postroom-pop3.lock"
SIZE_CACHE = ".postroom-pop3-sizes"
# The deletions of a QUIT under way: made whole by the next session if a crash cut them short.
EXPUNGING = ".postroom-pop3-expunge"
READ_CHUNK = 1 << 18
SMALL_MESSAGE = 1 << 18  # read on the event loop in one go; larger ones stream from a thread
UPDATE_THREADS = 4
PARALLEL_UPDATE_MIN = 256  # below this, one thread: the hand-off would cost more than it saves
_UID = re.compile(r"[\x21-\x7e]{1,70}")  # RFC 1939 §7
_DIGITS = re.compile(r"[0-9]+")  # a size in the cache file
_pool: ThreadPoolExecutor | None = None
log = logging.getLogger("postroom")


def _update_pool() -> ThreadPoolExecutor:
    """The threads that share a large UPDATE (made on first use, shared by all sessions)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(UPDATE_THREADS, thread_name_prefix="pop3-update")
    return _pool


@dataclass(slots=True)
class MaildirFile:
    """One message of the snapshot, as a file."""

    subdir: str  # "new" or "cur"
    name: str  # file name in that directory
    size: int  # octets as sent by RETR (CRLF line ends, before dot-stuffing)
    uid: str
    raw: int | None = None  # the file's size, when the name says it (``,S=``)
    ino: int = 0  # its inode, when another file has the same unique name (0: not looked at)
    measured: bool = False  # ``size`` was measured (it counts the CRLF RETR adds to an
    # unterminated last line), not read from the name

    @property
    def base(self) -> str:
        """The Maildir unique name, without the ``:2,FLAGS`` info."""
        return self.name.split(":", 1)[0]

    @property
    def unique(self) -> str:
        """The unique part of the name, before any hash (see :func:`unique_part`)."""
        return unique_part(self.name)


def unique_part(name: str) -> str:
    """The unique part of a Maildir file name: up to the first ``,`` or ``:``."""
    return name.split(":", 1)[0].split(",", 1)[0]


def unique_id(name: str) -> str:
    """The UIDL of a Maildir file name: its unique part (hashed if unfit for RFC 1939)."""
    return as_uidl(unique_part(name))


def as_uidl(value: str) -> str:
    """``value`` if it may be a UIDL (RFC 1939 §7: 1 to 70 characters 0x21-0x7E), else 40 hex
    digits of its SHA-256: the same value always gives the same UIDL."""
    if _UID.fullmatch(value):
        return value
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def sizes_from_name(name: str) -> tuple[int | None, int | None]:
    """``(S, W)`` of a file name: the file's size and its size with CRLF line ends (Dovecot's
    fields). ``,S=`` alone (Courier, maildrop) does not give the octets RETR sends for an LF
    file; such a file is measured (RFC 1939 §5: exact sizes)."""
    s = w = None
    for part in name.split(":", 1)[0].split(",")[1:]:
        key, sep, value = part.partition("=")
        if sep and value.isdigit():
            if key == "S":
                s = int(value)
            elif key == "W":
                w = int(value)
    return s, w


class LocalMaildrops:
    """Opens the Maildir of an account under ``data_dir`` (see :func:`maildir.mailbox_path`)."""

    def __init__(self, data_dir: Path, io: BlockingPool) -> None:
        self.data_dir = data_dir
        self.io = io

    def maildrop(self, key: str) -> MaildirMaildrop:
        return MaildirMaildrop(maildir.mailbox_path(self.data_dir, key), self.io)


class MaildirMaildrop:
    """The locked snapshot of one Maildir."""

    def __init__(self, path: Path, io: BlockingPool) -> None:
        self.path = path
        self.io = io
        self.files: list[MaildirFile] = []
        self._lock_fd: int | None = None
        # new/ and cur/, open for the session: files are opened, renamed and unlinked relative
        # to them, which saves a path walk per message.
        self._dirs: dict[str, int] = {}
        self._moved: dict[str, list[tuple[str, str]]] | None = None  # see locate
        self._moved_lock = threading.Lock()  # (an UPDATE's slices run in several threads)

    # -- the interface ---------------------------------------------------------------------

    async def open(self) -> list[MessageInfo]:
        await self.io.run(self.open_now)
        return [MessageInfo(f.size, f.uid) for f in self.files]

    def read_now(self, number: int) -> bytes | None:
        f = self.files[number - 1]
        if f.size > SMALL_MESSAGE:
            return None
        return self.read(f)

    async def chunks(self, number: int) -> AsyncGenerator[bytes, None]:
        """The message in pieces as RETR sends them; OSError, also midway, when they would not
        come to the size the listing announced (another program truncated or appended to the
        file meanwhile): the +OK said that many octets, so the session drops the connection
        rather than end a short or longer message with its dot as if it were whole."""
        f = self.files[number - 1]
        fd = await self.io.run(self._open_fd, f)
        try:
            conv = CrlfConverter()
            sent, last = 0, b"\n"
            while piece := await self.io.run(os.read, fd, READ_CHUNK):
                out = conv.feed(piece)
                sent, last = sent + len(out), piece[-1:]
                if sent > f.size:
                    self._changed(f)
                    raise OSError(errno.EIO, f"{f.name} grew while it was sent")
                if out:
                    yield out
            tail = conv.finish()
            if sent + len(tail) not in _expected(f, last):
                self._changed(f)
                raise OSError(errno.EIO, f"{f.name} changed while it was sent")
            if tail:
                yield tail
        finally:
            os.close(fd)

    async def update(self, deleted: Sequence[int], seen: Sequence[int]) -> int:
        return await self.io.run(self.update_now, deleted, seen)

    async def close(self) -> None:
        self.close_now()

    # -- the blocking work -----------------------------------------------------------------

    def open_now(self) -> None:
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
            self._finish_expunge()
            self.files = self._snapshot()
        except BaseException:
            self.close_now()
            raise

    def close_now(self) -> None:
        """Release the lock (nothing is applied: that is :meth:`update`)."""
        for dir_fd in self._dirs.values():
            os.close(dir_fd)
        self._dirs.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def listing(self) -> list[MaildirFile]:
        """The messages as a POP3 session lists them (their UIDLs, sizes, only regular files),
        without taking the mailbox's lock: for ``db import``."""
        return self._snapshot()

    def _snapshot(self) -> list[MaildirFile]:
        files: list[MaildirFile] = []
        unknown: list[tuple[str, str]] = []
        for subdir in ("cur", "new"):
            with os.scandir(self.path / subdir) as it:
                for e in it:
                    name = e.name
                    if name.startswith("."):
                        continue
                    # A directory, FIFO, device or link is no message (a link may point
                    # anywhere: at the server's TLS key, another user's mail).
                    if not e.is_file(follow_symlinks=False):
                        log.warning(
                            "maildir %s: %s/%s is no message: left out", self.path, subdir, name
                        )
                        continue
                    raw, wire = sizes_from_name(name)
                    if wire is None:
                        unknown.append((subdir, name))
                    else:
                        files.append(MaildirFile(subdir, name, wire, unique_id(name), raw))
        if unknown:
            files += self._measure_all(unknown)
        # Oldest first: Maildir unique names start with the delivery time in seconds.
        files.sort(key=lambda f: f.base)
        kept = load_uidl_map(self.path)  # UIDLs of messages moved over from Dovecot
        if not kept and len({f.uid for f in files}) == len(files):
            return files  # (nearly always)
        # Files that tie on their names are ordered by inode, which a rename (new/ to cur/, a
        # change of flags) keeps: which of them keeps the bare name does not swap between
        # sessions (RFC 1939 §7, "persistent"), as the order of a directory listing would.
        for f in files:
            f.ino = self._inode(f)
        files.sort(key=lambda f: (f.base, f.ino))
        given: set[str] = set()
        for f in files:
            # (The map is keyed by the unique name itself: one over 70 characters, a long
            # hostname's, has a hashed UIDL of its own, which the map never names.)
            source = kept.get(f.unique) if kept else None
            uid = as_uidl(source) if source is not None else f.uid
            # RFC 1939 §7: unique in the maildrop. One the source gave two messages stays the
            # older one's; the other keeps its own. Two files with one unique name (a copy
            # that should have been a move, by some other tool): the later gets its size
            # added, which a change of flags leaves alone.
            if uid in given:
                uid = f.uid
            extra = 0
            while uid in given:
                extra += 1
                uid = as_uidl(f"{f.uid}.{f.size}" + (f".{extra}" if extra > 1 else ""))
            f.uid = uid
            given.add(uid)
        return files

    def _inode(self, f: MaildirFile) -> int:
        try:
            return os.stat(self.path / f.subdir / f.name, follow_symlinks=False).st_ino
        except OSError:  # gone meanwhile: it is left out when read
            return 0

    def _measure_all(self, names: list[tuple[str, str]]) -> list[MaildirFile]:
        """Sizes of files without ``,W=``, through the cache: keyed by unique name, inode and
        ctime (two files with one unique name, a copy another tool made, are two entries; a
        file rewritten in place is measured again, also when the tool set its mtime back, as
        ``cp -p`` does: no tool sets a ctime; a rename changes it too, one more measure),
        checked against the raw size. An entry RETR finds wrong is dropped (:meth:`_changed`)."""
        cache_path = self.path / SIZE_CACHE
        cache: dict[str, tuple[int, int]] = {}
        try:
            for line in cache_path.read_text("utf-8", "surrogateescape").splitlines():
                key, raw_text, crlf_text = line.rsplit("\t", 2)
                if not (_DIGITS.fullmatch(raw_text) and _DIGITS.fullmatch(crlf_text)):
                    raise ValueError("not a size")  # ("-5", "1_000", "٣": int() takes them)
                cache[key] = (int(raw_text), int(crlf_text))
        except (OSError, ValueError):
            cache = {}
        fresh: dict[str, tuple[int, int]] = {}
        files: list[MaildirFile] = []
        for subdir, name in names:
            path = self.path / subdir / name
            uid = unique_id(name)
            try:
                st = path.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):  # replaced since the listing
                    raise OSError("not a regular file")
                key = f"{uid}\t{st.st_ino}\t{st.st_ctime_ns}"
                known = cache.get(key)
                if known is None or known[0] != st.st_size:
                    known = (st.st_size, measure(path))
            except FileNotFoundError:
                continue
            except OSError as exc:  # unreadable: one message left out, not the whole mailbox
                log.warning("maildir %s: %s/%s left out: %s", self.path, subdir, name, exc)
                continue
            raw, size = known
            fresh[key] = (raw, size)
            # Not marked CRLF (raw None): a measured file is always converted on the way out.
            files.append(MaildirFile(subdir, name, size, uid, measured=True))
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
        return files

    def file(self, f: MaildirFile) -> Path:
        return self.path / f.subdir / f.name

    def locate(self, f: MaildirFile) -> Path:
        """Find a message moved by another Maildir tool (new -> cur, flags) and follow it.

        The folders are listed once for all the messages moved (an UPDATE after a tool moved
        8,000 took 10 s when each miss listed them again), and listed anew when what they said
        is stale. Of two files with the message's unique name (a tool's copy), the one with
        its inode. Raises FileNotFoundError if the message is gone.
        """
        for fresh in (False, True):
            with self._moved_lock:
                if fresh or self._moved is None:
                    self._moved = self._list_moved()
                candidates = self._moved.get(f.base, [])
            if len(candidates) > 1 and f.ino:
                candidates = [c for c in candidates if self._ino(*c) == f.ino]
            for subdir, name in candidates:
                if _exists(name, self._dirs[subdir]):
                    f.subdir, f.name = subdir, name
                    return self.path / subdir / name
        raise FileNotFoundError(str(self.file(f)))

    def _list_moved(self) -> dict[str, list[tuple[str, str]]]:
        """Every file of ``cur/`` and ``new/`` by its Maildir unique name."""
        out: dict[str, list[tuple[str, str]]] = {}
        for subdir in ("cur", "new"):
            with os.scandir(self.path / subdir) as it:
                for e in it:
                    out.setdefault(e.name.split(":", 1)[0], []).append((subdir, e.name))
        return out

    def _ino(self, subdir: str, name: str) -> int:
        try:
            return os.stat(name, dir_fd=self._dirs[subdir], follow_symlinks=False).st_ino
        except OSError:
            return 0

    def _open_fd(self, f: MaildirFile) -> int:
        """The message's file, open; OSError unless it is still a regular file whose size
        is the one listed (another program may have put anything under its name since: a
        FIFO would hang the open, a larger file the read and the octet count)."""
        # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of blocking.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            try:
                fd = os.open(f.name, flags, dir_fd=self._dirs[f.subdir])
            except FileNotFoundError:
                fd = os.open(self.locate(f), flags)
        except OSError as exc:  # a link put in its place (ELOOP), say
            if not isinstance(exc, FileNotFoundError):
                log.warning("maildir %s: %s/%s not sent: %s", self.path, f.subdir, f.name, exc)
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "no longer a regular file")
            if st.st_size != (f.raw if f.raw is not None else st.st_size):
                self._unsized(f)
                raise OSError(errno.EINVAL, "its size is not the one its name says")
            if f.raw is None and st.st_size > f.size:  # (its CRLF form is never smaller)
                raise OSError(errno.EINVAL, "changed since the listing")
            os.set_blocking(fd, True)
        except BaseException as exc:
            os.close(fd)
            if not isinstance(exc, FileNotFoundError):
                log.warning("maildir %s: %s/%s not sent: %s", self.path, f.subdir, f.name, exc)
            raise
        return fd

    def _unsized(self, f: MaildirFile) -> None:
        """Take the sizes out of the name of a file whose ``,S=`` is wrong (changed since, or
        named so by some tool): the next session measures it (as Dovecot renames it). Its
        UIDL, the part before the sizes, stays."""
        head, sep, info = f.name.partition(":")
        unique, *fields = head.split(",")
        kept = [x for x in fields if x.partition("=")[0] not in ("S", "W")]
        fixed = ",".join([unique, *kept]) + sep + info
        dir_fd = self._dirs[f.subdir]
        if fixed != f.name and not _exists(fixed, dir_fd):
            with contextlib.suppress(OSError):
                os.rename(f.name, fixed, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                f.name = fixed

    def read(self, f: MaildirFile) -> bytes:
        """The whole message with CRLF line ends.

        One ``read`` of the file's size (from ``,S=``) plus one octet does for a file whose size
        matches its name: the short read is the end of the file. Any other file is read on
        until ``read`` returns nothing.
        """
        fd = self._open_fd(f)
        try:
            expect = f.raw if f.raw is not None else f.size
            data = os.read(fd, expect + 1)
            if len(data) != expect:
                parts = [data]
                while piece := os.read(fd, READ_CHUNK):
                    parts.append(piece)
                data = b"".join(parts)
        finally:
            os.close(fd)
        # (Also when ``,S=`` equals ``,W=``: a tool may have named a file with bare LFs so,
        # which sent as it is would end the message early at a "\n.\n" and inject the rest.)
        out = to_crlf(data)
        if len(out) not in _expected(f, data[-1:] or b"\n"):  # (chunks() says why: an error)
            self._changed(f)
            log.warning(
                "maildir %s: %s/%s not sent: changed since the listing", self.path, f.subdir, f.name
            )
            raise OSError(errno.EIO, f"{f.name} changed since the listing")
        return out

    def _changed(self, f: MaildirFile) -> None:
        """A file not of its listed size: a measured one's cache entry is dropped (the whole
        cache: it is only that), a named one's sizes taken out of its name (a wrong ``,W=``
        would refuse it in every session), so the next session measures it again."""
        if f.measured:
            with contextlib.suppress(OSError):
                os.unlink(self.path / SIZE_CACHE)
        else:
            self._unsized(f)

    def update_now(self, deleted: Sequence[int], seen: Sequence[int]) -> int:
        """The UPDATE state (RFC 1939 §6): delete what was marked; mark what was read as seen.

        Large batches are split over a few threads: an unlink holds the directory's lock only
        for the name, while freeing the inode's blocks (most of its cost) runs in parallel.
        """
        work: list[tuple[MaildirFile, bool]] = [(self.files[n - 1], False) for n in deleted]
        if deleted:
            self._intend([f for f, _seen in work])
        work += [(self.files[n - 1], True) for n in seen if seen_name(self.files[n - 1])]
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
        if deleted:  # (also when some failed: QUIT says so, and they stay)
            with contextlib.suppress(OSError):
                (self.path / EXPUNGING).unlink(missing_ok=True)
        return sum(r[0] for r in results)

    def _intend(self, doomed: list[MaildirFile]) -> None:
        """Write down the deletions before the first is made: a session killed among them
        (kill -9, a crash) leaves the rest to the next session (:meth:`_finish_expunge`), so a
        QUIT deletes all it was given or none, never some (a client that retrieved them all
        would otherwise fetch those left a second time)."""
        # NUL after each: the one octet no file name holds (a line end may, and split there it
        # named another message); a name that is no UTF-8 goes as its own octets.
        names = "".join(f"{f.subdir}/{f.name}\0" for f in doomed).encode("utf-8", "surrogateescape")
        try:
            files.replace_durably(self.path / EXPUNGING, names, self.path / f"{EXPUNGING}.tmp")
            files.fsync_dir(self.path)
        except OSError as exc:  # (a full disk: the deletions are made all the same)
            log.warning("maildir %s: deletions not written down first: %s", self.path, exc)

    def _finish_expunge(self) -> None:
        """The deletions of a QUIT a crash cut short (see :meth:`_intend`), made now: names
        gone already (deleted, or moved by another tool since) are passed over."""
        with contextlib.suppress(OSError):  # (of a write a crash cut short)
            (self.path / f"{EXPUNGING}.tmp").unlink(missing_ok=True)
        try:
            listed = (self.path / EXPUNGING).read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            return
        entries = listed.split("\0")[:-1]  # (written whole: by a rename, see _intend)
        changed: set[str] = set()
        for entry in entries:
            subdir, _, name = entry.partition("/")
            if subdir in self._dirs and name and "/" not in name:
                with contextlib.suppress(OSError):  # (gone already; or it stays, as at QUIT)
                    os.unlink(name, dir_fd=self._dirs[subdir])
                    changed.add(subdir)
        for subdir in changed:
            with contextlib.suppress(OSError):
                os.fsync(self._dirs[subdir])
        log.warning(
            "maildir %s: the deletions of a session cut short (%d) made now",
            self.path,
            len(entries),
        )
        with contextlib.suppress(OSError):
            (self.path / EXPUNGING).unlink(missing_ok=True)

    def _apply_all(self, work: list[tuple[MaildirFile, bool]]) -> tuple[int, set[str]]:
        """Apply a slice of the UPDATE; (deletions failed, subdirectories changed)."""
        failed = 0
        told = False
        changed: set[str] = set()
        for f, seen in work:
            try:
                self._apply(f, seen)
            except FileNotFoundError:
                continue  # removed by someone else meanwhile: the end result is the same
            except OSError as exc:
                failed += 0 if seen else 1
                if not told:  # the first of a slice: a whole mailbox may fail alike
                    told = True
                    what = "marked seen" if seen else "removed"
                    log.warning(
                        "maildir %s: %s/%s not %s: %s", self.path, f.subdir, f.name, what, exc
                    )
                continue
            changed.add(f.subdir)
            if seen:
                changed.add("cur")
        return failed, changed

    def _apply(self, f: MaildirFile, seen: bool) -> None:
        """Unlink the message, or (``seen``) move it to ``cur/`` with the S flag added to the
        flags its name has now (another tool may have set some since the listing)."""
        for attempt in (1, 2):
            if attempt == 2:
                self.locate(f)  # moved by another tool? FileNotFoundError if gone
            src_fd = self._dirs[f.subdir]
            try:
                if not seen:
                    os.unlink(f.name, dir_fd=src_fd)
                elif (target := seen_name(f)) and not _exists(target, self._dirs["cur"]):
                    # (Another message under that name, a tool's slip: rename would replace
                    # it. This one stays unmarked instead.)
                    os.rename(f.name, target, src_dir_fd=src_fd, dst_dir_fd=self._dirs["cur"])
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def seen_name(f: MaildirFile) -> str | None:
    """The name in ``cur/`` that marks ``f`` seen (Maildir's ``:2,`` flags, S added, in
    ASCII order), or None if it is marked already."""
    if f.subdir == "new" and ":2," not in f.name:
        return f"{f.name}:2,S"
    head, sep, flags = f.name.partition(":2,")
    if not sep:
        return None  # a name in cur/ without flags of the form we know: left as it is
    if "S" in flags and f.subdir == "cur":
        return None
    return f"{head}:2,{''.join(sorted(set(flags + 'S')))}"


def _expected(f: MaildirFile, last: bytes) -> tuple[int, ...]:
    """The octets a file of ``f``'s listed size may give RETR before the CRLF it adds after
    an unterminated last line (``last``: the file's last octet): a measured size counts that
    CRLF; a ``,W=`` another tool wrote may or may not (postroom's own files end their lines;
    one without it lists 2 octets short, and a re-probe found one with it refused)."""
    if last == b"\n":
        return (f.size,)
    return (f.size - 2,) if f.measured else (f.size, f.size - 2)


def measure(path: Path) -> int:
    """The octets RETR sends for a file (before stuffing), read in pieces: each bare LF
    becomes CRLF, and a last line without a line end gets one (RFC 1939 §3). OSError unless
    it is a regular file: opened without following a link or blocking, as RETR opens it (a
    FIFO renamed in since the listing would hang the login, holding the mailbox's lock)."""
    fd = files.open_regular(path, follow_links=False)
    size = 0
    last = b"\n"
    conv = CrlfConverter()
    with open(fd, "rb") as fh:
        while piece := fh.read(READ_CHUNK):
            size += len(conv.feed(piece))
            last = piece[-1:]
    return size + len(conv.finish()) + (0 if last == b"\n" else 2)
