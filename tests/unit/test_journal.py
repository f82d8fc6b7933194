"""The Maildir writer's journal: its records, and recovery after a crash or a power loss."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom import logs
from postroom.queue.envelope import Envelope, Recipient
from postroom.storage.local import journal, maildir
from postroom.storage.local.deferred import DeferredStore
from postroom.storage.local.journal import Entry, Target

BOOT = "this-boot"

entries_st = st.lists(
    st.tuples(
        st.lists(
            st.tuples(st.text("abc/", min_size=1), st.text("xyz.", min_size=1), st.binary()),
            min_size=1,
            max_size=3,
        ),
        st.binary(max_size=200),
    ),
    max_size=4,
)


@given(entries_st, st.integers(0, 2000))
def test_records_read_back_and_a_torn_tail_is_dropped(
    raw: list[tuple[list[tuple[str, str, bytes]], bytes]], cut: int
) -> None:
    entries = [
        Entry(
            seq,
            f"Q{seq}",
            b"{}",
            tuple(Target(i, *t[:2]) for i, t in enumerate(targets)),
            body,
            keep=seq % 2 == 0,
        )
        for seq, (targets, body) in enumerate(raw, 1)
    ]
    data = b"".join(journal.encode_start(BOOT))
    for e in entries:
        data += b"".join(journal.encode_entry(e))
    data += b"".join(journal.encode_settled([(1, 0), (2, 1)]))
    data += b"".join(journal.encode_released([2]))
    data += b"".join(journal.encode_synced(len(entries)))
    whole = journal.parse(data)
    assert whole.boot == BOOT and whole.entries == entries and whole.end == len(data)
    assert whole.settled == {(1, 0), (2, 1)} and whole.synced == len(entries)
    assert whole.released == {2} and [e.seq for e in whole.live()] == [4] * (len(entries) >= 4)
    assert journal.parse(data + bytes(4096)) == whole  # the zeros reserved ahead end it
    torn = journal.parse(data[:cut])  # a crash in the middle of an append
    assert torn.end <= cut and torn.entries == entries[: len(torn.entries)]
    flipped = bytearray(data)
    flipped[min(cut, len(data) - 1)] ^= 0xFF  # a damaged byte ends the segment there
    assert journal.parse(bytes(flipped)).end <= min(cut, len(data) - 1)


def segment(directory: Path, *records: list[bytes], boot: str = BOOT) -> Path:
    path = directory / f"1.1{journal.SUFFIX}"
    path.write_bytes(b"".join(journal.encode_start(boot)) + b"".join(b"".join(r) for r in records))
    return path


def entry(seq: int, *boxes: Path, body: bytes = b"H: 1\nbody\n", keep: bool = False) -> Entry:
    env = Envelope(f"Q{seq}", "s@x.test", [Recipient(f"u{i}@x.test") for i in range(3)], 1.0)
    targets = tuple(Target(i, str(b), f"{seq}.Q{seq}_{i}.h") for i, b in enumerate(boxes))
    return Entry(seq, f"Q{seq}", env.to_json(), targets, body, keep=keep)


def test_after_a_crash_unsettled_copies_are_published_once(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    one, two, three = entry(1, a, b), entry(2, c), entry(3, a)
    maildir.ensure(c)
    (c / "cur" / f"{two.targets[0].name}:2,S").write_bytes(b"H: 1\nbody\n")  # crash after
    path = segment(  # the rename, before the mark: found in cur/, not written again
        tmp_path,
        journal.encode_entry(one),
        journal.encode_entry(two),
        journal.encode_entry(three),
        journal.encode_settled([(1, 0), (3, 0)]),  # (3, 0): fetched and deleted since
    )
    assert journal.recover(str(tmp_path), BOOT) == 1
    assert not path.exists()
    assert not (a / "new").exists()  # settled: not written again
    assert os.listdir(b / "new") == [one.targets[1].name]
    assert (b / "new" / one.targets[1].name).read_bytes() == b"H: 1\nbody\n"
    assert os.listdir(c / "new") == []


def test_kept_messages_are_parked_once_with_their_copies_marked(tmp_path: Path) -> None:
    journal_dir = tmp_path / "journal"
    (journal_dir / journal.BODIES).mkdir(parents=True)
    a, b = tmp_path / "a", tmp_path / "b"
    inline = entry(1, a, b, keep=True)  # two local copies, a remote recipient left
    big = journal_dir / journal.BODIES / "Q2"
    big.write_bytes(b"H: 2\n" + b"x" * 100_000)
    size, crc = journal.file_crc(str(big))
    in_file = Entry(
        2,
        "Q2",
        entry(2).envelope,
        (Target(0, str(a), "2.Q2_0.h"),),
        b"",
        str(big),
        size,
        crc,
        keep=True,
    )
    released = entry(3, keep=True)
    parked = entry(4, keep=True)
    maildir.ensure(a)
    (a / "new" / inline.targets[0].name).write_bytes(inline.body)  # made before the crash
    store = DeferredStore(tmp_path / "queue")
    store.park(b'{"parked": "before the crash"}', "Q4", b"x", "")
    segment(
        journal_dir,
        *(journal.encode_entry(e) for e in (inline, in_file, released, parked)),
        journal.encode_settled([(1, 0)]),  # the crash came before b's copy
        journal.encode_released([3]),
    )
    assert journal.recover(str(journal_dir), BOOT) == 2  # b's copy, and the body file's
    assert store.ids() == ["Q1", "Q2", "Q4"]
    one = store.load("Q1")
    assert [r.status for r in one.recipients] == ["delivered", "delivered", "queued"]
    assert store.read("Q1") == inline.body
    assert store.read("Q2") == big.read_bytes() if big.exists() else True
    assert not big.exists()  # renamed into the deferred store, not copied
    assert (a / "new" / "2.Q2_0.h").stat().st_ino == os.stat(store.msg_path("Q2")).st_ino
    assert (
        tmp_path / "queue" / "state" / "Q4.json"
    ).read_bytes() == b'{"parked": "before the crash"}'
    assert os.listdir(journal_dir) == [journal.BODIES]


def test_a_kept_message_is_parked_with_its_last_state(tmp_path: Path) -> None:
    # The runner stored a newer state during the first attempt (the DSN it owes): the crash
    # came before the message was parked or released, and recovery parks that state.
    journal_dir = tmp_path / "journal"
    (journal_dir / journal.BODIES).mkdir(parents=True)
    kept = entry(1, keep=True)
    newer = Envelope("Q1", "s@x.test", [Recipient("r@y.test", status="bounced")], 1.0)
    path = segment(
        journal_dir,
        journal.encode_entry(kept),
        journal.encode_state(1, b'{"an": "older state"}'),
        journal.encode_state(1, newer.to_json()),
    )
    (live,) = journal.parse(path.read_bytes()).live()
    assert live.envelope == newer.to_json()  # what `queue list` shows meanwhile
    journal.recover(str(journal_dir), BOOT)
    assert DeferredStore(tmp_path / "queue").load("Q1").recipients[0].status == "bounced"


def test_a_body_file_never_flushed_before_a_power_loss_is_dropped(tmp_path: Path) -> None:
    journal_dir = tmp_path / "journal"
    (journal_dir / journal.BODIES).mkdir(parents=True)
    body = journal_dir / journal.BODIES / "Q1"
    body.write_bytes(b"x" * 1000)
    size, crc = journal.file_crc(str(body))
    body.write_bytes(b"x" * 990 + bytes(10))  # the record reached the disk, the body not all
    e = Entry(
        1,
        "Q1",
        entry(1).envelope,
        (Target(0, str(tmp_path / "a"), "1.n"),),
        b"",
        str(body),
        size,
        crc,
        keep=True,
    )
    segment(journal_dir, journal.encode_entry(e), boot="another-boot")
    assert journal.recover(str(journal_dir), BOOT) == 0  # never acknowledged: nothing made
    assert not (tmp_path / "a").exists() and DeferredStore(tmp_path / "queue").ids() == []


def test_after_a_power_loss_unsynced_copies_are_compared_and_mended(tmp_path: Path) -> None:
    a = tmp_path / "a"
    maildir.ensure(a)
    synced, emptied, lost, intact = entry(1, a), entry(2, a), entry(3, a), entry(4, a)
    (a / "new" / emptied.targets[0].name).write_bytes(b"")  # renamed, data never written
    (a / "cur" / f"{intact.targets[0].name}:2,S").write_bytes(b"H: 1\nbody\n")
    segment(
        tmp_path,
        *(journal.encode_entry(e) for e in (synced, emptied, lost, intact)),
        journal.encode_settled([(1, 0), (2, 0), (3, 0), (4, 0)]),
        journal.encode_synced(1),  # entry 1 was flushed: its absence is the user's doing
        boot="another-boot",
    )
    assert journal.recover(str(tmp_path), BOOT) == 2
    assert sorted(os.listdir(a / "new")) == sorted(t.targets[0].name for t in (emptied, lost))
    for e in (emptied, lost):
        assert (a / "new" / e.targets[0].name).read_bytes() == b"H: 1\nbody\n"
    assert os.listdir(a / "cur") == [f"{intact.targets[0].name}:2,S"]


def test_a_living_writers_segment_is_left_alone(tmp_path: Path) -> None:
    a = tmp_path / "a"
    path = segment(tmp_path, journal.encode_entry(entry(1, a)))
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as its writer holds it
        assert journal.recover(str(tmp_path), BOOT) == 0
        assert path.exists() and not a.exists()
    finally:
        os.close(fd)
    assert journal.recover(str(tmp_path), BOOT) == 1  # its writer is gone: replayed


def test_a_new_segment_is_never_taken_for_an_orphan(tmp_path: Path) -> None:
    seg = journal.Segment.create(str(tmp_path), BOOT)
    try:
        seg.append(journal.encode_entry(entry(1, tmp_path / "a")), sync=True)
        assert journal.recover(str(tmp_path), BOOT) == 0  # locked by its writer
        assert os.path.exists(seg.path)
    finally:
        seg.remove()


def test_a_message_whose_copy_failed_is_parked_after_a_crash(tmp_path: Path) -> None:
    # Accepted as "not kept" (every recipient local), one copy failed: a KEPT mark says the
    # queue holds it after all, so a crash before it was parked does not lose that copy.
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    one = entry(1, tmp_path / "a", tmp_path / "b")
    maildir.ensure(tmp_path / "a")
    (tmp_path / "a" / "new" / one.targets[0].name).write_bytes(one.body)
    segment(
        journal_dir,
        journal.encode_entry(one),
        journal.encode_settled([(1, 0)]),  # b's copy failed: no settled mark
        journal.encode_kept([1]),
    )
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "new").write_bytes(b"")  # it still cannot be made: the queue retries it
    journal.recover(str(journal_dir), BOOT)
    store = DeferredStore(tmp_path / "queue")
    assert store.ids() == ["Q1"]
    assert [r.status for r in store.load("Q1").recipients] == ["delivered", "queued", "queued"]


def test_a_copy_that_cannot_be_made_again_after_a_power_loss_is_parked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every recipient local (not kept), the power went before the synced mark: one copy is
    # gone and cannot be written again now (a full disk). It was logged as left to the
    # runner, but nothing held it: the segment and its body file went, and the message too.
    journal_dir = tmp_path / "journal"
    (journal_dir / journal.BODIES).mkdir(parents=True)
    a, b = tmp_path / "a", tmp_path / "b"
    big = journal_dir / journal.BODIES / "Q1"
    big.write_bytes(b"H: 1\n" + b"x" * 100_000)
    size, crc = journal.file_crc(str(big))
    targets = (Target(0, str(a), "1.Q1_0.h"), Target(1, str(b), "1.Q1_1.h"))
    one = Entry(1, "Q1", entry(1).envelope, targets, b"", str(big), size, crc)
    maildir.ensure(a)
    os.link(big, a / "new" / targets[0].name)  # on disk; b's copy is not
    segment(
        journal_dir,
        journal.encode_entry(one),
        journal.encode_settled([(1, 0), (1, 1)]),
        boot="another-boot",
    )

    def full(source: str, box: str, name: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildir, "link_copy", full)
    assert journal.recover(str(journal_dir), BOOT) == 0
    store = DeferredStore(tmp_path / "queue")
    assert store.ids() == ["Q1"] and store.read("Q1") == b"H: 1\n" + b"x" * 100_000
    assert [r.status for r in store.load("Q1").recipients] == ["delivered", "queued", "queued"]


def test_a_settled_copy_before_a_synced_mark_is_trusted_after_a_power_loss(
    tmp_path: Path,
) -> None:
    # A kept message (a remote recipient in its first attempt): its local copy was flushed
    # and marked synced, then fetched and deleted by its user; then the power went. The
    # copy came back on the next boot (for a whole first attempt, not the last second).
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    kept, later = entry(1, tmp_path / "a", keep=True), entry(2, tmp_path / "a", keep=True)
    maildir.ensure(tmp_path / "a")
    segment(
        journal_dir,
        journal.encode_entry(kept),
        journal.encode_settled([(1, 0)]),
        journal.encode_synced(1),
        journal.encode_entry(later),
        journal.encode_settled([(2, 0)]),  # not synced: its absence may be the power's doing
        boot="another-boot",
    )
    assert journal.recover(str(journal_dir), BOOT) == 1
    assert os.listdir(tmp_path / "a" / "new") == [later.targets[0].name]
    store = DeferredStore(tmp_path / "queue")
    for qid in ("Q1", "Q2"):
        assert store.load(qid).recipients[0].status == "delivered"


def test_a_copy_made_then_deleted_by_its_user_is_not_made_again(tmp_path: Path) -> None:
    # A message for a local and a remote recipient, in its first remote attempt: the user
    # fetched and deleted the local copy over POP3 (RFC 1939 §6: final at QUIT), then the
    # server was killed. Its settled mark says the copy was made: it is done, not owed.
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    kept = entry(1, tmp_path / "a", keep=True)
    maildir.ensure(tmp_path / "a")
    segment(journal_dir, journal.encode_entry(kept), journal.encode_settled([(1, 0)]))
    assert journal.recover(str(journal_dir), BOOT) == 0
    assert os.listdir(tmp_path / "a" / "new") == []
    parked = DeferredStore(tmp_path / "queue").load("Q1")
    assert [r.status for r in parked.recipients] == ["delivered", "queued", "queued"]


def test_messages_refused_when_their_writer_died_are_dropped(tmp_path: Path) -> None:
    # The writer appended and published them, then died before it answered: the server
    # answered 452, and the client sends them again. Their replay must not deliver them.
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    a = tmp_path / "a"
    refused, kept_refused, taken = entry(1, a), entry(2, a, keep=True), entry(3, a)
    maildir.ensure(a)
    (a / "new" / refused.targets[0].name).write_bytes(refused.body)  # published, unread
    segment(
        journal_dir,
        *(journal.encode_entry(e) for e in (refused, kept_refused, taken)),
        journal.encode_settled([(1, 0)]),
    )
    journal.write_refused(str(journal_dir), ["Q1", "Q2"])
    assert journal.recover(str(journal_dir), BOOT) == 1
    assert os.listdir(a / "new") == [taken.targets[0].name]
    assert DeferredStore(tmp_path / "queue").ids() == []
    assert os.listdir(journal_dir) == [journal.BODIES]  # the refusal went with its segment


@pytest.mark.parametrize("shape", ["json", "text"])
def test_the_writers_warnings_take_the_servers_log_format(
    shape: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # They were plain "postroom maildir writer: ..." lines in a JSON log, and without the
    # text lines' prefix that pflogsumm reads.
    monkeypatch.setenv(logs.FORMAT_VARIABLE, f"{shape} mx.a.test")
    journal.warn("1 copy written again from the journal after a crash")
    line = capsys.readouterr().err.strip()
    if shape == "json":
        data = json.loads(line)
        assert (data["level"], data["event"]) == ("warning", "log")
        assert data["message"] == "1 copy written again from the journal after a crash"
    else:
        assert re.fullmatch(
            r"\S+Z mx\.a\.test postroom/maildir-writer\[\d+\]: warning: 1 copy written again .*",
            line,
        )


def test_a_segment_that_cannot_start_leaves_no_file_and_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: each refused message tried a new segment; each left a file and an open
    descriptor, until the writer had none left and refused everything, room or not."""

    def full(self: journal.Segment, parts: object, sync: bool) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal.Segment, "append", full)
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(OSError):
            journal.Segment.create(str(tmp_path), BOOT)
    assert os.listdir(tmp_path) == [] and len(os.listdir("/proc/self/fd")) == open_before


def test_recovery_flushes_the_copies_it_vouches_for_before_dropping_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crash the copies made since the last synced mark may be in the page cache
    only: the segment, which could write them again, goes only after a flush of them."""
    journal_dir, a = tmp_path / "journal", tmp_path / "a"
    journal_dir.mkdir()
    one = entry(1, a)
    maildir.ensure(a)
    (a / "new" / one.targets[0].name).write_bytes(one.body)
    path = segment(journal_dir, journal.encode_entry(one), journal.encode_settled([(1, 0)]))
    steps: list[str] = []
    unlink = os.unlink
    monkeypatch.setattr(journal, "syncfs", lambda directory: steps.append("syncfs"))
    monkeypatch.setattr(
        journal.os, "unlink", lambda p, *a, **k: (steps.append(str(p)), unlink(p, *a, **k))[1]
    )
    assert journal.recover(str(journal_dir), BOOT) == 0
    assert not path.exists() and steps.index("syncfs") < steps.index(str(path))


def test_damage_in_the_middle_of_a_segment_is_set_aside_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid records after a bad one: no torn append (nothing is written after one) but
    damage. What comes before it is replayed; the segment is kept for the admin and the loss
    is reported, not dropped in silence."""
    journal_dir, a = tmp_path / "journal", tmp_path / "a"
    journal_dir.mkdir()
    one, two, three = entry(1, a), entry(2, a), entry(3, a)
    path = segment(journal_dir, *(journal.encode_entry(e) for e in (one, two, three)))
    data = bytearray(path.read_bytes())
    data[data.index(b"2.Q2_0.h")] ^= 0x01  # a flipped bit inside the second record
    path.write_bytes(bytes(data))
    assert journal.parse(bytes(data)).damaged
    torn = bytes(data[: data.index(b"3.Q3_0.h")])  # a last append cut short is no damage
    assert not journal.parse(torn).damaged and not journal.parse(torn + bytes(4096)).damaged
    assert journal.recover(str(journal_dir), BOOT) == 1
    assert os.listdir(a / "new") == [one.targets[0].name]
    assert not path.exists() and (tmp_path / "queue" / "corrupt" / path.name).exists()
    assert "damaged" in capsys.readouterr().err


def test_a_replay_cut_short_by_a_full_disk_does_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay that made copies and parked messages, then could not park the next one (the
    disk full), kept its segment with no record of that: the next start made the copies
    again (their reader had fetched and deleted them) and parked again a message the runner
    had delivered and removed meanwhile (it went out twice). The replay marks what it did in
    the zeros after the records."""
    journal_dir, a, b = tmp_path / "journal", tmp_path / "a", tmp_path / "b"
    (journal_dir / journal.BODIES).mkdir(parents=True)
    env = Envelope("Q1", "s@x.test", [Recipient(f"u{i}@x.test") for i in range(3)], 1.0)
    # Its one copy is for recipient 2: a mark names the place in the entry (0), not 2.
    one = Entry(1, "Q1", env.to_json(), (Target(2, str(a), "1.Q1_2.h"),), b"H: 1\n", keep=True)
    two = entry(2, b, keep=True)
    path = segment(journal_dir, journal.encode_entry(one), journal.encode_entry(two))
    with path.open("ab") as f:
        f.write(bytes(4096))  # as a writer leaves it: zeros ahead of the records
    real_park = DeferredStore.park

    def full(store: DeferredStore, envelope: bytes, queue_id: str, *args: object) -> None:
        if queue_id == "Q2":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_park(store, envelope, queue_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(DeferredStore, "park", full)
    journal.recover(str(journal_dir), BOOT)  # both copies made, Q1 parked, Q2 not: kept
    store = DeferredStore(tmp_path / "queue")
    assert path.exists() and store.ids() == ["Q1"]
    assert [r.status for r in store.load("Q1").recipients] == ["queued", "queued", "delivered"]
    store.remove("Q1")  # its runner delivered it meanwhile
    for box in (a, b):  # and the copies were fetched and deleted over POP3
        for copy in (box / "new").iterdir():
            copy.unlink()
    monkeypatch.setattr(DeferredStore, "park", real_park)
    assert journal.recover(str(journal_dir), BOOT) == 0  # no copy made again
    assert os.listdir(a / "new") == [] and os.listdir(b / "new") == []
    assert store.ids() == ["Q2"] and not path.exists()  # Q1 not parked again
    assert [r.status for r in store.load("Q2").recipients] == ["delivered", "queued", "queued"]


def test_a_replay_after_a_power_loss_trusts_none_of_its_own_marks(tmp_path: Path) -> None:
    """The marks of a replay are not flushed: after a power loss the copies they name are
    compared again (written again if missing: a duplicate is the safe side)."""
    journal_dir, a = tmp_path / "journal", tmp_path / "a"
    (journal_dir / journal.BODIES).mkdir(parents=True)
    one = entry(1, a)
    segment(journal_dir, journal.encode_entry(one), journal.encode_settled([(1, 0)]))
    assert journal.recover(str(journal_dir), "another-boot") == 1
