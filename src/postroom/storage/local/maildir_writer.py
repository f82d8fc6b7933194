"""The queue's writer process: the journal and the Maildir copies, next to each event loop.

Every accepted message costs a journal append, the flushes, and a file per local copy. Done in
threads of the server process, each of those system calls hands the GIL back and forth with
the event loop: measured here, ~40 context switches per message against ~20 without threads,
and as much CPU in the scheduler as in all of the SMTP code. A child process does the same
calls without a GIL to share: the loop writes a job into a socket (one ``writev``, batched with
its other output by the transport) and reads the answer like any other connection; the child
takes every job that has arrived, appends them to its journal with one ``fdatasync`` (group
commit), publishes each local copy into ``new/`` and answers; its syncer thread flushes the
copies later (see :mod:`postroom.storage.local.journal`). That is Postfix's shape too (smtpd
hands the message to another process), with one helper per worker process.

Jobs: ACCEPT (a message: envelope, copies to make now, body inline or in a body file the server
wrote), PARK (move a kept message to the deferred store, durably), NOTE (a kept message's newer
envelope, durably, in a STATE record beside its entry) and RELEASE (the queue is done with a
kept message). The child is ``python -m postroom.storage.local.maildir_writer FD PARENT_PID
JOURNAL_DIR CPU CLEAN [UID GID]``: a fresh interpreter (no fork of a threaded server), started
with the server's interpreter options. The server starts it before it drops root (the
interpreter may not be executable by the mail user), and the child then becomes that user
itself. It first replays what a crashed writer left in the journal, then says it is ready (an
answer with id 0). It ignores SIGINT, SIGTERM and SIGHUP, finishes what it was sent and exits
when the server's end of the socket closes (shutdown); if the server dies, the kernel kills it
at once and the next start replays its journal. If the child dies, the jobs waiting on it fail
with OSError: an ACCEPT is answered 452, and the next job starts a new child. The queue ids of
those ACCEPTs are written down first (:func:`journal.write_refused`): whoever replays the dead
child's journal drops them (their clients send them again) and takes back any copy of them
still unread in ``new/``.

Wire format, little-endian. Job: ``<IBI`` id, kind, payload length, then the payload (an
ACCEPT's is the journal record's with seq 0). Answer: ``<IH`` id, count, then ``count`` times
``<iH`` status (1 done, 0 there already, else ``-errno``), length of the error text, the text:
for an ACCEPT first whether it is durable, then one per copy (only the first if not durable).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from postroom import childproc, lifetime, privileges
from postroom.errors import StorageUnavailable
from postroom.storage.local import files, journal, maildir
from postroom.storage.local.deferred import DeferredStore
from postroom.storage.local.journal import Entry

log = logging.getLogger("postroom")

_JOB = struct.Struct("<IBI")
_ANSWER = struct.Struct("<IH")
_STATUS = struct.Struct("<iH")
ACCEPT, PARK, RELEASE, NOTE, REPLAY = 1, 2, 3, 4, 5
READY = childproc.READY  # the id of the child's first answer: it has started and recovered
_READ = 1 << 20
_FLUSHERS = 8  # threads that flush body files beside the journal


@dataclass(frozen=True, slots=True)
class Job:
    """One job as the child reads it: an ACCEPT's entry, or a PARK's/NOTE's/RELEASE's queue
    id and (PARK, NOTE) envelope."""

    id: int
    kind: int
    entry: Entry | None = None
    queue_id: str = ""
    envelope: bytes = b""


def encode_job(job_id: int, kind: int, parts: Sequence[bytes]) -> list[bytes]:
    return [_JOB.pack(job_id, kind, sum(len(p) for p in parts)), *parts]


def encode_accept(job_id: int, entry: Entry) -> list[bytes]:
    return encode_job(job_id, ACCEPT, journal.entry_parts(entry))


def encode_park(job_id: int, queue_id: str, envelope: bytes) -> list[bytes]:
    qid = queue_id.encode()
    return encode_job(job_id, PARK, [struct.pack("<H", len(qid)), qid, envelope])


def encode_note(job_id: int, queue_id: str, envelope: bytes) -> list[bytes]:
    qid = queue_id.encode()
    return encode_job(job_id, NOTE, [struct.pack("<H", len(qid)), qid, envelope])


def encode_release(job_id: int, queue_id: str) -> list[bytes]:
    return encode_job(job_id, RELEASE, [queue_id.encode()])


def encode_replay(job_id: int) -> list[bytes]:
    return encode_job(job_id, REPLAY, [])


class JobReader:
    """The child's decoder: complete jobs from the stream, in order."""

    def decode(self, buf: bytearray) -> list[Job]:
        """The complete jobs at the start of ``buf``, which loses them; a partial one stays."""
        jobs: list[Job] = []
        pos, end = 0, len(buf)
        while end - pos >= _JOB.size:
            job_id, kind, length = _JOB.unpack_from(buf, pos)
            start = pos + _JOB.size
            if start + length > end:
                break
            payload = memoryview(buf)[start : start + length]
            try:
                if kind == ACCEPT:
                    contents = journal.Contents()
                    journal.take(contents, journal.ACCEPT, payload)
                    jobs.append(Job(job_id, kind, entry=contents.entries[0]))
                elif kind in (PARK, NOTE):
                    (qid_len,) = struct.unpack_from("<H", payload)
                    qid = bytes(payload[2 : 2 + qid_len]).decode("ascii")
                    jobs.append(
                        Job(job_id, kind, queue_id=qid, envelope=bytes(payload[2 + qid_len :]))
                    )
                else:
                    jobs.append(Job(job_id, kind, queue_id=bytes(payload).decode("ascii")))
            finally:
                payload.release()
            pos = start + length
        del buf[:pos]
        return jobs


def encode_answer(job_id: int, *statuses: tuple[int, str]) -> bytes:
    out = [_ANSWER.pack(job_id, len(statuses))]
    for status, text in statuses:
        raw = text.encode("utf-8", "replace")[:1000]
        out += [_STATUS.pack(status, len(raw)), raw]
    return b"".join(out)


@dataclass
class _Kept:
    segment: journal.Segment
    entry: Entry


class JournalWriter:
    """The child's work (see :mod:`postroom.storage.local.journal`): a batch of messages
    appended to the journal with one ``fdatasync`` (their body files flushed beside it), each
    local copy then published into its Maildir and settled, the answers sent; the syncer
    thread flushes the copies afterwards. Kept messages stay in their segment until the queue
    parks or releases them."""

    def __init__(self, directory: str, clean_bodies: bool = False) -> None:
        self.directory = directory
        self.boot = journal.boot_id()
        journal.recover(directory, self.boot, clean_bodies)  # what a crashed writer left
        self.deferred = DeferredStore(Path(directory).parent / "queue")
        self.segment: journal.Segment | None = None  # made by the first batch
        with contextlib.suppress(OSError):  # a full disk: POP3 still starts (and frees room)
            self.segment = journal.Segment.create(directory, self.boot)
        self._seq = 0
        self.syncer = journal.Syncer()
        self._spares = maildir.Spares(directory)
        self._last_batch = 0
        self._kept: dict[str, _Kept] = {}
        self._flushers = ThreadPoolExecutor(_FLUSHERS, thread_name_prefix="flush")

    def run(self, jobs: Sequence[Job]) -> bytes:
        """Do every job; the answers, in job order."""
        # Releases first: each closes the window in which a crash would send a relayed
        # message again, and the batch's flush then covers them too.
        answers = {j.id: [self._release(j.queue_id)] for j in jobs if j.kind == RELEASE}
        # Notes before the accepts: those in the current segment ride on the batch's flush.
        noted = self._note([j for j in jobs if j.kind == NOTE], answers)
        current = self.segment
        accepts = [j for j in jobs if j.kind == ACCEPT]
        if accepts:
            answers.update(self._accept(accepts))
            # A failed flush answers every accept with its error; a first answer of 1 means
            # the flush went through (a note then waits for no flush of its own).
            if current is not None and answers[accepts[0].id][0][0] == 1:
                for job in noted.pop(current.fd, []):
                    answers[job.id] = [(1, "")]
        for fd, waiting in noted.items():
            try:
                os.fdatasync(fd)
                status = (1, "")
            except OSError as exc:
                status = _failure(exc)
            answers.update((job.id, [status]) for job in waiting)
        for job in jobs:
            if job.kind == PARK:
                answers[job.id] = [self._park(job)]
            elif job.kind == REPLAY:
                answers[job.id] = [self._replay_left()]
        return b"".join(encode_answer(job.id, *answers[job.id]) for job in jobs)

    def _replay_left(self) -> tuple[int, str]:
        """Replay the segments a replay left (one at the start that a full disk cut short;
        no writer holds them): for ``queue flush``, so that their mail does not wait for
        the next start once the disk has room. Kept messages are parked, for the owner to
        adopt."""
        try:
            journal.recover(self.directory, self.boot, drop_refusals=False)
        except OSError as exc:
            return _failure(exc)
        return 1, ""

    def _accept(self, jobs: Sequence[Job]) -> dict[int, list[tuple[int, str]]]:
        entries = []
        for job in jobs:
            assert job.entry is not None
            self._seq += 1
            entries.append(dataclasses.replace(job.entry, seq=self._seq))
        self._last_batch = sum(len(e.targets) for e in entries)
        appended = False
        try:
            if self.segment is None:
                self.segment = journal.Segment.create(self.directory, self.boot)
            segment = self.segment
            segment.append([p for e in entries for p in journal.encode_entry(e)], sync=False)
            appended = True
            flushes = [segment.fd]
            try:
                for e in entries:
                    if e.body_file:
                        flushes.append(os.open(e.body_file, os.O_RDONLY | os.O_CLOEXEC))
                if len(flushes) == 1:
                    os.fdatasync(segment.fd)
                else:  # side by side: the device merges the flushes
                    list(self._flushers.map(os.fdatasync, flushes))
            finally:
                for fd in flushes[1:]:
                    os.close(fd)
        except OSError as exc:  # nothing is acknowledged, nothing published
            with contextlib.suppress(OSError):  # never replayed: the client gets a 452
                if self.segment is not None:
                    marks = [(e.seq, i) for e in entries for i in range(len(e.targets))]
                    self.segment.append(journal.encode_settled(marks), sync=False)
                    self.segment.append(journal.encode_released(e.seq for e in entries), False)
            if appended:  # the flush failed: the kernel may have dropped what it could not
                # write, and a later record past that hole would read as damage. So no more
                # batches here: kept for recovery (never marked synced); the next batch starts
                # a new segment, or gets this answer too if none can be made.
                segment.broken = segment.retired = True
                self.segment = None
            return {job.id: [_failure(exc)] for job in jobs}
        answers: dict[int, list[tuple[int, str]]] = {}
        settled: list[tuple[int, int]] = []
        late: list[int] = []  # not kept, but a copy failed: kept after all
        dirs: set[str] = set()
        unlink: list[str] = []
        for job, entry in zip(jobs, entries, strict=True):
            results: list[tuple[int, str]] = []
            first: str | None = None
            for index, target in enumerate(entry.targets):
                try:
                    written, path = self._publish(entry, target, first)
                except OSError as exc:  # the queue keeps the message and retries this copy
                    results.append(_failure(exc))
                    continue
                settled.append((entry.seq, index))  # made: gone later, a user deleted it
                first = first or path
                dirs.add(os.path.join(target.box, "new"))
                results.append((written, ""))
            answers[job.id] = [(1, ""), *results]  # durable, then each copy
            if entry.keep or any(status < 0 for status, _t in results):
                if not entry.keep:
                    late.append(entry.seq)
                segment.kept.add(entry.seq)
                self._kept[entry.queue_id] = _Kept(segment, entry)
            elif entry.body_file:
                unlink.append(entry.body_file)  # once its links are durable
        # Settled before the answers: after a crash these copies are not published again.
        with contextlib.suppress(OSError):  # then recovery looks for the files instead
            segment.append(journal.encode_settled(settled), sync=False)
        if late:  # before the answer: a crash must not forget the copies still owed
            try:
                segment.append(journal.encode_kept(late), sync=True)
            except OSError as exc:  # then the message is not acknowledged either
                marks = []
                for job, entry in zip(jobs, entries, strict=True):
                    if entry.seq in late:
                        answers[job.id] = [_failure(exc)]
                        segment.kept.discard(entry.seq)
                        self._kept.pop(entry.queue_id, None)
                        marks += [(entry.seq, i) for i in range(len(entry.targets))]
                        if entry.body_file:
                            unlink.append(entry.body_file)
                        # (its made copies stay: the client's retry makes them again under
                        # another queue id; a rare double on a failing disk, never a loss)
                with contextlib.suppress(OSError):  # a crash must not make its other copies
                    segment.append(journal.encode_settled(marks), sync=False)
                # A failed flush, as above: no more batches in this segment (a hole the
                # kernel left would hide the records after it), kept for recovery.
                segment.broken = segment.retired = True
                if self.segment is segment:
                    self.segment = None
        segment.last_seq = self._seq
        self.syncer.add(journal.Batch(segment, self._seq, dirs, unlink))
        if self.segment is segment and segment.size >= journal.SEGMENT_SIZE:
            self._rotate()
        return answers

    def _publish(self, entry: Entry, target: journal.Target, first: str | None) -> tuple[int, str]:
        """Put one copy into ``new/``: (1, its path), or (0, path) if it was there already.
        Copies after the first are links to it; a body file is linked, never copied."""
        path = os.path.join(target.box, "new", target.name)
        source = entry.body_file or first
        if source is not None:
            try:
                maildir.link_copy(source, target.box, target.name)
                return 1, path
            except FileExistsError:
                return 0, path
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK) or entry.body_file:
                    raise
        fd = self._spares.take()
        if fd is not None:
            try:
                files.write_all(fd, (entry.body,))
                return self._link(fd, entry, target), path
            finally:
                os.close(fd)
        return self._write(entry, target), path

    @staticmethod
    def _write(entry: Entry, target: journal.Target) -> int:
        try:
            os.close(maildir.publish(target.box, target.name, (entry.body,)))
        except FileExistsError:  # this very copy (names come from the queue id)
            return 0
        return 1

    def _link(self, fd: int, entry: Entry, target: journal.Target) -> int:
        for attempt in (1, 2):
            try:
                maildir.link_unnamed(fd, target.box, target.name)
                return 1
            except FileExistsError:  # this very copy (names come from the queue id)
                return 0
            except FileNotFoundError:
                if attempt == 1 and not os.path.isdir(os.path.join(target.box, "new")):
                    maildir.ensure(Path(target.box))  # a Maildir not made yet, or removed
                    continue
                break  # no /proc
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES):
                    raise
                break  # the Maildirs are on another file system, or linking is not allowed
        self._spares.off()
        return self._write(entry, target)

    def _park(self, job: Job) -> tuple[int, str]:
        kept = self._kept.get(job.queue_id)
        if kept is None:
            return -errno.ENOENT, f"{job.queue_id} is not in the journal"
        entry = kept.entry
        try:
            self.deferred.park(
                job.envelope,
                entry.queue_id,
                None if entry.body_file else entry.body,
                entry.body_file,
            )
            kept.segment.append(journal.encode_released([entry.seq]), sync=True)
        except OSError as exc:
            return _failure(exc)
        self._forget(job.queue_id, [])
        return 1, ""

    def _note(
        self, jobs: Sequence[Job], answers: dict[int, list[tuple[int, str]]]
    ) -> dict[int, list[Job]]:
        """Append STATE records for kept messages, unflushed: the notes written, by the fd of
        their segment (``run`` flushes each segment once). A note that cannot be written is
        answered in ``answers``."""
        written: dict[int, list[Job]] = {}
        for job in jobs:
            kept = self._kept.get(job.queue_id)
            if kept is None:
                answers[job.id] = [(-errno.ENOENT, f"{job.queue_id} is not in the journal")]
                continue
            try:
                kept.segment.append(journal.encode_state(kept.entry.seq, job.envelope), False)
            except OSError as exc:
                answers[job.id] = [_failure(exc)]
                continue
            written.setdefault(kept.segment.fd, []).append(job)
        return written

    def _release(self, queue_id: str) -> tuple[int, str]:
        kept = self._kept.get(queue_id)
        if kept is None:
            return -errno.ENOENT, f"{queue_id} is not in the journal"
        try:
            # No flush: a kill -9 keeps the page cache, and the syncer's next round (or the
            # next batch's flush) makes it durable.
            kept.segment.append(journal.encode_released([kept.entry.seq]), sync=False)
        except OSError as exc:
            return _failure(exc)
        self._forget(queue_id, [kept.entry.body_file] if kept.entry.body_file else [])
        return 1, ""

    def _forget(self, queue_id: str, unlink: list[str]) -> None:
        kept = self._kept.pop(queue_id)
        kept.segment.kept.discard(kept.entry.seq)
        segment = kept.segment
        self.syncer.add(journal.Batch(segment, segment.last_seq, set(), unlink))

    def refill(self) -> None:
        """Make the unnamed files the next batch will need: after a batch is answered, before
        the next is read (its jobs wait no longer than they would for copies made inline)."""
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
        """Flush everything published; the journal is then no longer needed unless the
        queue still holds messages in it (replayed and parked at the next start)."""
        self._spares.off()
        self.syncer.stop()
        self._flushers.shutdown()
        segment = self.segment
        if segment is not None and not segment.broken:
            segment.retired = True  # removed if nothing in it is held any more
            if segment.done:
                segment.remove()


def _failure(exc: OSError) -> tuple[int, str]:
    return -(exc.errno or errno.EIO), exc.strerror or str(exc)


def serve(
    fd: int,
    parent: int,
    directory: str,
    cpu: int,
    clean: bool = False,
    run_as: tuple[int, int] | None = None,
) -> None:
    """The child's main loop: read what has come, write it, answer; exit at end of input."""
    childproc.run_behind_server()
    if cpu >= 0:  # first, so that the threads made later keep to it too
        os.sched_setaffinity(0, {cpu})
    childproc.ignore_signals()
    if run_as is not None:  # started by root before the server dropped privileges: drop too
        privileges.become(*run_as)
    # A server killed mid-message sends no 250: finishing its writes would only deliver mail
    # that its client will send again.
    lifetime.die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    writer = JournalWriter(directory, clean)
    sock.sendall(encode_answer(READY, (1, "")))  # recovered: the server may go on
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
    """The server's side: ``await writer.accept(...)``; starts the child on first use."""

    def __init__(
        self,
        journal_dir: Path,
        run_as: tuple[int, int] | None = None,
        cpu: int | None = None,
        clean_bodies: bool = False,
    ) -> None:
        self.journal_dir = journal_dir
        self.run_as = run_as  # (uid, gid) the child becomes if started as root
        self.cpu = cpu  # the CPU the child keeps to (``pin_cpus``)
        self.clean_bodies = clean_bodies  # the first child removes unnamed body files
        self._proc: subprocess.Popen[bytes] | None = None
        self._answers: _Answers | None = None
        self._starting: asyncio.Future[_Answers] | None = None
        self._started = False  # a child ran once (then, maybe, as root)
        self._leaving = False  # this worker asked itself to stop: see _spawn

    async def accept(self, entry: Entry) -> list[bool | OSError]:
        """Make ``entry`` durable in the journal and publish its copies. For each target in
        order: True if written; False if a file of that name was there already; the OSError
        that kept it out. Raises OSError if the message could not be made durable."""
        answers = await self.start()
        job, waiter = answers.submit(lambda job_id: encode_accept(job_id, entry))
        answers.accepting[job] = entry.queue_id  # the child may die before it answers
        durable, *results = await waiter
        if isinstance(durable, OSError):
            raise durable
        return [r if isinstance(r, OSError) else r == 1 for r in results]

    async def park(self, queue_id: str, envelope: bytes) -> None:
        """Move a kept message to the deferred store, durably (OSError if not)."""
        (result,) = await self._run(encode_park, queue_id, envelope)
        if isinstance(result, OSError):
            raise result

    async def note(self, queue_id: str, envelope: bytes) -> None:
        """Store a kept message's newer envelope beside it in the journal, durably (OSError if
        not: FileNotFoundError if the journal no longer holds it)."""
        (result,) = await self._run(encode_note, queue_id, envelope)
        if isinstance(result, OSError):
            raise result

    async def release(self, queue_id: str) -> None:
        """The queue is done with a kept message (OSError if the child could not record it)."""
        (result,) = await self._run(encode_release, queue_id)
        if isinstance(result, OSError):
            raise result

    async def replay_left(self) -> None:
        """Replay what a replay left in the journal (see ``JournalWriter._replay_left``)."""
        (result,) = await self._run(encode_replay)
        if isinstance(result, OSError):
            raise result

    async def _run(self, encode: Callable[..., list[bytes]], *args: object) -> list[int | OSError]:
        answers = await self.start()
        _job, waiter = answers.submit(lambda job_id: encode(job_id, *args))
        return await waiter

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
        gone = self._proc
        if gone is not None:  # it died (kill -9, the OOM killer): say so, as Postfix's master
            status = gone.poll()
            log.warning(
                "Maildir writer (pid %d) %s; starting a new one",
                gone.pid,
                "stopped answering" if status is None else f"exited with status {status}",
            )
        self._reap()
        files.make_dirs(self.journal_dir)
        args = [str(self.journal_dir), str(-1 if self.cpu is None else self.cpu)]
        args.append("1" if self.clean_bodies else "0")
        self.clean_bodies = False  # a child started later must not touch living files
        if self.run_as is not None and os.getuid() == 0:
            args += [str(self.run_as[0]), str(self.run_as[1])]
            data_dir = self.journal_dir.parent
            queue = data_dir / "queue"
            mine = [data_dir, self.journal_dir, self.journal_dir / journal.BODIES, queue]
            mine += [queue / sub for sub in ("msg", "state", "corrupt")]
            for path in mine:  # the child's from now on (it recovers, then writes here)
                files.make_dirs(path)
                os.chown(path, *self.run_as)
        try:
            self._proc, ours = childproc.start(__name__, args)
        except OSError as exc:
            if not self._started:
                raise  # the server's start: it fails, and says why
            # Started as root before the drop, it cannot be started again as the mail user
            # (an interpreter under /root, say): rather than refuse every message for good,
            # this worker stops, and the supervisor starts it again, as root.
            if not self._leaving:
                self._leaving = True
                log.error(
                    "cannot start a new Maildir writer (%s): this worker stops, to be started"
                    " again",
                    exc,
                )
                os.kill(os.getpid(), signal.SIGTERM)
            raise StorageUnavailable(f"Maildir writer: {exc}") from None
        self._started = True
        answers = await childproc.connect(ours, lambda: _Answers(self.journal_dir))
        # (recovered what a crashed one left)
        self._answers = answers
        return answers

    async def close(self, timeout: float = 5.0) -> None:
        """Let the child finish what it was sent, then end it."""
        answers, self._answers = self._answers, None
        await childproc.finish(answers, timeout)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1.0)
        self._reap()

    def _reap(self) -> None:
        """Kill the child if it still runs (its socket is gone: it cannot be told anything)."""
        childproc.kill(self._proc)
        self._proc = None


class _Answers(childproc.Answers[list[int | OSError]]):
    """Reads the child's answers and settles the waiting jobs."""

    process = "journal writer"

    def __init__(self, journal_dir: Path) -> None:
        super().__init__()
        self.journal_dir = journal_dir
        self.accepting: dict[int, str] = {}  # ACCEPT jobs not answered yet: their queue ids

    def settle(self, job_id: int, result: list[int | OSError]) -> None:
        self.accepting.pop(job_id, None)
        super().settle(job_id, result)

    def connection_lost(self, exc: Exception | None) -> None:
        # Their clients get a 452 and send them again: whoever replays this child's journal
        # (the next writer, or the next start if the server dies too) must drop them, though
        # some may be in it, even published. Written down before any 452 goes out.
        if self.accepting:
            try:
                journal.write_refused(str(self.journal_dir), self.accepting.values())
            except OSError as failure:  # a replay may deliver them: a duplicate, not a loss
                log.error("cannot record the messages refused with their writer: %s", failure)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= _ANSWER.size:
            job_id, count = _ANSWER.unpack_from(buf, pos)
            at, results = pos + _ANSWER.size, []
            for _ in range(count):
                if len(buf) - at < _STATUS.size:
                    break
                status, text_len = _STATUS.unpack_from(buf, at)
                end = at + _STATUS.size + text_len
                if end > len(buf):
                    break
                if status >= 0:
                    results.append(status)
                else:
                    text = bytes(buf[at + _STATUS.size : end]).decode("utf-8", "replace")
                    results.append(OSError(-status, text))
                at = end
            if len(results) < count:
                break  # the rest of this answer is still on its way
            pos = at
            self.settle(job_id, results)
        del buf[:pos]


if __name__ == "__main__":
    fd, parent, directory, cpu, clean, *ids = sys.argv[1:]
    serve(
        int(fd),
        int(parent),
        directory,
        int(cpu),
        clean == "1",
        (int(ids[0]), int(ids[1])) if ids else None,
    )
