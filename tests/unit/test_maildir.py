"""Maildir delivery: durable, never visible half-written, never replacing an existing file."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postroom.storage import maildir


@pytest.fixture(params=["tmpfile", "renamed"])
def box(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if request.param == "renamed":
        monkeypatch.setattr(maildir, "_tmpfile_ok", False)
    path = tmp_path / "box"
    maildir.ensure(path)
    return path


def test_deliver_writes_new_and_leaves_nothing_in_tmp(box: Path) -> None:
    assert maildir.deliver(box, "1.Q_0.h,S=7,W=7", [b"Sub", b"j\r\n\r\n"])
    assert (box / "new" / "1.Q_0.h,S=7,W=7").read_bytes() == b"Subj\r\n\r\n"
    assert os.listdir(box / "tmp") == []
    assert oct((box / "new" / "1.Q_0.h,S=7,W=7").stat().st_mode & 0o777) == "0o600"


def test_deliver_never_replaces_an_existing_message(box: Path) -> None:
    assert maildir.deliver(box, "2.Q_0.h", [b"first\r\n"])
    assert not maildir.deliver(box, "2.Q_0.h", [b"second\r\n"])
    assert (box / "new" / "2.Q_0.h").read_bytes() == b"first\r\n"
    assert os.listdir(box / "tmp") == []


def test_large_message_is_written_whole(box: Path) -> None:
    parts = [b"h" * 100, b"x" * (3 << 20)]
    assert maildir.deliver(box, "3.Q_0.h", parts)
    assert (box / "new" / "3.Q_0.h").read_bytes() == b"".join(parts)


def test_tmpfile_refused_by_the_file_system_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "box"
    maildir.ensure(path)
    real_open = os.open

    def no_tmpfile(file: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(95, "Operation not supported")
        return real_open(file, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir, "_tmpfile_ok", True)
    monkeypatch.setattr(os, "open", no_tmpfile)
    assert maildir.deliver(path, "4.Q_0.h", [b"m\r\n"])
    assert (path / "new" / "4.Q_0.h").read_bytes() == b"m\r\n"
    assert maildir._tmpfile_ok is False


def test_concurrent_deliveries_share_directory_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "box"
    maildir.ensure(path)
    real_fsync = os.fsync
    linked: list[str] = []  # names in new/ when each directory fsync started
    covered: list[set[str]] = []

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            covered.append(set(os.listdir(path / "new")))
            time.sleep(0.002)  # a slow disk: let deliveries pile up behind the sync
        real_fsync(fd)

    def one(i: int) -> None:
        name = f"{i}.Q_0.h"
        assert maildir.deliver(path, name, [b"m\r\n"])
        # On return, a directory fsync that started after our link has finished.
        assert any(name in names for names in covered)
        linked.append(name)

    monkeypatch.setattr(os, "fsync", fsync)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(64)))
    assert len(linked) == 64 and len(os.listdir(path / "new")) == 64
    assert len(covered) < 64  # shared
    assert maildir._sync_states == {}
