"""The Maildir writer: its wire format, the child's batches, and the real child process."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.queue.envelope import Envelope, Recipient
from postroom.storage.interfaces import LocalCopy
from postroom.storage.local import journal, maildir
from postroom.storage.local import maildir_writer as writer_mod
from postroom.storage.local.journal import Entry, Target
from postroom.storage.local.maildir_writer import (
    ACCEPT,
    NOTE,
    PARK,
    RELEASE,
    REPLAY,
    Job,
    JobReader,
    JournalWriter,
    MaildirWriter,
    encode_accept,
    encode_note,
    encode_park,
    encode_release,
)
from postroom.storage.local.queue import LocalQueue

entries_st = st.lists(
    st.tuples(
        st.integers(0, 2**32 - 1),
        st.text(min_size=1, max_size=40).filter(lambda t: "\0" not in t),
        st.text(min_size=1, max_size=40).filter(lambda t: "\0" not in t),
        st.binary(max_size=300),
        st.booleans(),
        st.sampled_from([ACCEPT, PARK, NOTE, RELEASE]),
    ),
    max_size=5,
)


@given(entries_st, st.lists(st.integers(1, 400), max_size=8))
def test_jobs_survive_any_split_of_the_stream(
    jobs: list[tuple[int, str, str, bytes, bool, int]], cuts: list[int]
) -> None:
    wire, expected = b"", []
    for job_id, box, name, body, keep, kind in jobs:
        if kind == ACCEPT:
            entry = Entry(0, "Q1", b"{}", (Target(3, box, name),), body, keep=keep)
            wire += b"".join(encode_accept(job_id, entry))
            expected.append(Job(job_id, ACCEPT, entry=entry))
        elif kind == PARK:
            wire += b"".join(encode_park(job_id, "Q2", body))
            expected.append(Job(job_id, PARK, queue_id="Q2", envelope=body))
        elif kind == NOTE:
            wire += b"".join(encode_note(job_id, "Q4", body))
            expected.append(Job(job_id, NOTE, queue_id="Q4", envelope=body))
        else:
            wire += b"".join(encode_release(job_id, "Q3"))
            expected.append(Job(job_id, RELEASE, queue_id="Q3"))
    reader = JobReader()
    buf, got, pos = bytearray(), [], 0
    for size in [*cuts, len(wire)]:  # the stream arrives in arbitrary pieces
        buf += wire[pos : pos + size]
        pos += size
        got += reader.decode(buf)
    assert buf == bytearray()
    assert got == expected


def job(i: int, box: Path, data: bytes = b"m\n", keep: bool = False) -> Job:
    lines = data.count(b"\n")
    name = f"{i}.Q{i}_0.h,S={len(data)},W={len(data) + lines}"
    entry = Entry(0, f"Q{i}", b'{"id": "Q%d"}' % i, (Target(0, str(box), name),), data, keep=keep)
    return Job(i, ACCEPT, entry=entry)


def answers(raw: bytes) -> list[tuple[int, int, str]]:
    """(job id, status, text) per job: an ACCEPT's copy, or why it is not durable."""
    out = []
    while raw:
        job_id, count = writer_mod._ANSWER.unpack_from(raw)
        at, statuses = writer_mod._ANSWER.size, []
        for _ in range(count):
            status, size = writer_mod._STATUS.unpack_from(raw, at)
            at += writer_mod._STATUS.size
            statuses.append((status, raw[at : at + size].decode()))
            at += size
        out.append((job_id, *statuses[-1]))
        raw = raw[at:]
    return out


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[JournalWriter]:
    (tmp_path / "journal").mkdir()
    w = JournalWriter(str(tmp_path / "journal"))
    yield w
    w.close()


def test_a_batch_shares_one_journal_flush(
    tmp_path: Path, writer: JournalWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[int] = []  # the copies in new/ when each journal flush ended
    box = tmp_path / "mail" / "x.test" / "u"
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        flushed.append(len(os.listdir(box / "new")) if (box / "new").exists() else 0)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    out = answers(writer.run([job(i, box) for i in range(1, 41)]))
    assert out == [(i, 1, "") for i in range(1, 41)]
    assert flushed == [0]  # one flush for the batch, and no copy visible before it
    names = os.listdir(box / "new")
    assert len(names) == 40 and os.listdir(box / "tmp") == []


def test_notes_share_one_flush_and_are_what_recovery_parks(
    tmp_path: Path, writer: JournalWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = tmp_path / "mail" / "x.test" / "u"
    assert answers(writer.run([job(i, box, keep=True) for i in (1, 2)])) == [(1, 1, ""), (2, 1, "")]
    flushes: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushes.append(fd), real(fd)))
    notes = [Job(10 + i, NOTE, queue_id=f"Q{i}", envelope=_state(f"Q{i}")) for i in (1, 2)]
    notes.append(Job(13, NOTE, queue_id="Q9", envelope=_state("Q9")))
    out = answers(writer.run(notes))
    assert out[:2] == [(11, 1, ""), (12, 1, "")] and out[2][:2] == (13, -errno.ENOENT)
    assert len(flushes) == 1  # both notes in one segment: one flush
    flushes.clear()  # a note in a batch with messages shares the batch's flush
    out = answers(writer.run([notes[0], job(3, box)]))
    assert out == [(11, 1, ""), (3, 1, "")] and len(flushes) == 1
    # What a recovery after kill -9 would park (test_journal.py replays a STATE record).
    assert writer.segment is not None
    with open(writer.segment.path, "rb") as f:
        live = journal.parse(f.read()).live()
    assert [e.envelope for e in live] == [_state("Q1"), _state("Q2")]


def _state(queue_id: str) -> bytes:
    rcpts = [Recipient("u@x.test", status="delivered"), Recipient("r@y.test", status="bounced")]
    return Envelope(queue_id, "s@x.test", rcpts, 1.0).to_json()


def test_a_replay_job_makes_what_the_start_left(tmp_path: Path, writer: JournalWriter) -> None:
    """A probe: mail acknowledged on a full disk, then kill -9 and a start on a disk still
    full: the start's replay was cut short, and once the disk had room ``queue flush`` did
    nothing; a second restart was needed. A REPLAY job (the flush) replays what is left,
    and leaves the running writer's own segment alone."""
    box = tmp_path / "mail" / "x.test" / "u"
    assert answers(writer.run([job(1, box)])) == [(1, 1, "")]  # its own segment, in use
    data = b"H: 1\nleft\n"
    left = Entry(1, "L1", b'{"id": "L1"}', (Target(0, str(box), "9.L1_0.h"),), data)
    dead = tmp_path / "journal" / f"0.99999{journal.SUFFIX}"  # (not the writer's name)
    dead.write_bytes(
        b"".join(journal.encode_start(writer.boot)) + b"".join(journal.encode_entry(left))
    )
    refusal = tmp_path / "journal" / f"dead{journal.REFUSED}"
    refusal.write_text("")  # another writer's, read at its start: not the flush's to remove
    assert answers(writer.run([Job(7, REPLAY)])) == [(7, 1, "")]
    assert (box / "new" / "9.L1_0.h").read_bytes() == data
    assert not dead.exists()
    assert writer.segment is not None and os.path.exists(writer.segment.path)
    assert refusal.exists()
    assert answers(writer.run([job(2, box)])) == [(2, 1, "")]  # and goes on writing


def test_a_failed_job_fails_alone(tmp_path: Path, writer: JournalWriter) -> None:
    (tmp_path / "file").write_bytes(b"")  # a Maildir cannot be made under a plain file
    good = tmp_path / "good"
    bad = tmp_path / "file" / "box"
    out = answers(writer.run([job(1, good), job(2, bad), job(3, good)]))
    assert [(i, s) for i, s, _ in out] == [(1, 1), (2, -errno.ENOTDIR), (3, 1)]
    assert out[1][2] == "Not a directory"


def test_a_failed_journal_flush_fails_the_batch_and_publishes_nothing(
    tmp_path: Path, writer: JournalWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    box = tmp_path / "box"
    out = answers(writer.run([job(1, box), job(2, box)]))
    assert out == [(1, -errno.EIO, "Input/output error"), (2, -errno.EIO, "Input/output error")]
    assert not box.exists()  # nothing written at all
    # The kernel may have dropped what it could not write: a record appended past that hole
    # would read as damage after a power loss. The segment is kept; the next batch starts another.
    assert writer.segment is None
    assert answers(writer.run([job(3, box)])) == [(3, -errno.EIO, "Input/output error")]
    monkeypatch.undo()
    assert answers(writer.run([job(4, box)])) == [(4, 1, "")]
    segments = [n for n in os.listdir(tmp_path / "journal") if n.endswith(journal.SUFFIX)]
    assert len(segments) == 2  # the failed one kept for recovery (never marked synced)


def test_a_message_refused_for_its_kept_mark_is_not_made_again_after_a_crash(
    tmp_path: Path, writer: JournalWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every recipient local, one copy failed, and the KEPT mark that would make the queue
    # hold it could not be written: the client gets 452 and sends it again. Its failed copy
    # had no settled mark, so a crash then made it from the journal as well: twice.
    (tmp_path / "file").write_bytes(b"")
    good, bad = tmp_path / "good", tmp_path / "file" / "box"
    targets = (Target(0, str(good), "1.Q1_0.h"), Target(1, str(bad), "1.Q1_1.h"))
    entry = Entry(0, "Q1", b'{"id": "Q1"}', targets, b"m\n")
    append = journal.Segment.append

    def no_flushed_append(self: journal.Segment, records: list[bytes], sync: bool) -> None:
        if sync:
            raise OSError(errno.EIO, "Input/output error")
        append(self, records, sync)

    monkeypatch.setattr(journal.Segment, "append", no_flushed_append)
    assert answers(writer.run([Job(1, ACCEPT, entry=entry)])) == [
        (1, -errno.EIO, "Input/output error")
    ]
    assert writer.segment is None  # retired: a failed flush may have left a hole
    (segment,) = [n for n in os.listdir(tmp_path / "journal") if n.endswith(journal.SUFFIX)]
    contents = journal.parse((tmp_path / "journal" / segment).read_bytes())
    assert {(1, 0), (1, 1)} <= contents.settled


def test_an_earlier_copy_is_found_in_new_or_cur(tmp_path: Path, writer: JournalWriter) -> None:
    box = tmp_path / "box"
    first = job(1, box)
    assert first.entry is not None
    again = Job(2, ACCEPT, entry=first.entry)  # the same message again, after a crash
    assert answers(writer.run([first])) == [(1, 1, "")]
    assert answers(writer.run([again])) == [(2, 0, "")]


def test_a_mailbox_removed_between_batches_is_made_again(
    tmp_path: Path, writer: JournalWriter
) -> None:
    box = tmp_path / "box"
    writer.run([job(1, box)])
    shutil.rmtree(box)  # an admin removed it
    assert answers(writer.run([job(2, box, b"two\n")])) == [(2, 1, "")]
    assert [p.read_bytes() for p in (box / "new").iterdir()] == [b"two\n"]


def test_the_journal_is_flushed_and_removed_at_close(tmp_path: Path) -> None:
    (tmp_path / "journal").mkdir()
    writer = JournalWriter(str(tmp_path / "journal"))
    box = tmp_path / "box"
    writer.run([job(i, box) for i in range(1, 6)])
    segments = [n for n in os.listdir(tmp_path / "journal") if n.endswith(journal.SUFFIX)]
    assert len(segments) == 1  # the durable copy, until flushed
    writer.close()
    assert os.listdir(tmp_path / "journal") == [journal.BODIES]
    assert len(os.listdir(box / "new")) == 5


def test_full_segments_make_way_for_new_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "SEGMENT_SIZE", 10_000)
    monkeypatch.setattr(journal.Syncer, "DELAY", 0.01)
    (tmp_path / "journal").mkdir()
    writer = JournalWriter(str(tmp_path / "journal"))
    box = tmp_path / "box"
    for i in range(1, 41):
        writer.run([job(i, box, b"x" * 1000)])
    time.sleep(0.2)  # the syncer retires the full segments
    assert 1 <= len(os.listdir(tmp_path / "journal")) - 1 <= 2
    writer.close()
    assert os.listdir(tmp_path / "journal") == [journal.BODIES]
    assert len(os.listdir(box / "new")) == 40


def envelope(i: int, *rcpts: str) -> Envelope:
    return Envelope(
        id=f"Q{i:06d}",
        sender="s@x.test",
        recipients=[Recipient(r) for r in rcpts],
        created=1_800_000_000.0,
        client_ip="127.0.0.1",
        helo="x",
    )


async def write_one(writer: MaildirWriter, box: str, name: str, data: bytes) -> bool:
    entry = Entry(0, "Q" + name.replace(".", ""), b"{}", (Target(0, box, name),), data)
    (result,) = await writer.accept(entry)
    if isinstance(result, OSError):
        raise result
    return result


async def accept(queue: LocalQueue, env: Envelope, data: bytes) -> list[OSError | None]:
    draft = queue.draft(env.id, env.sender)
    draft.write(data)
    copies = [LocalCopy(i, r.address) for i, r in enumerate(env.recipients)]
    return await queue.accept(env, draft, copies)


def test_local_delivery_through_the_child_process(tmp_path: Path) -> None:
    queue = LocalQueue(tmp_path, "mx.x.test", MaildirWriter(tmp_path / "journal"))
    big = b"x" * 998 + b"\r\n"

    async def main() -> None:
        outcomes = await asyncio.gather(
            *(accept(queue, envelope(i, "u@x.test"), b"m\r\n") for i in range(50))
        )
        assert outcomes == [[None]] * 50
        await accept(queue, envelope(99, "u@x.test"), big * 3000)  # in a body file
        assert queue.writer is not None
        await queue.writer.close()
        await queue.spares.close()

    asyncio.run(main())
    new = tmp_path / "mail" / "x.test" / "u" / "new"
    bodies = sorted((p.read_bytes() for p in new.iterdir()), key=len)
    trace = b"Return-Path: <s@x.test>\n"
    assert bodies[:50] == [trace + b"m\n"] * 50
    assert bodies[50] == trace + (b"x" * 998 + b"\n") * 3000
    name = next(p.name for p in new.iterdir() if p.name.startswith("1800000000.Q000099_0."))
    assert maildir.name_field(name, "S") == len(bodies[50])
    assert maildir.name_field(name, "W") == len(bodies[50]) + 3001
    assert os.listdir(tmp_path / "journal" / journal.BODIES) == []  # linked, then unnamed


async def accept_watched(
    queue: LocalQueue, env: Envelope, body: bytes, sent: list[int]
) -> list[OSError | None]:
    """Accept, counting the octets each write to the child carries."""
    assert queue.writer is not None
    answers = await queue.writer.start()
    real = answers.transport.writelines

    def writelines(data: list[bytes]) -> None:
        sent.append(sum(len(d) for d in data))
        real(data)

    answers.transport.writelines = writelines  # type: ignore[method-assign]
    try:
        return await accept(queue, env, body)
    finally:
        await queue.writer.close()


def test_a_writer_that_died_is_storage_unavailable_and_a_full_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A writer killed in the middle of a job answered its clients "Insufficient system
    # storage", counted as a full disk: an admin went looking at the disk.
    from postroom.errors import StorageUnavailable, TemporaryStorageError

    queue = LocalQueue(tmp_path, "mx.x.test", MaildirWriter(tmp_path / "journal"))
    assert queue.writer is not None
    for error, unavailable in (
        (OSError(errno.EIO, "the journal writer process exited"), True),
        (OSError(errno.ENOSPC, "No space left on device"), False),
    ):

        async def refuse(_entry: Entry, error: OSError = error) -> Any:
            raise error

        monkeypatch.setattr(queue.writer, "accept", refuse)
        with pytest.raises(TemporaryStorageError) as raised:
            asyncio.run(accept(queue, envelope(1, "u@x.test"), b"Subject: x\r\n\r\nx\r\n"))
        assert isinstance(raised.value, StorageUnavailable) is unavailable


def test_a_message_is_written_once_for_many_recipients(tmp_path: Path) -> None:
    queue = LocalQueue(tmp_path, "mx.x.test", MaildirWriter(tmp_path / "journal"))
    keys = [f"u{i}@x.test" for i in range(30)]
    for small in (True, False):
        body = b"Subject: many\r\n\r\n" + b"y" * (100 if small else 100_000) + b"\r\n"
        sent: list[int] = []
        env = envelope(int(small), *keys)
        assert asyncio.run(accept_watched(queue, env, body, sent)) == [None] * 30
        # Small: the octets cross to the child once; large: only the body file's name does.
        assert len(sent) == 1 and sent[0] < (len(body) if small else 0) + 10_000
        inodes = set()
        for index, key in enumerate(keys):
            new = tmp_path / "mail" / "x.test" / key.split("@")[0] / "new"
            (path,) = (p for p in new.iterdir() if f".Q{int(small):06d}_{index}." in p.name)
            stored = b"Return-Path: <s@x.test>\n" + body.replace(b"\r\n", b"\n")
            assert path.read_bytes() == stored
            inodes.add(path.stat().st_ino)
        assert len(inodes) == 1  # one file, linked into every Maildir


def test_a_child_that_dies_fails_its_jobs_and_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = MaildirWriter(tmp_path / "journal")
    box = str(tmp_path / "box")

    async def main() -> None:
        assert await write_one(writer, box, "1.a", b"one\n")
        first = writer._proc
        assert first is not None
        os.kill(first.pid, signal.SIGSTOP)  # stuck: the next job waits in the socket
        pending = asyncio.ensure_future(write_one(writer, box, "2.b", b"two\n"))
        await asyncio.sleep(0.05)
        assert not pending.done()
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(OSError, match="writer process exited"):
            await asyncio.wait_for(pending, 10)
        # 2.b's client gets a 452: written down first, for whoever replays the dead journal.
        (refusal,) = (tmp_path / "journal").glob(f"*{journal.REFUSED}")
        assert refusal.read_text() == "Q2b\n"
        # The next job starts a new child, which writes it (and replays the dead one's).
        with caplog.at_level(logging.WARNING, logger="postroom"):
            assert await write_one(writer, box, "3.c", b"three\n")
        assert f"Maildir writer (pid {first.pid})" in caplog.text  # said, not silent
        assert "starting a new one" in caplog.text
        assert writer._proc is not None and writer._proc.pid != first.pid
        assert first.poll() is not None  # the dead one was reaped
        assert not refusal.exists()  # the new child replayed the journal: done with it
        with pytest.raises(OSError) as err:  # errors come back as OSError with their errno
            await write_one(writer, str(tmp_path / "box" / "new" / "1.a"), "x", b"")
        assert err.value.errno == errno.ENOTDIR
        await writer.close()

    asyncio.run(main())
    assert sorted(os.listdir(tmp_path / "box" / "new")) == ["1.a", "3.c"]


def test_a_writer_that_cannot_be_started_again_stops_its_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Started as root before the drop, a dead writer could not be started again as the mail
    # user (the interpreter under /root): every message got 452, counted as a full disk, for
    # good. The worker stops now, and the supervisor starts it again, as root.
    from postroom import childproc
    from postroom.errors import StorageUnavailable

    writer = MaildirWriter(tmp_path / "journal")
    box = str(tmp_path / "box")
    signals: list[int] = []

    def refused(*_args: object) -> Any:
        raise PermissionError(13, "Permission denied")

    async def main() -> None:
        assert await write_one(writer, box, "1.a", b"one\n")
        assert writer._proc is not None
        writer._proc.kill()
        writer._proc.wait()
        monkeypatch.setattr(childproc, "start", refused)
        monkeypatch.setattr(os, "kill", lambda pid, sig: signals.append(sig))
        for name in ("2.b", "3.c"):
            with pytest.raises((StorageUnavailable, OSError)):
                await write_one(writer, box, name, b"x\n")
        monkeypatch.undo()
        await writer.close()

    asyncio.run(main())
    assert signals == [signal.SIGTERM]  # once


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_the_child_runs_behind_the_server(tmp_path: Path) -> None:
    # A batch task: a job wakes it without preempting the server (childproc.run_behind_server).
    writer = MaildirWriter(tmp_path / "journal")

    async def main() -> None:
        assert await write_one(writer, str(tmp_path / "box"), "1.a", b"one\n")
        assert writer._proc is not None
        assert os.sched_getscheduler(writer._proc.pid) == os.SCHED_BATCH
        assert os.sched_getscheduler(0) != os.SCHED_BATCH  # the server itself is not
        await writer.close()

    asyncio.run(main())


def test_close_lets_the_child_finish_what_it_was_sent(tmp_path: Path) -> None:
    writer = MaildirWriter(tmp_path / "journal")
    box = str(tmp_path / "box")

    async def main() -> list[bool]:
        await writer.start()
        jobs = [asyncio.ensure_future(write_one(writer, box, f"{i}.n", b"m\n")) for i in range(20)]
        await asyncio.sleep(0)  # each job is sent to the child; none is answered yet
        assert not any(j.done() for j in jobs)
        await writer.close()
        return list(await asyncio.gather(*jobs))

    started = time.monotonic()
    assert asyncio.run(main()) == [True] * 20
    assert time.monotonic() - started < 5
    assert len(os.listdir(tmp_path / "box" / "new")) == 20


def test_the_child_dies_with_the_server(tmp_path: Path) -> None:
    # Stopped, the child cannot see the end of its input: only the kernel's parent-death
    # signal can end it when the server is killed.
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from postroom.storage.local.maildir_writer import MaildirWriter\n"
        "from postroom.storage.local.journal import Entry, Target\n"
        "async def main():\n"
        f"    w = MaildirWriter(Path({str(tmp_path / 'journal')!r}))\n"
        f"    t = Target(0, {str(tmp_path / 'box')!r}, '1.a')\n"
        "    await w.accept(Entry(0, 'Q1', b'{}', (t,), b'm'))\n"
        "    print(w._proc.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        os.kill(child, signal.SIGSTOP)
        server.kill()
        server.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.02)
        assert not _alive(child)
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_the_child_runs_with_the_servers_interpreter_options(tmp_path: Path) -> None:
    # Started with -I the server ignores PYTHONPATH: so must its writer, or it could import
    # another postroom than the server's.
    script = (
        "import asyncio\n"
        "from pathlib import Path\n"
        "from postroom.storage.local.maildir_writer import MaildirWriter\n"
        "from postroom.storage.local.journal import Entry, Target\n"
        "async def main():\n"
        f"    w = MaildirWriter(Path({str(tmp_path / 'journal')!r}))\n"
        f"    t = Target(0, {str(tmp_path / 'box')!r}, '1.a')\n"
        "    print(await w.accept(Entry(0, 'Q1', b'{}', (t,), b'm')))\n"
        "    print(open(f'/proc/{w._proc.pid}/cmdline').read().split(chr(0)))\n"
        "    await w.close()\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-X", "dev", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "elsewhere")},
    )
    assert out.returncode == 0, out.stderr
    written, cmdline = out.stdout.splitlines()
    assert written == "[True]"
    assert "'-I', '-X', 'dev', '-m', 'postroom.storage.local.maildir_writer'" in cmdline


def test_copies_use_unnamed_files_made_ahead(tmp_path: Path, writer: JournalWriter) -> None:
    box = tmp_path / "box"
    writer.refill()
    assert writer._spares.ok and len(writer._spares._fds) == 8
    assert answers(writer.run([job(i, box) for i in range(1, 4)])) == [
        (i, 1, "") for i in (1, 2, 3)
    ]
    assert len(writer._spares._fds) == 5  # three were used, none went through tmp/
    assert sorted(p.read_bytes() for p in (box / "new").iterdir()) == [b"m\n"] * 3
    writer.refill()
    # The same name again (no check asked): the copy there is this one, nothing is replaced.
    assert answers(writer.run([job(1, box)])) == [(1, 0, "")]
    assert os.listdir(box / "tmp") == [] and len(os.listdir(box / "new")) == 3


def test_maildirs_on_another_file_system_are_written_through_tmp(
    tmp_path: Path, writer: JournalWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(fd: int, box: str, name: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(maildir, "link_unnamed", cross_device)
    writer.refill()
    box = tmp_path / "box"
    assert answers(writer.run([job(1, box), job(2, box)])) == [(1, 1, ""), (2, 1, "")]
    assert not writer._spares.ok and writer._spares._fds == deque()
    assert len(os.listdir(box / "new")) == 2 and os.listdir(box / "tmp") == []


def test_a_writer_started_on_a_full_disk_answers_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = journal.Segment.create
    full = [True]

    def create(directory: str, boot: str) -> journal.Segment:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, boot)

    monkeypatch.setattr(journal.Segment, "create", staticmethod(create))
    (tmp_path / "journal").mkdir()
    writer = JournalWriter(str(tmp_path / "journal"))  # starts all the same (POP3 must)
    box = tmp_path / "box"
    assert answers(writer.run([job(1, box)])) == [(1, -errno.ENOSPC, "No space left on device")]
    full[0] = False  # room again
    assert answers(writer.run([job(2, box)])) == [(2, 1, "")]
    writer.close()
    assert os.listdir(tmp_path / "journal") == [journal.BODIES]
    assert len(os.listdir(box / "new")) == 1


def test_a_failed_bulk_flush_keeps_the_journal_for_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def syncfs(directory: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal, "syncfs", syncfs)
    (tmp_path / "journal").mkdir()
    writer = JournalWriter(str(tmp_path / "journal"))
    box = tmp_path / "box"
    assert answers(writer.run([job(1, box)])) == [(1, 1, "")]  # durable in the journal
    writer.close()
    (kept,) = [n for n in os.listdir(tmp_path / "journal") if n.endswith(journal.SUFFIX)]
    contents = journal.parse((tmp_path / "journal" / kept).read_bytes())
    assert [e.seq for e in contents.entries] == [1] and contents.synced == 0


def test_the_child_writes_no_shared_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With several workers the server's metrics are files in PROMETHEUS_MULTIPROC_DIR; a child
    # that inherited it wrote its own zeros there (postroom_start_time_seconds fell to 0).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    writer = MaildirWriter(tmp_path / "journal")

    async def main() -> None:
        assert await write_one(writer, str(tmp_path / "box"), "1.a", b"one\n")
        assert writer._proc is not None
        environ = Path(f"/proc/{writer._proc.pid}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"PROMETHEUS_MULTIPROC_DIR=") for v in environ)
        await writer.close()

    asyncio.run(main())


def test_a_sighup_meant_for_the_server_leaves_the_child_alone(tmp_path: Path) -> None:
    writer = MaildirWriter(tmp_path / "journal")  # (`pkill -HUP postroom` killed it)

    async def main() -> None:
        assert await write_one(writer, str(tmp_path / "box"), "1.a", b"one\n")
        child = writer._proc
        assert child is not None
        os.kill(child.pid, signal.SIGHUP)
        await asyncio.sleep(0.2)
        assert await write_one(writer, str(tmp_path / "box"), "2.b", b"two\n")
        assert writer._proc is child and child.poll() is None
        await writer.close()

    asyncio.run(main())


def test_a_failed_flush_of_a_kept_record_retires_the_segment(
    tmp_path: Path, writer: JournalWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ACCEPT flush's failure retired its segment (the kernel may drop what it could not
    # write: a later record past that hole reads as damage and hides what follows), but the
    # same failure of the flush of a KEPT record (a copy failed) let batches go on into it.
    good = tmp_path / "mail" / "x.test" / "u"
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "u"  # its copy fails (ENOTDIR): the entry is kept late
    writer.run([job(1, good)])
    first = writer.segment
    assert first is not None
    real = os.fdatasync
    calls: list[int] = []

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # 1: the ACCEPT flush, 2: the KEPT record's
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    out = answers(writer.run([job(2, bad)]))
    monkeypatch.setattr(os, "fdatasync", real)
    assert out[0][1] < 0  # not acknowledged
    assert first.broken and first.retired and writer.segment is not first
    writer.run([job(3, good)])
    assert writer.segment is not first
