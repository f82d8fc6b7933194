"""The Maildir writer's journal: its records, and recovery after a crash or a power loss."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from postroom.storage.local import journal, maildir
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
        Entry(seq, tuple(Target(*t) for t in targets), body)
        for seq, (targets, body) in enumerate(raw, 1)
    ]
    data = b"".join(journal.encode_start(BOOT))
    for e in entries:
        data += b"".join(journal.encode_entry(e))
    data += b"".join(journal.encode_settled([(1, 0), (2, 1)]))
    data += b"".join(journal.encode_synced(len(entries)))
    whole = journal.parse(data)
    assert whole.boot == BOOT and whole.entries == entries and whole.end == len(data)
    assert whole.settled == {(1, 0), (2, 1)} and whole.synced == len(entries)
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


def entry(seq: int, *boxes: Path, body: bytes = b"body\r\n") -> Entry:
    return Entry(seq, tuple(Target(str(b), f"{seq}.Q{seq}_0.h", b"H: 1\r\n") for b in boxes), body)


def test_after_a_crash_unsettled_copies_are_published_once(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    one, two, three = entry(1, a, b), entry(2, c), entry(3, a)
    maildir.ensure(c)
    (c / "cur" / f"{two.targets[0].name}:2,S").write_bytes(b"H: 1\r\nbody\r\n")  # crash after
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
    assert (b / "new" / one.targets[1].name).read_bytes() == b"H: 1\r\nbody\r\n"
    assert os.listdir(c / "new") == []


def test_after_a_power_loss_unsynced_copies_are_compared_and_mended(tmp_path: Path) -> None:
    a = tmp_path / "a"
    maildir.ensure(a)
    synced, emptied, lost, intact = entry(1, a), entry(2, a), entry(3, a), entry(4, a)
    (a / "new" / emptied.targets[0].name).write_bytes(b"")  # renamed, data never written
    (a / "cur" / f"{intact.targets[0].name}:2,S").write_bytes(b"H: 1\r\nbody\r\n")
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
        assert (a / "new" / e.targets[0].name).read_bytes() == b"H: 1\r\nbody\r\n"
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
