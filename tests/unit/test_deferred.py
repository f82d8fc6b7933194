"""The deferred store: parking, removal, start-up cleaning, and the schedule read from the
state files' mtimes alone."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from pathlib import Path

import pytest

from postroom.errors import LeaseLost, QueueError
from postroom.queue.envelope import Envelope, Recipient
from postroom.storage.local.deferred import DeferredStore
from postroom.storage.local.queue import LocalQueue


def envelope(qid: str, attempts: int, next_attempt: float) -> Envelope:
    return Envelope(
        qid, "s@x.test", [Recipient("r@y.test")], 1.0, attempts=attempts, next_attempt=next_attempt
    )


def test_the_schedule_comes_from_the_state_files_mtimes(tmp_path: Path) -> None:
    store = DeferredStore(tmp_path / "queue")
    store.park(envelope("A1", 2, 2_000_000_000.0).to_json(), "A1", b"x", "")
    store.park(envelope("B2", 0, 2_000_000_000.0).to_json(), "B2", b"x", "")  # never tried
    (store.msg_dir / "C3").write_bytes(b"x")  # its state lost: due now, quarantined then
    (store.state_dir / "D4.json").write_bytes(b"{}")  # a state without its message
    (store.msg_dir / ".E5.tmp").write_bytes(b"half")  # a crash while parking
    assert store.clean() == 2
    assert sorted(store.schedule()) == [("A1", 2_000_000_000.0), ("B2", 0.0), ("C3", 0.0)]
    later = envelope("A1", 3, 2_100_000_000.0)
    store.save_state(later)
    assert dict(store.schedule())["A1"] == 2_100_000_000.0
    assert store.load("A1") == later


def test_an_unreadable_message_is_quarantined_when_it_is_due(tmp_path: Path) -> None:
    queue = LocalQueue(tmp_path, "mx.x.test")
    queue.deferred.park(envelope("A1", 0, 0.0).to_json(), "A1", b"x", "")
    (queue.deferred.msg_dir / "BAD1").write_bytes(b"no state")
    assert queue.recover() == 2
    (good,) = asyncio.run(queue.claim(1e10, 10))
    assert good.id == "A1"
    (problem,) = queue.problems()
    assert "BAD1" in problem and (tmp_path / "queue" / "corrupt" / "BAD1").exists()
    asyncio.run(queue.delete("A1"))
    assert queue.deferred.ids() == []
    with pytest.raises(QueueError):
        asyncio.run(queue.delete("A1"))
    assert not os.listdir(queue.deferred.state_dir)


def test_a_message_deleted_as_its_attempt_begins_is_dropped_not_failed(tmp_path: Path) -> None:
    """`queue delete` between the claim and the read of the body: the attempt failed with a
    traceback and its failure wrote the state file back, left until the next start
    (queuescale probe). The queue says the lease is lost, as PostgreSQL's does."""
    queue = LocalQueue(tmp_path, "mx.x.test")
    queue.deferred.park(envelope("A1", 0, 0.0).to_json(), "A1", b"x", "")
    queue.recover()
    (claimed,) = asyncio.run(queue.claim(1e10, 10))
    asyncio.run(queue.delete("A1"))
    with pytest.raises(LeaseLost):
        asyncio.run(queue.body(claimed))
    assert queue.deferred.ids() == [] and not os.listdir(queue.deferred.state_dir)


def test_a_state_saved_as_its_message_is_deleted_is_not_left_behind(tmp_path: Path) -> None:
    """An attempt's state written just after `queue delete` took the message: the state file
    stayed, without its message, until the next start (recheck probe, 12 in 150 deletes)."""
    store = DeferredStore(tmp_path)
    env = envelope("A1", 1, 0.0)
    store.park(env.to_json(), "A1", b"x", "")
    store.remove("A1")
    store.save_state(env)
    assert not list(store.state_dir.iterdir()) and store.ids() == []


def test_a_primary_started_again_leaves_a_living_writers_park_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Worker 0 restarts while worker 1's writer parks a message: its state is durable, its
    # message not yet renamed into place. The start-up cleaning took that state for one a
    # crash cut in two, and the message then went to corrupt/ as unreadable.
    from postroom.storage.local import files

    secondary = DeferredStore(tmp_path / "queue")
    fsync_dir = files.fsync_dir
    restarted: list[LocalQueue] = []

    def restart_between(path: str | os.PathLike[str]) -> None:
        fsync_dir(path)
        if str(path).endswith("state") and not restarted:
            restarted.append(LocalQueue(tmp_path, "mx.x.test"))
            restarted[0].recover(clean=False)

    monkeypatch.setattr(files, "fsync_dir", restart_between)
    secondary.park(envelope("A1", 0, 0.0).to_json(), "A1", b"x", "")
    monkeypatch.setattr(files, "fsync_dir", fsync_dir)
    (primary,) = restarted
    primary.schedule(secondary.load("A1"))  # handed over once parked
    (claimed,) = asyncio.run(primary.claim(1e10, 10))
    assert claimed.id == "A1" and primary.problems() == []


def test_a_record_the_disk_refused_keeps_the_message_due_with_what_it_learnt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk at the record after an attempt dropped the message from the schedule: it
    # was not tried again (nor flushed, counted or expired) until a restart.
    queue = LocalQueue(tmp_path, "mx.x.test")
    queue.deferred.park(envelope("A1", 0, 0.0).to_json(), "A1", b"x", "")
    queue.recover()
    (claimed,) = asyncio.run(queue.claim(1e10, 10))
    claimed.attempts, claimed.next_attempt = 1, 2_000_000_000.0
    claimed.recipients[0].status = "deferred"
    save_state = queue.deferred.save_state

    def full(_envelope: Envelope) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(queue.deferred, "save_state", full)
    with pytest.raises(OSError):
        asyncio.run(queue.record(claimed, []))
    assert asyncio.run(queue.claim(1_900_000_000.0, 10)) == []  # not due yet
    assert queue.flush() == 1
    (again,) = asyncio.run(queue.claim(1e10, 10))
    assert again is claimed  # what the attempt learnt, not the disk's older state
    monkeypatch.setattr(queue.deferred, "save_state", save_state)
    asyncio.run(queue.record(again, []))
    assert queue.deferred.load("A1").attempts == 1
    (from_disk,) = asyncio.run(queue.claim(1e10, 10))
    assert from_disk is not claimed and from_disk.attempts == 1


def test_a_flush_during_an_attempt_makes_the_message_due_when_it_ends(tmp_path: Path) -> None:
    """A probe: ``queue flush`` right after the disk had room again left the messages whose
    attempts were being recorded at that moment to the retry interval (5 minutes)."""
    queue = LocalQueue(tmp_path, "mx.x.test")
    for qid in ("A1", "B1"):
        queue.deferred.park(envelope(qid, 0, 0.0).to_json(), qid, b"x", "")
    queue.recover()
    claimed = asyncio.run(queue.claim(1e10, 10))
    assert sorted(e.id for e in claimed) == ["A1", "B1"]
    assert queue.flush(busy={"A1", "B1"}) == 0  # nothing waits: both are in their attempts
    for env in claimed:
        env.attempts, env.next_attempt = 1, 2_000_000_000.0
        env.recipients[0].status = "deferred"
        asyncio.run(queue.record(env, []))
    due = asyncio.run(queue.claim(time.time() + 1, 10))  # not at the retry interval
    assert sorted(e.id for e in due) == ["A1", "B1"]
    for env in due:
        env.attempts, env.next_attempt = 2, 2_000_000_000.0
        asyncio.run(queue.record(env, []))  # once: the next record keeps its schedule
    assert asyncio.run(queue.claim(time.time() + 1, 10)) == []


def test_a_message_finished_while_listed_is_no_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `queue list` beside a running server: a message listed, then delivered and removed
    # before its state was read, printed "no such message" on stderr as a problem.
    store = DeferredStore(tmp_path / "queue")
    store.park(envelope("A1", 0, 0.0).to_json(), "A1", b"x", "")
    (store.msg_dir / "BAD1").write_bytes(b"no state")
    listed = [*store.ids(), "GONE1"]
    monkeypatch.setattr(store, "ids", lambda: listed)
    found = list(store.iter_envelopes())
    assert [e.id for e in found if isinstance(e, Envelope)] == ["A1"]
    assert [str(e) for e in found if isinstance(e, QueueError)] == ["BAD1: state file missing"]


def test_a_first_attempt_finds_its_body_parked_by_a_new_writer(tmp_path: Path) -> None:
    # A large kept message in its first attempt; its writer died and the next one's recovery
    # renamed the body file into the deferred store: the attempt reads it there.
    from postroom.storage.local.queue import _Live

    queue = LocalQueue(tmp_path, "mx.x.test")
    env = envelope("A1", 0, 0.0)
    queue._live["A1"] = _Live(env, b"", str(tmp_path / "journal" / "bodies" / "gone"))
    queue.deferred.park(env.to_json(), "A1", b"the body\n", "")
    assert asyncio.run(queue.body(env)) == b"the body\n"


def test_a_retry_of_a_message_still_in_the_journal_makes_its_local_copies(
    tmp_path: Path,
) -> None:
    """A full disk refused a message's record (it stayed in the journal, not parked): its
    retry read the deferred store's copy, which does not exist, and failed again with room."""
    from postroom.storage.interfaces import LocalCopy
    from postroom.storage.local.queue import LocalMailboxes, _Live

    queue = LocalQueue(tmp_path, "mx.x.test")
    env = Envelope("A1", "s@x.test", [Recipient("bob@x.test")], 1.0)
    queue._live["A1"] = _Live(env, b"Subject: kept\n\nin the journal\n", "")
    (error,) = asyncio.run(LocalMailboxes(queue).deliver(env, [LocalCopy(0, "bob@x.test")]))
    assert error is None
    (name,) = os.listdir(Path(queue.box("bob@x.test")) / "new")
    assert (Path(queue.box("bob@x.test")) / "new" / name).read_bytes().endswith(b"journal\n")


def test_a_park_the_disk_refuses_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each failed write left its .ID.tmp until the next start: an inode apiece, on a disk
    that was full already (135 of them in one run)."""
    store = DeferredStore(tmp_path)
    env = Envelope("Q1", "s@x.test", [Recipient("r@y.test")], 1.0)

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        store.park(env.to_json(), "Q1", b"body", "")
    left = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert not [name for name in left if name.endswith(".tmp")], left


def test_show_of_a_message_whose_state_is_damaged_says_so(tmp_path: Path) -> None:
    """`queue list` reported an unreadable state, then `queue show` of that id said "no such
    message" while `queue delete` removed it (cliadv probe)."""
    queue = LocalQueue(tmp_path, "mx.x.test")
    queue.deferred.park(envelope("A1", 0, 0.0).to_json(), "A1", b"x", "")
    (queue.deferred.state_dir / "A1.json").write_bytes(b'{"id": "A1", "sen')
    with pytest.raises(QueueError, match="A1: unreadable envelope"):
        queue.load("A1")
    with pytest.raises(QueueError, match="no such message B1"):
        queue.load("B1")
    # Valid JSON, damaged: a time no date can show (queue list and show ended in an
    # OverflowError traceback), another message's id (shown, then "no such message").
    for damage in ({"next_attempt": 1e20}, {"created": float("nan")}, {"id": "C1"}):
        raw = json.loads(envelope("A1", 0, 0.0).to_json()) | damage
        (queue.deferred.state_dir / "A1.json").write_text(json.dumps(raw))
        with pytest.raises(QueueError, match="A1: unreadable envelope"):
            queue.load("A1")
        (problem,) = queue.deferred.iter_envelopes()
        assert isinstance(problem, QueueError), damage


def test_a_state_that_cannot_be_read_or_a_truncated_message_is_set_aside(tmp_path: Path) -> None:
    """A directory where a state file should be ended the runner's task (an OSError, not a
    QueueError); a truncated or emptied message file was sent as it was."""
    queue = LocalQueue(tmp_path, "mx.x.test")
    for qid in ("A1", "B2", "C3", "D4"):
        env = envelope(qid, 1, 1.0)
        env.size = 5
        queue.deferred.park(env.to_json(), qid, b"hello", "")
    (queue.deferred.state_dir / "B2.json").unlink()
    (queue.deferred.state_dir / "B2.json").mkdir()
    (queue.deferred.msg_dir / "C3").write_bytes(b"hel")
    (queue.deferred.msg_dir / "D4").write_bytes(b"")
    assert [e.id for e in queue.entries()] == ["A1"]  # `queue list` lists the others
    assert len(queue.problems()) == 3
    assert queue.recover() == 4
    (good,) = asyncio.run(queue.claim(1e10, 10))
    assert good.id == "A1"
    problems = " ".join(queue.problems())
    assert "B2: state file unreadable" in problems
    assert "C3: the message file holds 3 octets, its state 5" in problems
    assert "D4: the message file holds 0 octets" in problems
    corrupt = sorted(os.listdir(tmp_path / "queue" / "corrupt"))
    assert corrupt == ["B2", "B2.json", "C3", "C3.json", "D4", "D4.json"]


def _parked(queue: LocalQueue, *qids: str) -> None:
    for qid in qids:
        env = envelope(qid, 1, 1.0)
        env.size = 5
        queue.deferred.park(env.to_json(), qid, b"hello", "")


def test_a_queue_file_that_cannot_be_read_now_is_tried_again_not_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """queue/state (or queue/msg) without permission for a while: every due message was set
    aside (and the next start removed their states), or dropped from the schedule."""
    from postroom.storage.local import deferred as deferred_module

    queue = LocalQueue(tmp_path, "mx.x.test")
    _parked(queue, "A1", "B2", "C3")
    assert queue.recover() == 3
    real_read, real_stat = deferred_module.files.read_regular, deferred_module.os.stat

    def read(path: Path, **kw: bool) -> bytes:
        if path.name == "B2.json":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_read(path, **kw)

    def stat(path: object, *args: object, **kw: object) -> os.stat_result:
        if str(path).endswith("/C3"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_stat(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(deferred_module.files, "read_regular", read)
    monkeypatch.setattr(deferred_module.os, "stat", stat)
    (good,) = asyncio.run(queue.claim(1e10, 10))
    monkeypatch.undo()
    assert good.id == "A1"
    problems = queue.problems()
    assert len(problems) == 2 and all("tried again in a minute" in p for p in problems)
    assert not os.listdir(tmp_path / "queue" / "corrupt")
    assert asyncio.run(queue.claim(1e10 + 30, 10)) == []
    assert sorted(e.id for e in asyncio.run(queue.claim(1e10 + 61, 10))) == ["B2", "C3"]


def test_a_file_in_the_queue_that_is_no_message_is_set_aside_at_the_start(tmp_path: Path) -> None:
    """A name that is no queue id in queue/msg made every claim and listing fail: the error
    handler's id check raised again, and the batch's other messages left the schedule."""
    queue = LocalQueue(tmp_path, "mx.x.test")
    _parked(queue, "A1")
    (queue.deferred.msg_dir / "zz-not-an-id").write_bytes(b"junk")
    assert [e.id for e in queue.entries()] == ["A1"]
    assert queue.recover() == 1
    assert "zz-not-an-id" in queue.problems()[0]
    assert os.listdir(tmp_path / "queue" / "corrupt") == ["zz-not-an-id"]
    assert [e.id for e in asyncio.run(queue.claim(1e10, 10))] == ["A1"]


def test_a_corrupt_message_whose_state_cannot_be_moved_stays_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message went to corrupt/ without its state, which the next start then removed as
    a crash's leftover; and the log said nothing of it."""
    from postroom.storage.local import deferred as deferred_module

    queue = LocalQueue(tmp_path, "mx.x.test")
    _parked(queue, "A1")
    (queue.deferred.msg_dir / "A1").write_bytes(b"hel")
    queue.recover()
    real_replace = deferred_module.os.replace

    def replace(src: object, dst: object) -> None:
        if str(src).endswith("A1.json"):
            raise PermissionError(errno.EACCES, "Permission denied")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(deferred_module.os, "replace", replace)
    assert asyncio.run(queue.claim(1e10, 10)) == []
    monkeypatch.undo()
    (problem,) = queue.problems()
    assert "not moved aside (Permission denied)" in problem
    assert queue.deferred.has("A1") and (queue.deferred.state_dir / "A1.json").exists()


def test_a_message_done_whose_files_cannot_be_removed_keeps_what_was_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """queue/msg read-only for a while as a message was delivered: its removal failed, the
    outcome was not stored, and the restart sent it again."""
    from postroom.storage.local import deferred as deferred_module

    queue = LocalQueue(tmp_path, "mx.x.test")
    _parked(queue, "A1")
    queue.recover()
    (env,) = asyncio.run(queue.claim(1e10, 10))
    env.recipients[0].status = "delivered"
    real_unlink = deferred_module.os.unlink

    def unlink(path: object, *args: object, **kw: object) -> None:
        if str(path).endswith("/msg/A1"):
            raise PermissionError(errno.EACCES, "Permission denied")
        real_unlink(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(deferred_module.os, "unlink", unlink)
    asyncio.run(queue.finish(env, []))
    monkeypatch.undo()
    assert queue.deferred.load("A1").recipients[0].status == "delivered"
    (again,) = asyncio.run(queue.claim(time.time() + 61, 10))
    assert again.done
    asyncio.run(queue.finish(again, []))
    assert queue.deferred.ids() == []


def test_a_message_done_whose_outcome_cannot_be_stored_either_is_kept_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """queue/msg and queue/state read-only as it was delivered: nothing put it back in the
    schedule, and the restart a minute after the disk was writable again sent it again."""
    from postroom.storage.local import deferred as deferred_module

    queue = LocalQueue(tmp_path, "mx.x.test")
    _parked(queue, "A1")
    queue.recover()
    (env,) = asyncio.run(queue.claim(1e10, 10))
    env.recipients[0].status = "delivered"

    def refused(*_args: object, **_kw: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(deferred_module.os, "unlink", refused)
    monkeypatch.setattr(deferred_module, "_replace", refused)
    with pytest.raises(PermissionError):
        asyncio.run(queue.finish(env, []))
    monkeypatch.undo()
    (again,) = asyncio.run(queue.claim(time.time() + 61, 10))
    assert again is env and again.done  # from memory, not the disk's deferred state
    asyncio.run(queue.finish(again, []))
    assert queue.deferred.ids() == []
