"""Maildir delivery: durable, never visible half-written, never replacing an existing file."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest

from postroom.blocking import BlockingPool
from postroom.config import embedded_default, from_dict
from postroom.delivery.local import LocalDelivery
from postroom.queue.store import Envelope, Recipient
from postroom.storage import files, maildir


@pytest.fixture
def box(tmp_path: Path) -> str:
    path = tmp_path / "box"
    maildir.ensure(path)
    return str(path)


@pytest.mark.parametrize("sync_new", [True, False])
def test_tmpfile_delivery_leaves_nothing_in_tmp(box: str, sync_new: bool) -> None:
    assert maildir.deliver_tmpfile(box, "1.Q_0.h,S=7,W=7", [b"Sub", b"j\r\n\r\n"], sync_new)
    assert os.listdir(Path(box, "tmp")) == []
    path = Path(box, "new", "1.Q_0.h,S=7,W=7")
    assert path.read_bytes() == b"Subj\r\n\r\n"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_tmpfile_delivery_never_replaces_an_existing_message(box: str) -> None:
    assert maildir.deliver_tmpfile(box, "2.Q_0.h", [b"first\r\n"], True)
    assert maildir.deliver_tmpfile(box, "2.Q_0.h", [b"second\r\n"], True) is False
    assert Path(box, "new", "2.Q_0.h").read_bytes() == b"first\r\n"
    assert os.listdir(Path(box, "tmp")) == []


@pytest.mark.parametrize("size", [10, 3 << 20])
def test_classic_delivery_through_tmp(box: str, size: int) -> None:
    parts = [b"h" * 100, b"x" * size]
    assert maildir.deliver(box, "3.Q_0.h", parts)
    assert not maildir.deliver(box, "3.Q_0.h", [b"other"])
    assert Path(box, "new", "3.Q_0.h").read_bytes() == b"".join(parts)
    assert os.listdir(Path(box, "tmp")) == []


def test_tmpfile_refused_by_the_file_system(box: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_tmpfile(file: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(95, "Operation not supported")
        return real_open(file, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir, "_tmpfile_ok", True)
    monkeypatch.setattr(os, "open", no_tmpfile)
    assert maildir.deliver_tmpfile(box, "4.Q_0.h", [b"m\r\n"], True) is None
    assert maildir._tmpfile_ok is False and os.listdir(Path(box, "new")) == []


def envelope(i: int, rcpt: str) -> Envelope:
    return Envelope(
        id=f"Q{i:06d}",
        sender="s@x.test",
        recipients=[Recipient(rcpt)],
        created=1_800_000_000.0,
        client_ip="127.0.0.1",
        helo="x",
    )


@pytest.mark.parametrize("tmpfile", [True, False])
def test_local_delivery_shares_directory_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmpfile: bool
) -> None:
    monkeypatch.setattr(maildir, "_tmpfile_ok", tmpfile)
    covered: list[set[str]] = []  # what new/ held when each shared fsync of it started
    real = files.fsync_dir

    def fsync_dir(path: Path) -> None:
        covered.append(set(os.listdir(path)))
        time.sleep(0.005)  # a slow disk: deliveries pile up behind the sync
        real(path)

    monkeypatch.setattr(files, "fsync_dir", fsync_dir)
    pool = BlockingPool(8)
    try:
        local = LocalDelivery(tmp_path, "mx.x.test", pool)

        async def main() -> None:
            await asyncio.gather(
                *(
                    local.deliver(envelope(i, "u@x.test"), 0, "u@x.test", b"m\r\n")
                    for i in range(40)
                )
            )

        asyncio.run(main())
    finally:
        pool.shutdown()
    new = tmp_path / "mail" / "x.test" / "u" / "new"
    names = os.listdir(new)
    assert len(names) == 40 and all(Path(new, n).read_bytes().endswith(b"m\r\n") for n in names)
    assert os.listdir(new.parent / "tmp") == []
    if tmpfile:
        assert 0 < len(covered) < 40  # shared
        assert set(names) <= set().union(*covered)  # and every link was covered by one


def test_no_proc_link_falls_back_to_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without /proc the O_TMPFILE inode cannot be linked: the delivery is made the classic way.
    monkeypatch.setattr(maildir, "_tmpfile_ok", True)
    real_link = os.link

    def no_proc(src: str, dst: str, **kw: object) -> None:
        if src.startswith("/proc/self/fd/"):
            raise OSError(18, "Invalid cross-device link")
        real_link(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", no_proc)
    pool = BlockingPool(2)
    try:
        local = LocalDelivery(tmp_path, "mx.x.test", pool)
        asyncio.run(local.deliver(envelope(1, "u@x.test"), 0, "u@x.test", b"m\r\n"))
    finally:
        pool.shutdown()
    box = tmp_path / "mail" / "x.test" / "u"
    assert [p.read_bytes() for p in (box / "new").iterdir()] == [
        b"Return-Path: <s@x.test>\r\nDelivered-To: u@x.test\r\nm\r\n"
    ]
    assert os.listdir(box / "tmp") == [] and maildir._tmpfile_ok is False


def test_mailbox_removed_between_deliveries_is_made_again(tmp_path: Path) -> None:
    pool = BlockingPool(2)
    try:
        local = LocalDelivery(tmp_path, "mx.x.test", pool)
        asyncio.run(local.deliver(envelope(1, "u@x.test"), 0, "u@x.test", b"one\r\n"))
        box = tmp_path / "mail" / "x.test" / "u"
        shutil.rmtree(box)  # an admin removed the mailbox; the delivery cache still knows it
        asyncio.run(local.deliver(envelope(2, "u@x.test"), 0, "u@x.test", b"two\r\n"))
    finally:
        pool.shutdown()
    assert [p.read_bytes().endswith(b"two\r\n") for p in (box / "new").iterdir()] == [True]


def test_relative_maildir_path_is_linked_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the link's target was resolved against "/" (the dst_dir_fd that makes Python
    # call linkat) when the data directory was relative, as in the embedded default.
    monkeypatch.chdir(tmp_path)
    maildir.ensure(Path("rel-box"))
    assert maildir.deliver_tmpfile("rel-box", "1.Q_0.h", [b"m\r\n"], True)
    assert (tmp_path / "rel-box" / "new" / "1.Q_0.h").read_bytes() == b"m\r\n"


def test_data_dir_is_always_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert embedded_default().data_dir == tmp_path / "postroom-data"
    assert from_dict({"data_dir": "d"}).data_dir == tmp_path / "d"


def test_write_all_takes_more_pieces_than_one_writev_may(tmp_path: Path) -> None:
    parts = [b"%05d\n" % i for i in range(files.IOV_MAX * 3)]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        files.write_all(fd, parts)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"".join(parts)
