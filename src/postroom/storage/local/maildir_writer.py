"""Maildir writes in a helper process: the event loop sends jobs over a socketpair.

Every accepted message costs a journal append, a file creation, a write and the flushes.
Done in threads of the server process, each of those system calls hands the GIL back and forth
with the event loop, and every job wakes a thread and then the loop: measured here, ~40 context
switches per message against ~20 without threads, and as much CPU in the scheduler as in all of
the SMTP code. A child process does the same calls without a GIL to share: the loop writes a
job into a socket (one ``writev``, batched with its other output by the transport) and reads
the answer like any other connection; the child takes every job that has arrived, appends them
to its journal with one ``fdatasync`` (group commit), publishes each copy into ``new/`` and
answers; its syncer thread flushes the copies later (see :mod:`postroom.storage.local.journal`).
That is Postfix's shape too (smtpd hands the message to another process), with one helper per
worker process.

The child is ``python -m postroom.storage.local.maildir_writer FD PARENT_PID JOURNAL_DIR CPU
[UID GID]``: a fresh interpreter (no fork of a threaded server), started with the server's
interpreter options. The server starts it before it drops root (the interpreter may not be
executable by the mail user), and the child then becomes that user itself. It first replays what
a crashed writer left in the journal, then says it is ready (an answer with id 0). It ignores
SIGINT/SIGTERM, finishes what it was sent and exits when the server's end of the socket closes
(shutdown); if the server dies, the kernel kills it at once and the next start replays its
journal. If the child dies, the deliveries waiting on it fail with OSError: the message is
queued and retried, and as file names come from the queue id, a copy that did land in ``new/``
is found and not written a second time. The next job starts a new child.

Wire format, little-endian. Job: ``<IBHHIQ`` id, flags (1: check for an earlier copy; 2: the
body is the previous job's), lengths of the Maildir path, the file name, the head and the body,
then those four (the body only without flag 2: a message for N recipients crosses once).
Answer: ``<IiH`` id, status (1 written, 0 already there, else ``-errno``), length of the error
text, then the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from postroom import lifetime, privileges
from postroom.storage.local import files, journal, maildir
from postroom.storage.local.journal import Target

_JOB = struct.Struct("<IBHHIQ")
_ANSWER = struct.Struct("<IiH")
CHECK_DUPLICATE = 1
SAME_BODY = 2  # the body is the previous job's: not sent again
READY = 0  # the id of the child's first answer: it has started and recovered
_READ = 1 << 20


@dataclass(frozen=True, slots=True)
class Job:
    """One message for one Maildir: ``head`` + ``body`` as ``new/name``."""

    id: int
    box: str
    name: str
    head: bytes
    body: bytes
    check: bool  # look for a copy delivered before a crash


def encode_job(job_id: int, target: Target, body_size: int, check: bool, same_body: bool) -> bytes:
    """A job up to its body, which follows it on the wire unless ``same_body``."""
    box_b, name_b = os.fsencode(target.box), os.fsencode(target.name)
    flags = (CHECK_DUPLICATE if check else 0) | (SAME_BODY if same_body else 0)
    header = _JOB.pack(job_id, flags, len(box_b), len(name_b), len(target.head), body_size)
    return header + box_b + name_b + target.head


class JobReader:
    """The child's decoder: complete jobs from the stream, in order."""

    def __init__(self) -> None:
        self.body = b""  # the last body read: a SAME_BODY job's

    def decode(self, buf: bytearray) -> list[Job]:
        """The complete jobs at the start of ``buf``, which loses them; a partial one stays."""
        jobs: list[Job] = []
        pos, end = 0, len(buf)
        while end - pos >= _JOB.size:
            job_id, flags, box_len, name_len, head_len, body_len = _JOB.unpack_from(buf, pos)
            start = pos + _JOB.size
            head_at = start + box_len + name_len
            body_at = head_at + head_len
            stop = body_at if flags & SAME_BODY else body_at + body_len
            if stop > end:
                break
            if not flags & SAME_BODY:
                self.body = bytes(buf[body_at:stop])
            box = os.fsdecode(bytes(buf[start : start + box_len]))
            name = os.fsdecode(bytes(buf[start + box_len : head_at]))
            head = bytes(buf[head_at:body_at])
            jobs.append(Job(job_id, box, name, head, self.body, bool(flags & CHECK_DUPLICATE)))
            pos = stop
        del buf[:pos]
        return jobs


def encode_answer(job_id: int, status: int, text: str = "") -> bytes:
    raw = text.encode("utf-8", "replace")[:1000]
    return _ANSWER.pack(job_id, status, len(raw)) + raw


class JournalWriter:
    """The child's work (see :mod:`postroom.storage.local.journal`): a batch of jobs appended to
    the journal with one ``fdatasync``, each copy then published into its Maildir and
    settled, the answers sent; the syncer thread flushes the copies afterwards."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.boot = journal.boot_id()
        journal.recover(directory, self.boot)  # the copies a crashed writer left
        self.segment: journal.Segment | None = None  # made by the first batch
        with contextlib.suppress(OSError):  # a full disk: POP3 still starts (and frees room)
            self.segment = journal.Segment.create(directory, self.boot)
        self._seq = 0
        self.syncer = journal.Syncer()
        self._spares = maildir.Spares(directory)
        self._last_batch = 0

    def run(self, jobs: Sequence[Job]) -> bytes:
        """Write every job; the answers, in job order."""
        groups: list[list[Job]] = []  # a message's jobs share a body: one journal entry
        for job in jobs:
            last = groups[-1][0] if groups else None
            if last is not None and last.body is job.body:
                groups[-1].append(job)
            else:
                groups.append([job])
        entries = []
        for group in groups:
            self._seq += 1
            targets = tuple(journal.Target(j.box, j.name, j.head) for j in group)
            entries.append(journal.Entry(self._seq, targets, group[0].body))
        self._last_batch = len(jobs)
        answers: dict[int, tuple[int, str]] = {}
        settled: list[tuple[int, int]] = []
        try:
            if self.segment is None:
                self.segment = journal.Segment.create(self.directory, self.boot)
            segment = self.segment
            segment.append([p for e in entries for p in journal.encode_entry(e)], sync=True)
        except OSError as exc:  # nothing is acknowledged, nothing published
            with contextlib.suppress(OSError):
                marks = [(e.seq, i) for e in entries for i in range(len(e.targets))]
                if self.segment is not None:
                    self.segment.append(journal.encode_settled(marks), sync=False)
            return b"".join(encode_answer(job.id, *_failure(exc)) for job in jobs)
        dirs: set[str] = set()
        for entry, group in zip(entries, groups, strict=True):
            for index, job in enumerate(group):
                settled.append((entry.seq, index))
                try:
                    if job.check and maildir.find(job.box, job.name) is not None:
                        answers[job.id] = (0, "")
                        continue
                    written = self._publish(job)
                except OSError as exc:  # cancelled: the server queues it for a retry
                    answers[job.id] = _failure(exc)
                    continue
                dirs.add(os.path.join(job.box, "new"))
                answers[job.id] = (written, "")
        # Settled before the answers: after a crash these copies are not published again.
        with contextlib.suppress(OSError):  # then recovery looks for the files instead
            segment.append(journal.encode_settled(settled), sync=False)
        segment.last_seq = self._seq
        self.syncer.add(journal.Batch(segment, self._seq, dirs))
        if segment.size >= journal.SEGMENT_SIZE:
            self._rotate()
        return b"".join(encode_answer(job.id, *answers[job.id]) for job in jobs)

    def _publish(self, job: Job) -> int:
        """Put the copy into ``new/``: 1, or 0 if a copy of that name is there already."""
        fd = self._spares.take()
        if fd is not None:
            try:
                files.write_all(fd, (job.head, job.body))
                return self._link(fd, job)
            finally:
                os.close(fd)
        os.close(maildir.publish(job.box, job.name, (job.head, job.body)))
        return 1

    def _link(self, fd: int, job: Job) -> int:
        for attempt in (1, 2):
            try:
                maildir.link_unnamed(fd, job.box, job.name)
                return 1
            except FileExistsError:  # this very copy (names come from the queue id)
                return 0
            except FileNotFoundError:
                if attempt == 1 and not os.path.isdir(os.path.join(job.box, "new")):
                    maildir.ensure(Path(job.box))  # a Maildir not made yet, or removed
                    continue
                break  # no /proc
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES):
                    raise
                break  # the Maildirs are on another file system, or linking is not allowed
        self._spares.off()
        return self._publish(job)

    def refill(self) -> None:
        """Make the unnamed files the next batch will need (while no job is waiting)."""
        self._spares.refill(max(8, self._last_batch))

    def _rotate(self) -> None:
        old = self.segment
        assert old is not None
        try:
            self.segment = journal.Segment.create(self.directory, self.boot)
        except OSError as exc:
            journal.warn(f"cannot start a new journal segment: {exc}")
            return
        old.retired = True
        self.syncer.add(journal.Batch(old, old.last_seq, set()))  # deleted once synced

    def close(self) -> None:
        """Flush everything published; the journal is then no longer needed."""
        self._spares.off()
        self.syncer.stop()
        segment = self.segment
        if segment is not None and not segment.broken and segment.synced >= segment.last_seq:
            segment.remove()


def _failure(exc: OSError) -> tuple[int, str]:
    return -(exc.errno or errno.EIO), exc.strerror or str(exc)


def serve(
    fd: int, parent: int, directory: str, cpu: int, run_as: tuple[int, int] | None = None
) -> None:
    """The child's main loop: read what has come, write it, answer; exit at end of input."""
    if cpu >= 0:  # first, so that the threads made later keep to it too
        os.sched_setaffinity(0, {cpu})
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when this one stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if run_as is not None:  # started by root before the server dropped privileges: drop too
        privileges.become(*run_as)
    # A server killed mid-message sends no 250: finishing its writes would only deliver mail
    # that its client will send again.
    lifetime.die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    writer = JournalWriter(directory)
    sock.sendall(encode_answer(READY, 1))  # recovered: the server may go on
    writer.refill()
    reader = JobReader()
    buf = bytearray()
    room = memoryview(bytearray(_READ))  # one buffer for every read: no allocation per call
    # What one read brings is the batch (jobs still incomplete wait for the next).
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server is gone
        while size := sock.recv_into(room):
            buf += room[:size]
            jobs = reader.decode(buf)
            if jobs:
                sock.sendall(writer.run(jobs))
            writer.refill()
    writer.close()


class MaildirWriter:
    """The server's side: ``await writer.write(...)``; starts the child on first use."""

    def __init__(
        self, journal_dir: Path, run_as: tuple[int, int] | None = None, cpu: int | None = None
    ) -> None:
        self.journal_dir = journal_dir
        self.run_as = run_as  # (uid, gid) the child becomes if started as root
        self.cpu = cpu  # the CPU the child keeps to (``pin_cpus``)
        self._proc: subprocess.Popen[bytes] | None = None
        self._answers: _Answers | None = None
        self._starting: asyncio.Future[_Answers] | None = None
        self._next_id = 0

    async def write(
        self, targets: Sequence[Target], body: bytes, check: bool
    ) -> list[bool | OSError]:
        """Write ``head + body`` durably as ``new/name`` for each target (Maildirs are made if
        missing); the body crosses to the child once for all of them.

        For each target in order: True if written; False if a file of that name was there
        already (``check``: in ``new/`` or ``cur/``, a message delivered before a crash); the
        OSError if the write failed.
        """
        if not targets:
            return []
        answers = await self.start()
        loop = asyncio.get_running_loop()
        waiters: list[asyncio.Future[int]] = []
        wire: list[bytes] = []
        for i, target in enumerate(targets):
            self._next_id = job_id = self._next_id % 0xFFFFFFFF + 1  # 0 is READY's
            waiter: asyncio.Future[int] = loop.create_future()
            answers.waiters[job_id] = waiter
            waiters.append(waiter)
            wire.append(encode_job(job_id, target, len(body), check, same_body=i > 0))
            if i == 0:
                wire.append(body)
        answers.transport.writelines(wire)
        results = await asyncio.gather(*waiters, return_exceptions=True)
        out: list[bool | OSError] = []
        for result in results:
            if isinstance(result, OSError):
                out.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                out.append(result == 1)
        return out

    async def start(self) -> _Answers:
        """Start the child unless it runs. The server calls this before it drops root, since
        the interpreter may not be executable by the unprivileged user; later (after a child
        died) it is started as whoever the server is then."""
        answers = self._answers
        if answers is not None and not answers.closed.done():
            return answers
        starting = self._starting
        if starting is None:  # the first caller spawns; the others wait for the same child
            starting = self._starting = asyncio.ensure_future(self._spawn())
        try:
            return await asyncio.shield(starting)
        finally:
            if starting.done() and self._starting is starting:
                self._starting = None

    async def _spawn(self) -> _Answers:
        self._reap()
        self.journal_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [sys.executable, *interpreter_flags(), "-m", __name__]
        args += [str(theirs.fileno()), str(os.getpid()), str(self.journal_dir)]
        args.append(str(-1 if self.cpu is None else self.cpu))
        if self.run_as is not None and os.getuid() == 0:
            args += [str(self.run_as[0]), str(self.run_as[1])]
            for path in (self.journal_dir.parent, self.journal_dir):  # the child's from now
                os.chown(path, *self.run_as)
        with theirs:
            self._proc = subprocess.Popen(
                args,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        loop = asyncio.get_running_loop()
        _transport, answers = await loop.create_unix_connection(_Answers, sock=ours)
        await answers.ready  # the child has replayed what a crashed one left in the journal
        self._answers = answers
        return answers

    async def close(self, timeout: float = 5.0) -> None:
        """Let the child finish what it was sent, then end it."""
        answers, self._answers = self._answers, None
        if answers is not None and not answers.closed.done():
            answers.transport.write_eof()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(answers.closed), timeout)
            answers.transport.close()
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1.0)
        self._reap()

    def _reap(self) -> None:
        """Kill the child if it still runs (its socket is gone: it cannot be told anything)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def interpreter_flags() -> list[str]:
    """This interpreter's options that decide what a child Python imports and how (``-I``,
    ``-E``, ``-s``, ``-S``, ``-P``, ``-O``, ``-B``, ``-X``): a server started with ``-I``
    must not get a writer that honours ``PYTHONPATH`` and imports another postroom."""
    flags = sys.flags
    args = ["-I"] if flags.isolated else []
    if not flags.isolated:
        args += ["-E"] if flags.ignore_environment else []
        args += ["-s"] if flags.no_user_site else []
        args += ["-P"] if flags.safe_path else []
    args += ["-S"] if flags.no_site else []
    args += ["-" + "O" * flags.optimize] if flags.optimize else []
    args += ["-B"] if flags.dont_write_bytecode else []
    for key, value in sys._xoptions.items():
        args += ["-X", key if value is True else f"{key}={value}"]
    return args


class _Answers(asyncio.Protocol):
    """Reads the child's answers and settles the waiting deliveries."""

    def __init__(self) -> None:
        self.waiters: dict[int, asyncio.Future[int]] = {}
        self.buf = bytearray()
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()  # the child's first answer
        # Done once the connection is lost: the child is gone, a new one must be started.
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= _ANSWER.size:
            job_id, status, text_len = _ANSWER.unpack_from(buf, pos)
            end = pos + _ANSWER.size + text_len
            if end > len(buf):
                break
            if job_id == READY and not self.ready.done():
                self.ready.set_result(None)
            waiter = self.waiters.pop(job_id, None)
            if waiter is not None and not waiter.done():
                if status >= 0:
                    waiter.set_result(status)
                else:
                    text = bytes(buf[pos + _ANSWER.size : end]).decode("utf-8", "replace")
                    waiter.set_exception(OSError(-status, text))
            pos = end
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(OSError(errno.EIO, "the Maildir writer process exited"))
        self.waiters.clear()
        if not self.ready.done():
            self.ready.set_exception(OSError(errno.EIO, "the Maildir writer process failed"))
        if not self.closed.done():
            self.closed.set_result(None)


if __name__ == "__main__":
    fd, parent, directory, cpu, *ids = sys.argv[1:]
    serve(int(fd), int(parent), directory, int(cpu), (int(ids[0]), int(ids[1])) if ids else None)
