"""Maildir delivery: durable, never visible half-written, never replacing an existing file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postroom.config import embedded_default, from_dict
from postroom.storage import files, maildir


def tmpfile_deliver(box: str, name: str, parts: list[bytes]) -> bool | None:
    """What the Maildir writer does with one job: write, fsync, link, fsync new/."""
    fd = maildir.write_unnamed(box, parts)
    if fd is None:
        return None
    try:
        os.fsync(fd)
        linked = maildir.link_unnamed(fd, box, name)
    finally:
        os.close(fd)
    files.fsync_dir(os.path.join(box, "new"))
    return linked


@pytest.fixture
def box(tmp_path: Path) -> str:
    path = tmp_path / "box"
    maildir.ensure(path)
    return str(path)


def test_tmpfile_delivery_leaves_nothing_in_tmp(box: str) -> None:
    assert tmpfile_deliver(box, "1.Q_0.h,S=7,W=7", [b"Sub", b"j\r\n\r\n"])
    assert os.listdir(Path(box, "tmp")) == []
    path = Path(box, "new", "1.Q_0.h,S=7,W=7")
    assert path.read_bytes() == b"Subj\r\n\r\n"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_tmpfile_delivery_never_replaces_an_existing_message(box: str) -> None:
    assert tmpfile_deliver(box, "2.Q_0.h", [b"first\r\n"])
    assert tmpfile_deliver(box, "2.Q_0.h", [b"second\r\n"]) is False
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
    assert tmpfile_deliver(box, "4.Q_0.h", [b"m\r\n"]) is None
    assert maildir._tmpfile_ok is False and os.listdir(Path(box, "new")) == []


def test_relative_maildir_path_is_linked_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the link's target was resolved against "/" (the dst_dir_fd that makes Python
    # call linkat) when the data directory was relative, as in the embedded default.
    monkeypatch.chdir(tmp_path)
    maildir.ensure(Path("rel-box"))
    assert tmpfile_deliver("rel-box", "1.Q_0.h", [b"m\r\n"])
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
