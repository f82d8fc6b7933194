"""The Maildir backend of the Maildrop interface (storage/local/maildrop.py), on temporary
Maildirs: sizes and UIDLs from names, LF and CRLF files, UPDATE, the lock."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from postroom.blocking import BlockingPool
from postroom.errors import MailboxInUse
from postroom.pop3.maildrop import Snapshot
from postroom.storage.interfaces import MessageInfo
from postroom.storage.local import maildrop as maildrop_module
from postroom.storage.local.maildrop import (
    LOCK_NAME,
    PARALLEL_UPDATE_MIN,
    SIZE_CACHE,
    MaildirMaildrop,
    measure,
    unique_id,
)
from postroom.wire.framing import to_crlf

T = TypeVar("T")


def Maildrop(path: Path) -> MaildirMaildrop:
    return MaildirMaildrop(path, BlockingPool(2))


def snapshot(drop: MaildirMaildrop) -> Snapshot:
    return Snapshot([MessageInfo(f.size, f.uid) for f in drop.files])


# -- the maildrop -------------------------------------------------------------------------------


def make_maildir(root: Path, files: dict[str, bytes]) -> Path:
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return root


def each_session(md: Path, count: int, look: Callable[[MaildirMaildrop], T]) -> list[T]:
    """What ``look`` sees in each of ``count`` sessions of the maildrop ``md``, in turn."""
    seen = []
    for _ in range(count):
        drop = Maildrop(md)
        drop.open_now()
        try:
            seen.append(look(drop))
        finally:
            drop.close_now()
    return seen


def test_maildrop_sizes_uids_and_order(tmp_path: Path) -> None:
    crlf = b"Subject: a\r\n\r\nbody\r\n"
    lf = b"Subject: b\n\n.dot\nno end"
    md = make_maildir(
        tmp_path / "md",
        {
            f"new/1700000002.Q2_0.host,S={len(crlf)}": crlf,
            "cur/1700000001.M1P2.other:2,S": lf,  # another tool: LF, no size in the name
            "cur/1700000003.M3P4.dove,S=5,W=999:2,": b"a\nb\nc",  # Dovecot's W= is the CRLF size
            # Courier/maildrop: S= is the LF file's size; RETR sends more than that.
            "new/1700000004.M5P6.courier,S=26": b"Subject: courier\n\nbody\n.x\n",
        },
    )
    drop = Maildrop(md)
    drop.open_now()
    try:
        assert [e.uid for e in drop.files] == [
            "1700000001.M1P2.other",
            "1700000002.Q2_0.host",
            "1700000003.M3P4.dove",
            "1700000004.M5P6.courier",
        ]
        sizes = [e.size for e in drop.files]
        assert sizes == [len(to_crlf(lf)) + 2, len(crlf), 999, 30]
        assert len(drop.read(drop.files[3])) == 30
        assert drop.read(drop.files[0]) == to_crlf(lf)
        snap = snapshot(drop)
        assert snap.stat() == (4, len(to_crlf(lf)) + 2 + len(crlf) + 999 + 30)
        assert snap.listing(uids=False).endswith(b"3 999\r\n4 30\r\n.\r\n")
        assert (md / SIZE_CACHE).read_text().split("\t")[0] == "1700000001.M1P2.other"
    finally:
        drop.close_now()
    # The second session uses the cache: a file not changed since is not read again.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(maildrop_module, "measure", lambda path: pytest.fail(f"read {path}"))
        again = Maildrop(md)
        again.open_now()
        assert again.files[0].size == len(to_crlf(lf)) + 2
        again.close_now()
    # Rewritten by another tool with as many octets (other line ends): measured again.
    other = md / "cur/1700000001.M1P2.other:2,S"
    other.write_bytes(lf.replace(b"\n", b"x"))
    os.utime(other, ns=(other.stat().st_atime_ns, other.stat().st_mtime_ns + 10**9))
    again = Maildrop(md)
    again.open_now()
    assert again.files[0].size == len(lf) + 2
    again.close_now()


def test_files_with_one_unique_name_and_one_raw_size_keep_their_own_sizes(tmp_path: Path) -> None:
    """RFC 1939 §5 and §7 (a probe): two copies another tool made of one name, with as many
    octets but other line ends, are measured each (the size cache held one of them for both:
    the second session listed the first one's size and changed the other's UIDL)."""
    md = make_maildir(
        tmp_path / "md",
        {
            "new/1600000000.dup.host": b"Subject: a\n\nx\n\n\n\n\n\n",
            "cur/1600000000.dup.host:2,S": b"Subject: b\n\nxxxxxx\n",
        },
    )
    sessions = each_session(md, 3, lambda d: [(f.uid, f.size, len(d.read(f))) for f in d.files])
    assert sessions[0] == sessions[1] == sessions[2]
    assert all(size == sent for _, size, sent in sessions[0])
    assert sorted(size for _, size, _ in sessions[0]) == [22, 27]


def test_files_with_one_unique_name_get_distinct_uidls(tmp_path: Path) -> None:
    """RFC 1939 §7: unique in the maildrop, also when another tool copied instead of moving;
    the first keeps the name, the others get their size added, and a reopen gives the same."""
    md = make_maildir(
        tmp_path / "md",
        {
            "new/1796470000.dup.host": b"one\n",
            "new/1796470000.dup.host,S=5": b"two!\n",
            "cur/1796470000.dup.host:2,S": b"three\n",
            "cur/1796470000.dup.host,S=5:2,S": b"four\n",
        },
    )
    uidls = each_session(md, 2, lambda d: [e.uid for e in d.files])
    assert uidls[0] == uidls[1] and len(set(uidls[0])) == 4
    assert uidls[0][0] == "1796470000.dup.host"
    assert all(u.startswith("1796470000.dup.host.") for u in uidls[0][1:])


def test_uidls_of_files_with_one_name_stay_with_their_files(tmp_path: Path) -> None:
    """RFC 1939 §7: a UIDL is persistent. When two files share a unique name, which one keeps
    the bare name must not follow the directories they happen to be in, which change when a
    message is marked seen (new/ to cur/) or another tool moves it back."""
    md = make_maildir(
        tmp_path / "md",
        {"cur/1796470000.dup.host:2,": b"copy A\n", "new/1796470000.dup.host": b"copy B!\n"},
    )

    def uidls() -> dict[str, bytes]:
        drop = Maildrop(md)
        drop.open_now()
        try:
            return {f.uid: (md / f.subdir / f.name).read_bytes() for f in drop.files}
        finally:
            drop.close_now()

    before = uidls()
    os.rename(md / "cur/1796470000.dup.host:2,", md / "new/1796470000.dup.host,tmp")
    os.rename(md / "new/1796470000.dup.host", md / "cur/1796470000.dup.host:2,S")
    os.rename(md / "new/1796470000.dup.host,tmp", md / "new/1796470000.dup.host")
    assert uidls() == before and len(before) == 2


def test_uid_is_the_unique_part_and_fits_rfc1939() -> None:
    assert unique_id("123.Q_0.h,S=5:2,RS") == unique_id("123.Q_0.h,S=5,W=7") == "123.Q_0.h"
    odd = unique_id("x" * 80 + ",S=1")
    assert len(odd) == 40 and odd != unique_id("y" * 80)
    assert all(0x21 <= ord(c) <= 0x7E for c in unique_id("caf\u00e9 name"))


def test_update_deletes_and_marks_seen(tmp_path: Path) -> None:
    md = make_maildir(
        tmp_path / "md",
        {
            "new/1.a,S=3": b"a\r\n",
            "new/2.b,S=3": b"b\r\n",
            "cur/3.c,S=3:2,F": b"c\r\n",
            "new/4.d,S=3": b"d\r\n",
        },
    )
    drop = Maildrop(md)
    drop.open_now()
    assert drop.update_now([1], [2, 3]) == 0
    drop.close_now()
    assert sorted(os.listdir(md / "new")) == ["4.d,S=3"]
    assert sorted(os.listdir(md / "cur")) == ["2.b,S=3:2,S", "3.c,S=3:2,FS"]


def test_crlf_and_lf_files_go_out_in_crlf(tmp_path: Path) -> None:
    lf = b"a\nb\n"
    md = make_maildir(
        tmp_path / "md",
        {"new/1.a,S=6,W=6": b"a\r\nb\r\n", f"new/2.b,S={len(lf)},W={len(to_crlf(lf))}": lf},
    )
    drop = Maildrop(md)
    drop.open_now()
    try:
        assert drop.read(drop.files[0]) == b"a\r\nb\r\n"
        assert drop.read(drop.files[1]) == b"a\r\nb\r\n"
    finally:
        drop.close_now()


@pytest.mark.parametrize("large", [False, True])
def test_a_file_named_crlf_with_bare_lfs_is_not_sent_raw(tmp_path: Path, large: bool) -> None:
    """``S == W`` was taken to mean CRLF already, and the file went out as it was: a file a
    tool named so with bare LF line ends ended the message early at its "\\n.\\n", and the
    rest reached the client as replies (``DELE 1``); one with a ``,W=`` too small was
    refused in every session ([SYS/TEMP]), and the mailbox's later mail with it (pop3 probe).
    Neither is sent as listed; its name loses the sizes, and the next session measures it."""
    body = b"Subject: inj\n\nline\n.\nDELE 1\n" + (b"x" * 300_000 + b"\n" if large else b"")
    wrong = b"a\nb\nc\nd\n"
    md = make_maildir(
        tmp_path / "md",
        {f"new/1.inj,S={len(body)},W={len(body)}": body, "new/2.wm,S=8,W=9": wrong},
    )

    async def retr(drop: MaildirMaildrop, number: int) -> bytes:
        return b"".join([piece async for piece in drop.chunks(number)])

    drop = Maildrop(md)
    drop.open_now()
    try:
        for number in (1, 2):
            with pytest.raises(OSError):
                drop.read(drop.files[number - 1]) if not large else asyncio.run(retr(drop, number))
    finally:
        drop.close_now()
    assert sorted(os.listdir(md / "new")) == ["1.inj", "2.wm"]
    again = Maildrop(md)
    again.open_now()
    try:
        assert [f.size for f in again.files] == [len(to_crlf(body)), len(to_crlf(wrong))]
        assert asyncio.run(retr(again, 1)) == to_crlf(body)
        assert again.read(again.files[1]) == to_crlf(wrong)
    finally:
        again.close_now()


def test_file_longer_than_its_name_says_is_read_whole(tmp_path: Path) -> None:
    body = b"x" * 100 + b"\r\n"
    md = make_maildir(tmp_path / "md", {"new/1.a,S=5": body})
    drop = Maildrop(md)
    drop.open_now()
    try:
        assert drop.read(drop.files[0]) == body
    finally:
        drop.close_now()


def test_large_update_is_shared_by_threads_and_complete(tmp_path: Path) -> None:
    count = PARALLEL_UPDATE_MIN * 2 + 7
    md = make_maildir(tmp_path / "md", {f"new/{i}.m,S=3": b"m\r\n" for i in range(count)})
    drop = Maildrop(md)
    drop.open_now()
    numbers = range(1, len(drop.files) + 1)
    deleted = [n for n in numbers if (n - 1) % 3 != 0]
    os.unlink(md / "new" / drop.files[1].name)  # gone meanwhile: not a failure
    assert drop.update_now(deleted, [n for n in numbers if n not in deleted]) == 0
    drop.close_now()
    kept = sorted(os.listdir(md / "cur"))
    assert len(kept) == len(range(0, count, 3)) and all(n.endswith(":2,S") for n in kept)
    assert os.listdir(md / "new") == []


def test_drop_without_update_changes_nothing_and_rset(tmp_path: Path) -> None:
    md = make_maildir(tmp_path / "md", {"new/1.a,S=3": b"a\r\n", "new/2.b,S=3": b"b\r\n"})
    drop = Maildrop(md)
    drop.open_now()
    snap = snapshot(drop)
    snap.delete(1)
    assert snap.get(1) is None and snap.stat() == (1, 3) and snap.deleted() == [1]
    snap.reset()
    assert snap.get(1) is not None
    snap.delete(2)
    drop.close_now()  # the connection dropped: no UPDATE
    assert len(os.listdir(md / "new")) == 2


def test_message_moved_by_another_tool_is_found(tmp_path: Path) -> None:
    md = make_maildir(tmp_path / "md", {"new/1.a,S=3": b"a\r\n"})
    drop = Maildrop(md)
    drop.open_now()
    os.rename(md / "new/1.a,S=3", md / "cur/1.a,S=3:2,S")  # an IMAP server read it meanwhile
    assert drop.read(drop.files[0]) == b"a\r\n"
    assert drop.update_now([1], []) == 0
    drop.close_now()
    assert os.listdir(md / "cur") == []


def test_flags_another_tool_set_meanwhile_are_kept(tmp_path: Path) -> None:
    """Marking seen at QUIT adds S to the flags the name has then: mutt's T (trashed) set
    during the session must not be wiped, nor must a deleted message come back."""
    md = make_maildir(tmp_path / "md", {"new/1.a,S=3": b"a\r\n", "cur/2.b,S=3:2,": b"b\r\n"})
    drop = Maildrop(md)
    drop.open_now()
    os.rename(md / "new/1.a,S=3", md / "cur/1.a,S=3:2,FT")
    os.rename(md / "cur/2.b,S=3:2,", md / "cur/2.b,S=3:2,R")
    assert drop.update_now([], [1, 2]) == 0
    drop.close_now()
    assert sorted(os.listdir(md / "cur")) == ["1.a,S=3:2,FST", "2.b,S=3:2,RS"]


def test_marking_seen_never_replaces_another_file(tmp_path: Path) -> None:
    """Two files under one unique name (a tool's slip, a restored backup): moving the new one
    to cur/ would have replaced the other message."""
    md = make_maildir(tmp_path / "md", {"new/1.a": b"first\n", "cur/1.a:2,S": b"second\n"})
    drop = Maildrop(md)
    drop.open_now()
    assert drop.update_now([], [1, 2]) == 0
    drop.close_now()
    contents = sorted(p.read_bytes() for p in md.glob("*/1.a*"))
    assert contents == [b"first\n", b"second\n"]


def test_entries_that_are_no_message_are_left_out(tmp_path: Path) -> None:
    """A directory, a FIFO or a device in new/ or cur/ neither locks the user out nor hangs
    the login: the messages beside it are served."""
    md = make_maildir(tmp_path / "md", {"new/1.a,S=3": b"a\r\n", "cur/2.b:2,S": b"b\n"})
    (md / "new" / "3.subdir").mkdir()
    (md / "new" / "4.dir,S=5,W=5").mkdir()
    os.mkfifo(md / "cur" / "5.fifo:2,S")
    (md / "cur" / "6.zero:2,S").symlink_to("/dev/zero")
    (md / "cur" / "7.gone:2,S").symlink_to(md / "nowhere")
    drop = Maildrop(md)
    drop.open_now()  # returned at all: neither the FIFO nor /dev/zero was read
    assert [f.name for f in drop.files] == ["1.a,S=3", "2.b:2,S"]
    assert drop.read(drop.files[1]) == b"b\r\n"
    drop.close_now()


def test_a_link_is_no_message_and_a_file_put_over_one_is_not_read(tmp_path: Path) -> None:
    # A link in new/ was listed and RETR sent its target (/etc/passwd, the TLS key); a FIFO
    # renamed over a message hung the whole worker in open(); a file larger than its name
    # said was read whole on the event loop, more octets than LIST had announced.
    secret = tmp_path / "secret"
    secret.write_bytes(b"the server's private key\n")
    md = make_maildir(
        tmp_path / "md",
        {"new/1.a,S=2,W=3": b"a\n", "new/2.b,S=2,W=3": b"b\n", "new/3.c,S=2,W=3": b"c\n"},
    )
    (md / "new" / "4.link,S=25,W=26").symlink_to(secret)
    drop = Maildrop(md)
    drop.open_now()
    try:
        assert [f.name.split(",")[0] for f in drop.files] == ["1.a", "2.b", "3.c"]
        os.unlink(md / "new" / "1.a,S=2,W=3")
        os.mkfifo(md / "new" / "1.a,S=2,W=3")
        (md / "new" / "2.b,S=2,W=3").write_bytes(b"b" * 100_000)
        os.unlink(md / "new" / "3.c,S=2,W=3")
        (md / "new" / "3.c,S=2,W=3").symlink_to(secret)
        for f in drop.files:
            started = time.monotonic()
            with pytest.raises(OSError):
                drop.read(f)
            assert time.monotonic() - started < 1
    finally:
        drop.close_now()


def test_a_fifo_renamed_in_between_the_listing_and_the_measuring_is_left_out(
    tmp_path: Path,
) -> None:
    """The login's size step for a file without ,W= checked the name, then opened it: a
    FIFO renamed in between hung the login for good, holding the mailbox's lock."""
    fifo = tmp_path / "1.a:2,S"
    os.mkfifo(fifo)
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(_measured(fifo)), daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # the old open(): a writer end lets it go on
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
    assert outcome and isinstance(outcome[0], OSError), outcome


def _measured(path: Path) -> object:
    started = time.monotonic()
    try:
        return measure(path)
    except OSError as exc:
        return exc if time.monotonic() - started < 4 else "hung"


def test_a_name_whose_size_is_wrong_is_measured_from_the_next_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A file named S=5 by a sloppy tool (or edited since) was refused at every RETR, and
    # nothing said why: the client skipped it for good. Its name loses the sizes (its UIDL,
    # the part before them, stays), and the next session measures it; the refusal is logged.
    body = b"Subject: edited\n\nedited by hand, longer now\n"
    md = make_maildir(tmp_path / "md", {"new/1.a,S=5,W=6:2,": body})
    drop = Maildrop(md)
    drop.open_now()
    uid = drop.files[0].uid
    with pytest.raises(OSError):
        drop.read(drop.files[0])
    drop.close_now()
    assert "not sent: " in caplog.text and os.listdir(md / "new") == ["1.a:2,"]
    again = Maildrop(md)
    again.open_now()
    try:
        (f,) = again.files
        assert f.uid == uid and f.size == len(to_crlf(body))
        assert again.read(f) == to_crlf(body)
    finally:
        again.close_now()


def test_an_update_after_another_tool_moved_thousands_is_linear(tmp_path: Path) -> None:
    # Each message not where the listing saw it listed both folders again: 8,000 moved by
    # mutt during a session made QUIT take 10 s (and 20,000 about a minute).
    count = 5000
    md = make_maildir(tmp_path / "md", {f"new/{i}.m,S=2,W=3": b"m\n" for i in range(count)})
    drop = Maildrop(md)
    drop.open_now()
    for i in range(count):
        os.rename(md / "new" / f"{i}.m,S=2,W=3", md / "cur" / f"{i}.m,S=2,W=3:2,S")
    started = time.monotonic()
    assert drop.update_now(list(range(1, count + 1)), []) == 0
    assert time.monotonic() - started < 2, time.monotonic() - started  # 4.0 s before, 0.05 now
    drop.close_now()
    assert os.listdir(md / "cur") == [] and os.listdir(md / "new") == []


_KILLED_AMONG_THE_DELETIONS = """
import os, signal, sys
from postroom.blocking import BlockingPool
from postroom.storage.local import maildrop
done = 0
real = maildrop.MaildirMaildrop._apply
def apply_then_die(self, f, seen):
    global done
    real(self, f, seen)
    done += 1
    if done == 3:
        os.kill(os.getpid(), signal.SIGKILL)
maildrop.MaildirMaildrop._apply = apply_then_die
drop = maildrop.MaildirMaildrop(maildrop.Path(sys.argv[1]), BlockingPool(1))
drop.open_now()
drop.update_now(list(range(1, len(drop.files) + 1)), [])
"""


def test_a_quit_killed_among_its_deletions_deletes_all_of_them_at_the_next_login(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The deletions of a QUIT were one unlink each: a kill -9 after 3 of 10 left 7, which a
    client that had retrieved all 10 fetched a second time (pop3 probe: 4,462 of 5,000 left).
    They are written down first; the next session makes the rest."""
    md = make_maildir(tmp_path / "md", {f"new/{i}.m,S=2,W=3": b"m\n" for i in range(10)})
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_AMONG_THE_DELETIONS, str(md)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL
    assert len(os.listdir(md / "new")) == 7 and (md / maildrop_module.EXPUNGING).exists()
    (md / "cur" / "kept.m,S=2,W=3:2,S").write_bytes(b"k\n")  # came since: not the QUIT's
    drop = Maildrop(md)
    drop.open_now()
    try:
        assert [f.name for f in drop.files] == ["kept.m,S=2,W=3:2,S"]
        assert "the deletions of a session cut short (10) made now" in caplog.text
    finally:
        drop.close_now()
    assert os.listdir(md / "new") == [] and not (md / maildrop_module.EXPUNGING).exists()


def test_the_deletions_written_down_name_every_file_exactly(tmp_path: Path) -> None:
    """A name that is no UTF-8 made every QUIT that deleted it fail (Internal error); one
    with a line end in it named another message, which the next session deleted though the
    client never did (crash probe). Names end with a NUL now, and go as their own octets."""
    md = make_maildir(tmp_path / "md", {})
    for name in (b"1.bad\xff,S=2,W=3", b"2.victim", b"2.victim\nzz,S=2,W=3", b"3.ok,S=2,W=3"):
        (md / "new").joinpath(os.fsdecode(name)).write_bytes(b"m\n")
    drop = Maildrop(md)
    drop.open_now()
    doomed = [f for f in drop.files if f.name != "2.victim"]
    drop._intend(doomed)  # then a kill -9, before the first deletion
    drop.close_now()
    again = Maildrop(md)
    again.open_now()
    try:
        assert [f.name for f in again.files] == ["2.victim"]
    finally:
        again.close_now()
    bad = Maildrop(make_maildir(tmp_path / "md2", {}))
    (bad.path / "new" / os.fsdecode(b"1.bad\xff,S=2,W=3")).write_bytes(b"m\n")
    bad.open_now()
    try:
        assert bad.update_now([1], []) == 0
    finally:
        bad.close_now()
    assert (
        os.listdir(bad.path / "new") == []
        and not (md / f"{maildrop_module.EXPUNGING}.tmp").exists()
    )


def test_a_whole_quit_leaves_nothing_to_finish(tmp_path: Path) -> None:
    md = make_maildir(tmp_path / "md", {f"new/{i}.m,S=2,W=3": b"m\n" for i in range(3)})
    drop = Maildrop(md)
    drop.open_now()
    assert drop.update_now([1, 3], [2]) == 0
    drop.close_now()
    assert not (md / maildrop_module.EXPUNGING).exists()
    assert os.listdir(md / "new") == [] and len(os.listdir(md / "cur")) == 1


def test_of_two_files_with_one_name_the_deleted_one_goes(tmp_path: Path) -> None:
    # A tool's copy shares the unique name; the client deleted "aa", and another tool then
    # changed its flags: the first file with that name found was removed, now and then "bb".
    for flags in ("T", "DT", "P", "RT"):
        md = make_maildir(tmp_path / flags, {"cur/1.x:2,": b"aa\n", "cur/1.x:2,FS": b"bb\n"})
        drop = Maildrop(md)
        drop.open_now()
        (aa,) = [i for i, f in enumerate(drop.files, 1) if drop.read(f) == b"aa\r\n"]
        os.rename(md / "cur" / "1.x:2,", md / "cur" / f"1.x:2,{flags}")
        assert drop.update_now([aa], []) == 0
        drop.close_now()
        assert [p.read_bytes() for p in (md / "cur").iterdir()] == [b"bb\n"], flags


def test_one_session_per_mailbox_and_crash_releases(tmp_path: Path) -> None:
    md = make_maildir(tmp_path / "md", {})
    first = Maildrop(md)
    first.open_now()
    with pytest.raises(MailboxInUse):
        Maildrop(md).open_now()
    first.close_now()
    second = Maildrop(md)
    second.open_now()
    second.close_now()
    # A process that holds the lock and dies (kill -9) does not block the mailbox.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(md / LOCK_NAME)!r}, os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxInUse):
            Maildrop(md).open_now()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    third = Maildrop(md)
    third.open_now()
    third.close_now()


def test_large_file_chunks_are_crlf_and_bounded(tmp_path: Path) -> None:
    body = (b"line\n" * 100_000) + b"\r\n.end\r"  # 500 kB
    md = make_maildir(tmp_path / "md", {"new/5.e": body})
    drop = Maildrop(md)
    drop.open_now()
    entry = drop.files[0]

    async def read_all() -> list[bytes]:
        return [piece async for piece in drop.chunks(1)]

    pieces = asyncio.run(read_all())
    assert drop.read_now(1) is None  # over the size read on the event loop
    drop.close_now()
    assert max(len(p) for p in pieces) <= 2 * (1 << 18)
    assert b"".join(pieces) == to_crlf(body)
    assert entry.size == len(to_crlf(body)) + 2  # "\r" at the end: RETR completes the line


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_a_file_changed_while_it_is_sent_fails_the_stream(tmp_path: Path, change: str) -> None:
    """A probe: another program truncated a 30 MB file during RETR, and the rest went out
    with the final dot, a short message the client took as whole. The +OK announced the
    size: pieces that will not come to it end in OSError (the session drops the line)."""
    body = b"line\n" * 400_000  # 2 MB: several pieces
    md = make_maildir(tmp_path / "md", {"new/6.f": body, "new/7.g": b"no line end"})
    drop = Maildrop(md)
    drop.open_now()
    path = md / "new" / "6.f"

    async def read_changed() -> int:
        got = 0
        async for piece in drop.chunks(1):
            if not got:
                if change == "truncate":
                    os.truncate(path, 1_000_000)
                else:
                    with path.open("ab") as fh:
                        fh.write(b"more\n" * 400_000)
            got += len(piece)
        return got

    async def read_whole(number: int) -> bytes:
        return b"".join([piece async for piece in drop.chunks(number)])

    try:
        assert len(asyncio.run(read_whole(1))) == drop.files[0].size
        assert asyncio.run(read_whole(2)) == b"no line end"  # the listed size counts a CRLF
        with pytest.raises(OSError, match="while it was sent"):
            asyncio.run(read_changed())
        os.truncate(md / "new" / "7.g", 5)  # a small one, read whole: cut since the listing
        with pytest.raises(OSError, match="changed since the listing"):
            drop.read_now(2)
    finally:
        drop.close_now()


def test_a_measured_file_grown_by_two_octets_is_not_sent_as_listed(tmp_path: Path) -> None:
    """A re-probe: a file without a final line end was listed with the CRLF RETR adds; grown
    by two octets (still unterminated) it passed the check that allowed for that CRLF, and
    went out two octets long with its dot. A measured size is now matched exactly."""
    md = make_maildir(
        tmp_path / "md", {"new/7.g": b"Subject: x\n\nno end", "new/8.h": b"a\n" * 300_000}
    )
    drop = Maildrop(md)
    drop.open_now()

    async def whole(number: int) -> bytes:
        return b"".join([piece async for piece in drop.chunks(number)])

    try:
        with open(md / "new" / "7.g", "ab") as fh:
            fh.write(b"de")
        with pytest.raises(OSError, match="changed since the listing"):
            drop.read_now(1)
        (md / SIZE_CACHE).write_text("")  # (dropped: measured again by the next session)
        with open(md / "new" / "8.h", "ab") as fh:
            fh.write(b"zz")  # a large one, grown by as much: no line end now
        with pytest.raises(OSError, match="while it was sent"):
            asyncio.run(whole(2))
        assert not (md / SIZE_CACHE).exists()
    finally:
        drop.close_now()


def test_a_named_size_with_or_without_the_crlf_retr_adds_is_sent(tmp_path: Path) -> None:
    """A re-probe: a ``,W=`` that counts the CRLF RETR adds after an unterminated last line
    (as ``measure`` does) was refused in every session after the exact check."""
    data = b"Subject: x\n\nno end"  # 18 octets, 2 line ends: 20, and 22 with RETR's CRLF
    md = make_maildir(tmp_path / "md", {"new/5.a,S=18,W=22": data, "new/6.b,S=18,W=20": data})
    drop = Maildrop(md)
    drop.open_now()

    async def whole(number: int) -> bytes:
        return b"".join([piece async for piece in drop.chunks(number)])

    try:
        for number in (1, 2):
            assert drop.read_now(number) == b"Subject: x\r\n\r\nno end"
            assert asyncio.run(whole(number)) == b"Subject: x\r\n\r\nno end"
    finally:
        drop.close_now()


def test_the_size_cache_is_keyed_by_ctime_and_checked(tmp_path: Path) -> None:
    """A re-probe: a file rewritten in place with as many octets and its mtime set back (as
    ``cp -p`` does) kept its stale size, and RETR refused it in every session; sizes such as
    ``-5`` or ``1_000`` in the cache file were taken."""
    md = make_maildir(tmp_path / "md", {"new/9.i": b"Subject: x\n\n1\n2\n3\n"})
    drop = Maildrop(md)
    drop.open_now()
    first = drop.files[0].size
    drop.close_now()
    path = md / "new" / "9.i"
    st = path.stat()
    path.write_bytes(b"Subject: x\n\n1 2 3\n")  # as many octets, fewer line ends
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = Maildrop(md)
    again.open_now()
    assert again.files[0].size == first - 2 and len(again.read(again.files[0])) == first - 2
    again.close_now()
    key = (md / SIZE_CACHE).read_text().rsplit("\t", 2)[0]
    for bad in ("-5", "1_000", "\u0663", "+7"):
        (md / SIZE_CACHE).write_text(f"{key}\t{bad}\t{bad}\n")
        hostile = Maildrop(md)
        hostile.open_now()
        assert hostile.files[0].size == first - 2, bad
        hostile.close_now()


def test_open_is_fast_for_10000_messages(tmp_path: Path) -> None:
    """Sizes come from the names: no body is read (the files here are empty)."""
    md = make_maildir(tmp_path / "md", {})
    for i in range(10_000):
        (md / "new" / f"{1700000000 + i}.Q{i}_0.host,S={1000 + i},W={1000 + i}").touch()
    drop = Maildrop(md)
    t0 = time.perf_counter()
    drop.open_now()
    snap = snapshot(drop)
    listing = snap.listing(uids=False)
    uids = snap.listing(uids=True)
    elapsed = time.perf_counter() - t0
    drop.close_now()
    assert snap.stat() == (10_000, sum(1000 + i for i in range(10_000)))
    assert listing.count(b"\r\n") == 10_001 and uids.count(b"\r\n") == 10_001
    print(f"open + LIST + UIDL of 10,000 messages: {elapsed * 1000:.0f} ms")


def test_removals_that_fail_at_quit_are_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The client got "-ERR [SYS/TEMP] 2 messages were not removed"; the log said nothing.
    md = make_maildir(tmp_path / "md", {"new/1.a,S=3": b"a\r\n", "new/2.b,S=3": b"b\r\n"})
    drop = Maildrop(md)
    drop.open_now()

    def refused(*_args: object, **_kw: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(maildrop_module.os, "unlink", refused)
    with caplog.at_level("WARNING", logger="postroom"):
        assert drop.update_now([1, 2], []) == 2
    monkeypatch.undo()
    drop.close_now()
    (line,) = [r.getMessage() for r in caplog.records if "not removed" in r.getMessage()]
    assert "Permission denied" in line
