"""Maildir delivery: never visible half-written; earlier copies found in new/ or cur/."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from postroom.config import embedded_default, from_dict
from postroom.storage.local import files, maildir


@pytest.fixture
def box(tmp_path: Path) -> str:
    path = tmp_path / "box"
    maildir.ensure(path)
    return str(path)


def publish(box: str, name: str, parts: list[bytes], where: str | None = None) -> None:
    os.close(maildir.publish(box, name, parts, where))


def test_a_copy_is_written_in_tmp_and_appears_whole_in_new(box: str) -> None:
    publish(box, "1.Q_0.h,S=7,W=7", [b"Sub", b"j\r\n\r\n"])
    assert os.listdir(Path(box, "tmp")) == []
    path = Path(box, "new", "1.Q_0.h,S=7,W=7")
    assert path.read_bytes() == b"Subj\r\n\r\n"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_failed_write_leaves_nothing_behind(box: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, parts: object) -> None:
        os.write(fd, b"Sub")  # part of it went in before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildir, "write_all", full)
    with pytest.raises(OSError, match="No space"):
        publish(box, "2.Q_0.h", [b"Subj\r\n\r\n"])
    assert os.listdir(Path(box, "tmp")) == [] and os.listdir(Path(box, "new")) == []


def test_find_looks_in_new_and_in_cur_with_any_flags(box: str) -> None:
    assert maildir.find(box, "5.Q_0.h") is None
    publish(box, "5.Q_0.h", [b"m\r\n"])
    assert maildir.find(box, "5.Q_0.h") == os.path.join(box, "new", "5.Q_0.h")
    os.rename(Path(box, "new", "5.Q_0.h"), Path(box, "cur", "5.Q_0.h:2,S"))
    assert maildir.find(box, "5.Q_0.h") == os.path.join(box, "cur", "5.Q_0.h:2,S")
    assert maildir.find(box, "5.Q_0") is None  # a prefix of another name is not that name


def test_a_copy_can_replace_a_damaged_one_where_it_lies(box: str) -> None:
    Path(box, "cur", "6.Q_0.h:2,S").write_bytes(b"")  # emptied by a power loss
    publish(box, "6.Q_0.h", [b"whole\r\n"], os.path.join(box, "cur", "6.Q_0.h:2,S"))
    assert os.listdir(Path(box, "cur")) == ["6.Q_0.h:2,S"]
    assert Path(box, "cur", "6.Q_0.h:2,S").read_bytes() == b"whole\r\n"


def test_a_removed_maildir_is_made_again(tmp_path: Path) -> None:
    box = str(tmp_path / "gone")
    publish(box, "7.Q_0.h", [b"m\r\n"])  # never made: made on first delivery
    assert Path(box, "new", "7.Q_0.h").exists() and Path(box, "cur").is_dir()


def test_relative_maildir_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # as in the embedded default
    publish("rel-box", "1.Q_0.h", [b"m\r\n"])
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
