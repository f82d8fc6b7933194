"""The local queue: every message enters through the journal, waits (if it must) in ``queue/``.

One route for every message, whatever its recipients and size. :class:`Draft` stores what the
client sends with LF line ends, in memory while it arrives; a message larger than
:data:`INLINE_LIMIT` is stored in a *body file* in ``journal/bodies/``, written at the end of
DATA if it stayed in memory (up to :data:`HOLD_LIMIT`, within the worker's :class:`HoldBudget`),
else streamed into it as it arrives (a large message is never held whole in memory).
:meth:`LocalQueue.accept` hands the message to this worker's writer process
(:mod:`postroom.storage.local.maildir_writer`), which appends it to the journal and makes it
durable with one ``fdatasync`` shared by every message of the batch (a body file is flushed
beside it), then publishes the local copies: a small body is written once per message and
linked for further recipients; a body file is itself linked into each Maildir, so a large
message is written to the disk once. Remote recipients cost nothing more: the record that
makes the message durable also records their first attempt.

A message with recipients left (remote ones, a copy that failed) is *kept*: this worker's
runner makes its first attempt at once, from memory or the body file. If it is done then, the
journal entry is released; otherwise the message is *parked* in the deferred store
(:mod:`postroom.storage.local.deferred`; the body file is renamed there), so that journal
segments live seconds, not days. The primary worker owns the parked messages: it schedules
them (:meth:`claim`, :meth:`wait`) and records each later attempt there before dialling.

The CLI uses the same class without a writer: it reads the deferred store and the journal
segments of a running server; with no server running it first replays the journal (as the
next start would), so that the deferred store holds everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import heapq
import logging
import os
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

from postroom.blocking import BlockingPool
from postroom.errors import LeaseLost, QueueError, StorageUnavailable, TemporaryStorageError
from postroom.queue.envelope import Attempt, Envelope, check_id, waiting
from postroom.storage.interfaces import LocalCopy, MessageDraft
from postroom.storage.local import files, journal, maildir
from postroom.storage.local.deferred import DeferredStore
from postroom.storage.local.maildir_writer import MaildirWriter
from postroom.wire import bulk
from postroom.wire.framing import to_crlf

log = logging.getLogger("postroom")

INLINE_LIMIT = 64 << 10  # larger messages go to a body file (written once, linked)
HOLD_LIMIT = 1 << 20  # a message up to this size may wait in memory for its end of DATA
TRIM_ABOVE = 8 << 20  # after a rewrite of a message larger than this, freed memory goes back
MOVE_CHUNK = 1 << 20  # octets of a body file read at once to move its client's part
HOLD_BUDGET = 32 << 20  # what one worker holds so beyond INLINE_LIMIT, all drafts together
BOX_CACHE = 10_000
JOURNAL_TRIES = 5  # a PARK or RELEASE is tried again with a new writer if the last one died


class SpareBodies:
    """Empty body files made ahead in a worker thread, their names already flushed.

    Creating an inode is the dearest step of taking a large message (12% of the event loop's
    time at 100 KiB from 20 sessions, measured with py-spy), and the name of a body file must
    be durable before its message is acknowledged: made here, a batch costs one directory
    flush and no time on the event loop. Unused ones are removed at close, or at the next
    start as files no journal record names."""

    LOW, BATCH = 16, 32

    def __init__(self, directory: Path, io: BlockingPool | None) -> None:
        self.directory = directory
        self.io = io
        self._ready: deque[str] = deque()
        self._filling: asyncio.Task[None] | None = None  # a batch being made
        self._made = 0

    def take(self) -> tuple[str, bool]:
        """A path for a body file, and whether it exists with a durable name already."""
        if len(self._ready) < self.LOW:
            self._refill()
        if self._ready:
            return self._ready.popleft(), True
        return self._name(), False

    def _name(self) -> str:
        self._made += 1
        return str(self.directory / f"{os.getpid()}-{self._made}")

    def _refill(self) -> None:
        if self._filling is not None or self.io is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        names = [self._name() for _ in range(self.BATCH)]
        task = self._filling = loop.create_task(self.io.run(self._make, names))
        task.add_done_callback(lambda t: self._done(t, names))

    def _make(self, names: list[str]) -> None:
        for name in names:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        files.fsync_dir(self.directory)

    def _done(self, task: asyncio.Task[None], names: list[str]) -> None:
        self._filling = None
        if not task.cancelled() and task.exception() is None:
            self._ready.extend(names)  # else (disk full) the next start removes them

    async def close(self) -> None:
        """Remove the unused files, those of a batch still being made included."""
        if self._filling is not None:
            await asyncio.wait([self._filling])
        while self._ready:
            with contextlib.suppress(OSError):
                os.unlink(self._ready.pop())


_libc = ctypes.CDLL(None)


def give_back_memory() -> None:
    """Return the heap freed by a large message to the system: glibc keeps it otherwise
    (its mmap threshold rises after the first large free), and a worker stayed at 500 MB."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


class HoldBudget:
    """The octets that a worker's drafts hold in memory beyond :data:`INLINE_LIMIT`.

    A draft that waits for its end of DATA before it writes its body file writes it once,
    in one call, with the fields prepended at the end of DATA already on top; streamed, the
    file is written as the message arrives and then again, moved up under those fields (an
    ``Authentication-Results`` or a DKIM signature comes with nearly every message). Measured
    at 100 KiB from 20 sessions, the streamed body file took 30% of the event loop's time
    (py-spy). The budget bounds the memory this costs: a draft that cannot have more
    streams, as every draft did before."""

    def __init__(self, limit: int = HOLD_BUDGET) -> None:
        self.limit = limit
        self.used = 0
        # A conversion holds several copies of its message at once (a 40 MB submission
        # that leaves took 500 MB): one large one at a time per worker, the others wait.
        self.rewrites = asyncio.Semaphore(1)

    def take(self, octets: int) -> bool:
        if self.used + octets > self.limit:
            return False
        self.used += octets
        return True

    def give(self, octets: int) -> None:
        self.used -= octets


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class Draft:
    """A message being received (see :class:`~postroom.storage.interfaces.MessageDraft`).

    Layout as stored: the ``Return-Path`` line, our trace headers (``make_prefix`` of the
    client's header section, made once that has been seen), header lines prepended at the
    end of DATA, the client's message."""

    def __init__(
        self,
        spares: SpareBodies,
        queue_id: str,
        sender: str,
        make_prefix: Callable[[bytes], bytes] | None,
        header_limit: int,
        budget: HoldBudget | None = None,
        body_file: bool = True,
    ) -> None:
        self.queue_id = queue_id
        self._spares = spares
        self._budget = budget
        self._held = 0  # octets taken from the budget
        # finish() gives a body file (the local queue links it into the Maildirs), a held
        # message written to it at once; else the octets in memory (PostgreSQL keeps them in
        # a row), a streamed message's spill file read back once and removed.
        self._body_file = body_file
        self.fresh = False  # its body file's name is not durable yet
        self._return_path = f"Return-Path: <{sender}>\n".encode()
        self._make_prefix = make_prefix
        self._header_limit = header_limit
        self._prefix = b"" if make_prefix is None else None
        self._client = bytearray()  # in memory, until spilled
        self._tail = b""  # the last octet received while the header section is not whole
        self._cr = False  # a chunk ended in CR: its LF may start the next
        self._client_size = 0
        self._lines = 0  # LF line ends in the client's message
        self._head_end = -1  # where the client's header section ends (its blank line), if known
        self._fd: int | None = None
        self._in_file = 0  # where the client's part starts in the body file
        self._path = ""
        self._crc = 0
        self._failed: OSError | MemoryError | None = None

    # -- receiving --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._cr:
            data = b"\r" + data
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        if self._failed is not None:
            return
        try:
            lf = bulk.crlf_to_lf(data)
            self._lines += len(data) - len(lf)
            self._client_size += len(lf)
            if self._fd is not None:
                self._put(lf)
            else:
                self._client += lf
            if self._prefix is None:
                self._seek_head_end(self._client_size - len(lf), lf)
            # A header section still coming is held under the same budget as a body: past
            # it, it is spilled too (each connection could hold a header_size in memory).
            if self._fd is None and len(self._client) > INLINE_LIMIT and not self._hold():
                self._spill()
        except (OSError, MemoryError) as exc:
            # The rest of DATA is read and dropped; its end gets 452 (a MemoryError under a
            # memory limit too: the session goes on, the client is told why).
            self._failed = exc
            self._give_back()
            self._client = bytearray()
            self._close(unlink=True)

    def _hold(self) -> bool:
        """Keep the client's part in memory a while longer (see :class:`HoldBudget`)."""
        more = len(self._client) - INLINE_LIMIT - self._held
        if self._budget is None or len(self._client) > HOLD_LIMIT or not self._budget.take(more):
            return False
        self._held += more
        return True

    def _give_back(self) -> None:
        if self._budget is not None and self._held:
            self._budget.give(self._held)
        self._held = 0

    def __del__(self) -> None:  # a draft dropped without finish() or abort()
        self._give_back()

    def _seek_head_end(self, seen: int, data: bytes) -> None:
        """The header section's end (its blank line), looked for in ``data``, which follows
        ``seen`` octets of the client's part; once found (or past ``header_limit``) our
        fields are made from it."""
        window = self._tail + data  # a blank line may straddle two chunks
        start = seen - len(self._tail)
        end = window.find(b"\n\n", 0, max(0, self._header_limit + 2 - start))
        if end >= 0:
            self._head_end = start + end + 2
        if end >= 0 or self._client_size > self._header_limit:
            self._take_prefix()
        elif data:
            self._tail = data[-1:]

    def _take_prefix(self) -> None:
        assert self._make_prefix is not None
        limit = self._header_limit + 2
        if self._fd is None:
            head = bytes(self._client[:limit])
        else:  # spilled before its header section was whole
            head = os.pread(self._fd, min(limit, self._client_size), self._in_file)
        self._prefix = self._make_prefix(head)

    def _put(self, data: bytes) -> None:
        assert self._fd is not None
        files.write_all(self._fd, (data,))
        self._crc = zlib.crc32(data, self._crc)

    def _spill(self) -> None:
        self._give_back()
        self._path, durable = self._spares.take()
        self.fresh = not durable
        flags = os.O_RDWR | os.O_CLOEXEC | (0 if durable else os.O_CREAT | os.O_EXCL)
        self._fd = os.open(self._path, flags, 0o600)
        parts = (self._return_path, self._prefix or b"", self._client)
        files.write_all(self._fd, parts)
        for part in parts:
            self._crc = zlib.crc32(part, self._crc)
        self._in_file = len(self._return_path) + len(self._prefix or b"")
        self._client = bytearray()

    async def finish_off_loop(self, io: BlockingPool) -> tuple[bytes, str, int]:
        """:meth:`finish`, in ``io``'s thread when the message is in a body file already:
        moving its client's part up under fields prepended since is a large message's worth
        of I/O, kept off the event loop."""
        return await io.run(self.finish) if self._fd is not None else self.finish()

    # -- reading ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._return_path) + len(self._prefix or b"") + (self._client_size)

    @property
    def wire_size(self) -> int:
        """The size with CRLF line ends (every LF counts twice)."""
        head = self._return_path + (self._prefix or b"")
        return self.size + head.count(b"\n") + self._lines

    def head(self, limit: int) -> bytes:
        if self._failed is not None:
            return b""
        if self._head_end >= 0:  # the header section is all a head is read for
            limit = min(limit, self._head_end)
        if self._fd is None:
            return bytes(self._client[:limit])
        return os.pread(self._fd, limit, self._in_file)

    def whole(self) -> bytes:
        if self._failed is not None:
            return b""
        if self._prefix is None:
            self._take_prefix()
        if self._fd is None:
            data = b"".join((self._prefix or b"", self._client))
        else:
            data = (self._prefix or b"") + os.pread(self._fd, self._client_size, self._in_file)
        return to_crlf(data)

    def prepend(self, fields: bytes) -> None:
        if self._failed is not None:
            return
        if self._prefix is None:
            self._take_prefix()
        # A body file is not moved up now, but once, by finish().
        self._prefix = fields.replace(b"\r\n", b"\n") + (self._prefix or b"")

    def replace(self, data: bytes) -> None:
        lf = bulk.crlf_to_lf(data)
        self._prefix, self._head_end = b"", -1
        self._client_size, self._lines = len(lf), len(data) - len(lf)
        if self._fd is None:
            self._client = bytearray(lf)
            return
        self._write_file(lf)

    async def rewrite(
        self, convert: Callable[[bytes], bytes], needed: Callable[[bytes], bool] | None = None
    ) -> None:
        if self._failed is not None:
            return
        if self._client_size <= INLINE_LIMIT or self._budget is None:
            await self._rewrite(convert, needed)
            return
        async with self._budget.rewrites:
            try:
                await self._rewrite(convert, needed)
            finally:
                if self._client_size > TRIM_ABOVE:
                    give_back_memory()

    async def _rewrite(
        self, convert: Callable[[bytes], bytes], needed: Callable[[bytes], bool] | None
    ) -> None:
        if self._fd is None:
            old = bytes(self._client)
        else:
            old = os.pread(self._fd, self._client_size, self._in_file)
        if needed is not None and not needed(old):
            return  # (most mail: no copy of it made at all)
        if len(old) > INLINE_LIMIT:  # passes over a large message: not on the event loop
            new = await asyncio.to_thread(lambda: bulk.crlf_to_lf(convert(to_crlf(old))))
        else:
            new = bulk.crlf_to_lf(convert(to_crlf(old)))
        if new == old:
            return
        self._client_size, self._lines = len(new), new.count(b"\n")
        self._head_end = -1
        if self._make_prefix is not None:
            # Made again from what the message now is (its fields, whether it has a header
            # section at all): nothing was prepended yet (that comes after, see interfaces).
            self._prefix = self._make_prefix(new[: self._header_limit + 2])
        if self._fd is None:
            self._client = bytearray(new)
            return
        self._write_file(new)

    def _write_file(self, client: bytes) -> None:
        """Write the body file anew: the Return-Path line, our fields, ``client``."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._crc = 0
            self._put(self._return_path + (self._prefix or b""))
            self._put(client)
            self._in_file = self.size - self._client_size
        except OSError as exc:
            self._failed = exc

    def _move_up(self) -> None:
        """The client's part moved to just under our fields, which grew since it was written,
        a chunk at a time (from its end when it moves towards it): read whole at once, each
        large message held its size in memory at its end of DATA (20 of 40 MB at once: a
        worker of 800 MB). Then our fields over the start, and the CRC made anew."""
        assert self._fd is not None
        head = self._return_path + (self._prefix or b"")
        old, new, size = self._in_file, len(head), self._client_size
        starts = range(0, size, MOVE_CHUNK)
        for at in reversed(starts) if new > old else starts:
            chunk = os.pread(self._fd, min(MOVE_CHUNK, size - at), old + at)
            _pwrite_all(self._fd, chunk, new + at)
        os.ftruncate(self._fd, new + size)
        _pwrite_all(self._fd, head, 0)
        crc = zlib.crc32(head)
        for at in starts:
            crc = zlib.crc32(os.pread(self._fd, min(MOVE_CHUNK, size - at), new + at), crc)
        self._crc, self._in_file = crc, new
        os.lseek(self._fd, new + size, os.SEEK_SET)

    def finish(self) -> tuple[bytes, str, int]:
        """The stored octets, or a body file with its CRC (never for a draft made with
        ``body_file=False``). Raises the remembered failure."""
        if self._cr:
            self._cr = False
            self._client_size += 1
            (self._put(b"\r") if self._fd is not None else self._client.extend(b"\r"))
        if self._prefix is None and self._failed is None:
            try:  # its header section never ended (no blank line): our fields are made now
                self._take_prefix()
            except OSError as exc:
                self._failed = exc
        if self._fd is None and self._held and self._body_file:  # its body file, at once
            try:
                self._spill()
            except OSError as exc:
                self._failed = exc
                self._close(unlink=True)
        if self._fd is not None and not self._body_file and self._failed is None:
            try:  # a spill file: the client's part is read back once, under our fields
                client = os.pread(self._fd, self._client_size, self._in_file)
            except OSError as exc:
                self._failed = exc
            else:
                self._close(unlink=True)
                return b"".join((self._return_path, self._prefix or b"", client)), "", 0
        if (
            self._fd is not None
            and self._failed is None
            and self._in_file != self.size - self._client_size
        ):
            try:  # fields were prepended: the client's part moves up under them
                self._move_up()
            except OSError as exc:
                self._failed = exc
        if self._failed is not None:
            raise TemporaryStorageError(str(self._failed) or type(self._failed).__name__)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            return b"", self._path, self._crc
        body = b"".join((self._return_path, self._prefix or b"", self._client))
        self._give_back()
        self._client = bytearray()
        return body, "", 0

    def abort(self) -> None:
        self._give_back()
        self._close(unlink=True)
        self._client = bytearray()

    def _close(self, unlink: bool) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if unlink and self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = ""


@dataclass
class _Live:
    """A kept message still in the journal: its octets in memory or its body file."""

    envelope: Envelope
    body: bytes
    body_file: str


class LocalQueue:
    """The queue of one data_dir (see the module docstring). ``writer`` is None in the CLI."""

    def __init__(
        self,
        data_dir: Path,
        hostname: str,
        writer: MaildirWriter | None = None,
        io: BlockingPool | None = None,
        header_limit: int = 1 << 20,
    ) -> None:
        self.data_dir = data_dir
        self.hostname = hostname
        self.writer = writer
        self.io = io or BlockingPool()
        self.header_limit = header_limit
        self.journal_dir = data_dir / "journal"
        self.bodies = self.journal_dir / journal.BODIES
        files.make_dirs(self.bodies)
        self.spares = SpareBodies(self.bodies, self.io if writer is not None else None)
        self.budget = HoldBudget()
        self.deferred = DeferredStore(data_dir / "queue")
        self.owner = False  # this process schedules the parked messages (the primary)
        self.on_parked: Callable[[str], None] | None = None  # a non-owner hands them over
        self._live: dict[str, _Live] = {}
        # Messages whose last record the disk refused (full, read-only): due again with what
        # their attempt learnt, kept here since the disk holds their state before it.
        self._unrecorded: dict[str, Envelope] = {}
        self._deleted: set[str] = set()
        self._heap: list[tuple[float, str]] = []
        self._next: dict[str, float] = {}
        self._flush_next: set[str] = set()  # in an attempt when a flush came (see flush)
        self._wake = asyncio.Event()
        self._problems: list[str] = []
        self._boxes: dict[str, str] = {}

    # -- intake -----------------------------------------------------------------------------

    def draft(
        self, queue_id: str, sender: str, make_prefix: Callable[[bytes], bytes] | None = None
    ) -> Draft:
        return Draft(self.spares, queue_id, sender, make_prefix, self.header_limit, self.budget)

    def box(self, mailbox: str) -> str:
        box = self._boxes.get(mailbox)
        if box is None:
            if len(self._boxes) >= BOX_CACHE:
                self._boxes.clear()
            box = self._boxes[mailbox] = str(maildir.mailbox_path(self.data_dir, mailbox))
        return box

    def copy_name(self, envelope: Envelope, index: int) -> str:
        return maildir.unique_name(
            int(envelope.created),
            envelope.id,
            index,
            self.hostname,
            envelope.size,
            envelope.wire_size - envelope.size,
        )

    async def accept(
        self,
        envelope: Envelope,
        draft: MessageDraft,
        deliver_now: Sequence[LocalCopy],
        hold: bool = False,
    ) -> list[OSError | None]:
        assert self.writer is not None and isinstance(draft, Draft)
        try:
            body, body_file, crc = await draft.finish_off_loop(self.io)
        except TemporaryStorageError:
            draft.abort()
            raise
        envelope.size, envelope.wire_size = draft.size, draft.wire_size
        if draft.fresh:  # no spare was ready: its name must be durable before the 250
            try:
                await self.io.run(files.fsync_dir, self.bodies)
            except OSError as exc:
                draft.abort()
                raise TemporaryStorageError(exc.strerror or str(exc)) from exc
        targets = tuple(
            journal.Target(c.index, self.box(c.mailbox), self.copy_name(envelope, c.index))
            for c in deliver_now
        )
        now = {c.index for c in deliver_now}
        keep = hold or any(not r.done and i not in now for i, r in enumerate(envelope.recipients))
        entry = journal.Entry(
            0, envelope.id, envelope.to_json(), targets, body, body_file, draft.size, crc, keep
        )
        try:
            results = await self.writer.accept(entry)
        except StorageUnavailable:  # no writer: not a full disk
            draft.abort()
            raise
        except OSError as exc:
            draft.abort()
            # A full disk says so (452 "Insufficient system storage", counted as disk_full);
            # a writer that died meanwhile (EIO) or a failing disk is storage unavailable.
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            unusable = TemporaryStorageError if full else StorageUnavailable
            raise unusable(exc.strerror or str(exc)) from exc
        errors = [r if isinstance(r, OSError) else None for r in results]
        if keep or any(errors):
            self._live[envelope.id] = _Live(envelope, body, body_file)
        return errors

    def add_waiting(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Queue a message made by the CLI (CRLF) straight into the deferred store, due at
        once (the CLI has no journal writer); its queue id. Blocking and durable."""
        envelope, body = waiting(sender, recipients, message)
        self.deferred.park(envelope.to_json(), envelope.id, body, "")
        return envelope.id

    # -- the runner -------------------------------------------------------------------------

    def recover(self, clean: bool = True) -> int:
        """Start-up of the owner (after the writer replayed the journal): the parked messages
        scheduled (how many); unreadable ones quarantined and reported. With ``clean`` (no
        other worker's writer runs yet), what a crash cut in two is removed first; never
        beside a living writer, whose park in progress looks just like that."""
        self.owner = True
        if clean:
            self.deferred.clean()
        for name in self.deferred.set_aside_strays():
            self._problems.append(f"queue/msg/{name}: no queue id; moved aside to queue/corrupt/")
        for qid, when in self.deferred.schedule():
            self._schedule(qid, when)
        return len(self._next)

    def _quarantine(self, queue_id: str, error: QueueError) -> None:
        text = f"corrupt queue file: {error}"
        try:
            text += f"; moved aside to {self.deferred.quarantine(queue_id)}"
        except OSError as exc:
            text += f"; not moved aside ({exc.strerror or exc}): set aside at the next start"
        self._problems.append(text)

    def schedule(self, envelope: Envelope) -> None:
        """Put a parked message in the schedule (the owner's); one whose attempt a flush
        found running is due at once."""
        flushed = envelope.id in self._flush_next
        self._flush_next.discard(envelope.id)
        due = envelope.next_attempt if envelope.attempts and not flushed else 0.0
        self._schedule(envelope.id, due)

    def _schedule(self, queue_id: str, when: float) -> None:
        self._next[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))
        self._wake.set()

    async def adopt(self, busy: AbstractSet[str]) -> int:
        """Schedule the parked messages the owner does not know of (how many): those a
        worker's new writer parked when it replayed the journal of a worker that died, which
        no one hands over. ``busy``: the messages whose attempts run now (not scheduled
        again). The state files' mtimes alone, as at the start, listed in a thread: with
        100,000 parked messages that takes a while, and the loop serves meanwhile."""
        parked = await self.io.run(lambda: list(self.deferred.schedule()))
        n = 0
        for qid, when in parked:
            if qid in self._next or qid in busy or qid in self._live or qid in self._unrecorded:
                continue
            self._schedule(qid, when)
            n += 1
        return n

    def take(self, queue_id: str) -> Envelope | None:
        """A parked message handed over by another worker (the control socket)."""
        try:
            envelope = self.deferred.load(queue_id)
        except QueueError:
            return None
        self.schedule(envelope)
        return envelope

    async def claim(self, now: float, limit: int) -> list[Envelope]:
        out: list[Envelope] = []
        while self._heap and self._heap[0][0] <= now and len(out) < limit:
            due, qid = heapq.heappop(self._heap)
            if self._next.get(qid) != due:
                continue
            del self._next[qid]
            kept = self._unrecorded.get(qid)
            if kept is not None:
                out.append(kept)
                continue
            try:
                envelope = await self.io.run(self._load_due, qid)
            except Exception as exc:
                # Not the entry's own fault (no permission on the queue's directories for a
                # while, say, is no reason to set every message aside): tried again later.
                # (An error here lost the others of the batch from the schedule.)
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
                self._problems.append(f"{qid}: cannot be read now ({why}); tried again in a minute")
                self._schedule(qid, now + 60)
                continue
            if envelope is not None:
                out.append(envelope)
        return out

    def _load_due(self, queue_id: str) -> Envelope | None:
        """A due message's envelope; None if it is gone, or corrupt (then set aside). Other
        errors are raised. Blocking."""
        try:
            return self.deferred.load(queue_id)
        except QueueError as exc:
            if self.deferred.has(queue_id):
                self._quarantine(queue_id, exc)
            return None

    async def wait(self, timeout: float) -> None:
        if self._heap:
            timeout = min(timeout, self._heap[0][0] - time.time())
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.01, timeout))

    async def begin_attempt(self, envelope: Envelope) -> None:
        if envelope.id in self._live:
            # Only the first attempt runs from the journal, and its record holds it already.
            return
        await self.io.run(self.deferred.save_state, envelope)

    async def save(self, envelope: Envelope) -> None:
        if envelope.id in self._deleted:
            return
        if envelope.id in self._live:
            assert self.writer is not None
            if await self._journal(self.writer.note, envelope.id, envelope.to_json()):
                return  # a STATE record beside its entry: one flush, shared by the batch
            self._live.pop(envelope.id, None)  # parked meanwhile by a new writer's recovery
        await self.io.run(self.deferred.save_state, envelope)

    async def peek(self, queue_id: str) -> Envelope | None:
        live = self._live.get(queue_id)
        if live is not None:
            return live.envelope
        try:
            return await self.io.run(self.deferred.load, queue_id)
        except QueueError:
            return None

    async def body(self, envelope: Envelope) -> bytes:
        live = self._live.get(envelope.id)
        if live is not None and not live.body_file:
            return live.body
        path = live.body_file if live is not None else self.deferred.msg_path(envelope.id)
        try:
            return await self.io.run(_read, path)
        except FileNotFoundError:
            if live is None:  # `queue delete` came as its attempt began (as PostgreSQL's)
                raise LeaseLost(f"{envelope.id} was deleted") from None
            # Its writer died meanwhile: the next one's recovery parked it, body file and all.
            return await self.io.run(_read, self.deferred.msg_path(envelope.id))

    async def record(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        envelope.history.extend(attempts)
        if envelope.id in self._deleted:
            self._deleted.discard(envelope.id)
            return
        try:
            if not (envelope.id in self._live and await self._park(envelope)):
                await self.io.run(self.deferred.save_state, envelope)
        except OSError:
            # The disk refused (full, read-only): the message stays where it was (the journal,
            # or the deferred store with its state before this attempt). It keeps its place in
            # the owner's schedule, with what this attempt learnt, so that it is tried again
            # when due and not only after a restart (which would try it from the disk's state).
            if self.owner:
                self._unrecorded[envelope.id] = envelope
                self.schedule(envelope)
            raise
        self._live.pop(envelope.id, None)
        self._unrecorded.pop(envelope.id, None)
        if not self.owner and self.on_parked is not None:
            self.on_parked(envelope.id)  # the owner schedules its retries
            return
        self.schedule(envelope)

    async def _park(self, envelope: Envelope) -> bool:
        """Move a kept message from the journal to the deferred store: True, or False if it
        was parked already (a writer that died was replaced, and the new one's recovery
        parked what the journal held)."""
        assert self.writer is not None
        if not await self._journal(self.writer.park, envelope.id, envelope.to_json()):
            if not self.deferred.has(envelope.id):
                raise QueueError(f"{envelope.id}: neither in the journal nor parked")
            return False
        return True

    async def _journal(self, call: Callable[..., Awaitable[None]], *args: object) -> bool:
        """A PARK or RELEASE: True if done, False if the journal no longer holds the message.
        If the writer died on the way, a new one is started first (its recovery parks what
        the dead one held), so that no later step writes state the recovery would overwrite."""
        assert self.writer is not None
        for attempt in range(JOURNAL_TRIES):
            try:
                if attempt:
                    await asyncio.sleep(0.05 * attempt)
                    await self.writer.start()
                await call(*args)
                return True
            except FileNotFoundError:
                return False
            except OSError:
                if attempt == JOURNAL_TRIES - 1:
                    raise
        return False  # pragma: no cover

    async def finish(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        envelope.history.extend(attempts)
        self._deleted.discard(envelope.id)
        self._unrecorded.pop(envelope.id, None)
        if self._live.pop(envelope.id, None) is not None:
            assert self.writer is not None
            if await self._journal(self.writer.release, envelope.id):
                return  # else parked by a new writer's recovery: removed below
        self._next.pop(envelope.id, None)
        self._flush_next.discard(envelope.id)
        try:
            await self.io.run(self.deferred.remove, envelope.id)
        except QueueError:
            pass
        except OSError as exc:
            # Done, but its files cannot be removed now (no permission on queue/msg for a
            # while): what was done is stored (a restart sent it again), and the removal is
            # tried again later; if even that cannot be stored, the running server keeps it
            # (as record() does), and tries again from memory.
            again = time.time() + 60
            try:
                await self.io.run(self.deferred.save_state, envelope)
            except OSError:
                if self.owner:
                    self._unrecorded[envelope.id] = envelope
                    self._schedule(envelope.id, again)
                raise
            log.warning("%s: done, but not removed from the queue yet: %s", envelope.id, exc)
            self._schedule(envelope.id, again)

    # -- the CLI and the control socket -----------------------------------------------------

    def entries(self) -> list[Envelope]:
        found: dict[str, Envelope] = {}
        for item in self.deferred.iter_envelopes():
            if isinstance(item, QueueError):
                self._problems.append(str(item))
            else:
                found[item.id] = item
        for entry in self._journal_entries():
            if entry.queue_id not in found:
                with contextlib.suppress(QueueError):
                    found[entry.queue_id] = Envelope.from_json(entry.envelope)
        return sorted(found.values(), key=lambda e: (e.created, e.id))

    def _journal_entries(self) -> list[journal.Entry]:
        """Kept messages in the journal segments (a running server's first attempts)."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.journal_dir)):
                if name.endswith(journal.SUFFIX):
                    with contextlib.suppress(OSError):
                        data = (self.journal_dir / name).read_bytes()
                        out += journal.parse(data).live()
        return out

    def load(self, queue_id: str) -> Envelope:
        check_id(queue_id)
        live = self._live.get(queue_id)
        if live is not None:
            return live.envelope
        damaged: QueueError | None = None  # a deferred message whose state cannot be read
        try:
            return self.deferred.load(queue_id)
        except QueueError as exc:
            if self.deferred.has(queue_id):
                damaged = exc
        for entry in self._journal_entries():
            if entry.queue_id == queue_id:
                return Envelope.from_json(entry.envelope)
        raise damaged or QueueError(f"no such message {queue_id}")

    def head(self, envelope: Envelope, limit: int = 65536) -> bytes:
        live = self._live.get(envelope.id)
        if live is not None and not live.body_file:
            return live.body[:limit]
        if self.deferred.has(envelope.id):
            return self.deferred.read(envelope.id, limit)
        for entry in self._journal_entries():
            if entry.queue_id == envelope.id:
                if entry.body_file:
                    return _read(entry.body_file, limit)
                return entry.body[:limit]
        raise QueueError(f"no such message {envelope.id}")

    async def delete(self, queue_id: str) -> None:
        check_id(queue_id)
        self._next.pop(queue_id, None)
        self._unrecorded.pop(queue_id, None)
        if queue_id in self._live:
            # Its attempt goes on with the octets it has read, and records nothing more.
            assert self.writer is not None
            del self._live[queue_id]
            self._deleted.add(queue_id)
            if await self._journal(self.writer.release, queue_id):
                return
            with contextlib.suppress(QueueError):  # parked by a new writer's recovery
                self.deferred.remove(queue_id)
            return
        self.deferred.remove(queue_id)

    async def replay_left(self) -> None:
        """For ``queue flush`` in the owner: replay the journal segments the start's replay
        left (a full disk), so that their messages are made and parked now (then adopted)."""
        if self.owner and self.writer is not None:
            try:
                await self.writer.replay_left()
            except OSError as exc:
                log.warning("queue flush: the journal left by the start not replayed: %s", exc)

    def flush(self, busy: AbstractSet[str] = frozenset()) -> int:
        now = time.time()
        n = 0
        if self.owner:
            # A message in its attempt now is scheduled when the attempt ends, at the retry
            # interval: a flush just after the disk had room again left those behind.
            self._flush_next = set(busy)
            for qid in list(self._next):
                self._next[qid] = now
                heapq.heappush(self._heap, (now, qid))
                n += 1
            self._wake.set()
            return n
        for env in self.deferred.iter_envelopes():  # no server: the next start tries them
            if isinstance(env, Envelope) and env.attempts:
                env.next_attempt = 0
                self.deferred.save_state(env)
                n += 1
        return n

    def problems(self) -> list[str]:
        out, self._problems = self._problems, []
        return out


def _read(path: str, limit: int = -1) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(limit)


def _write_copy(box: str, name: str, body: bytes) -> None:
    """Publish ``body`` into ``box`` under ``name``, flushed (the caller flushes ``new/``)."""
    fd = maildir.publish(box, name, (body,))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalMailboxes:
    """Local delivery of a queued message on a later attempt (see
    :class:`~postroom.storage.interfaces.MailboxDelivery`): the first attempt's copies are
    made by :meth:`LocalQueue.accept`. A copy is a hard link to the parked message (or the
    message written out where links are refused), and ``new/`` is flushed before the answer:
    a retry is rare, so it flushes on its own."""

    def __init__(self, queue: LocalQueue) -> None:
        self.queue = queue

    async def deliver(
        self, envelope: Envelope, copies: Sequence[LocalCopy]
    ) -> list[OSError | None]:
        if not copies:
            return []
        return await self.queue.io.run(self._deliver, envelope, copies)

    def _deliver(self, envelope: Envelope, copies: Sequence[LocalCopy]) -> list[OSError | None]:
        queue = self.queue
        # Parked, or still in the journal (its record refused by a full disk): its body file,
        # or its octets from the record.
        live = queue._live.get(envelope.id)
        source = queue.deferred.msg_path(envelope.id)
        inline: bytes | None = None
        if live is not None and live.body_file and os.path.exists(live.body_file):
            source = live.body_file
        elif live is not None and not live.body_file:
            inline = live.body
        out: list[OSError | None] = []
        for copy in copies:
            box, name = queue.box(copy.mailbox), queue.copy_name(envelope, copy.index)
            try:
                if maildir.find(box, name) is None:
                    if inline is not None:
                        _write_copy(box, name, inline)
                    else:
                        try:
                            maildir.link_copy(source, box, name)
                        except FileExistsError:
                            pass
                        except OSError:  # links refused (another file system): written out
                            _write_copy(box, name, _read(source))
                files.fsync_dir(os.path.join(box, "new"))
                out.append(None)
            except OSError as exc:
                out.append(exc)
        return out
