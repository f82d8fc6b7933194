"""The walk ``serve`` makes as root over ``data_dir`` (0700/0600, owner ``user``) touches only
what is in the tree: not a file a link points to, not one swapped for a link while the walk
runs, not another's file hard-linked into the tree."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from postroom.storage.local import files

NOBODY = (65534, 65534)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_tree_is_tightened_and_links_are_left(tmp_path: Path) -> None:
    data, victim = tmp_path / "data", tmp_path / "victim"
    (data / "mail" / "new").mkdir(parents=True)
    (data / "mail" / "new" / "m1").write_bytes(b"x")
    victim.write_bytes(b"secret")
    for path in (data, data / "mail", data / "mail" / "new", data / "mail" / "new" / "m1", victim):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (data / "mail" / "new" / "link").symlink_to(victim)
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    (data / "dirlink").symlink_to(outside, target_is_directory=True)
    os.mkfifo(data / "fifo", 0o644)
    files.tighten(data)
    assert [mode(p) for p in (data, data / "mail", data / "mail" / "new")] == [0o700] * 3
    assert mode(data / "mail" / "new" / "m1") == 0o600
    assert mode(victim) == 0o644 and mode(outside) == 0o755
    assert mode(data / "fifo") == 0o644  # not a file of ours: left, and never opened


def test_an_entry_swapped_for_a_link_midway_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of a probe: the entry is a file when it is looked at and a link to a file
    outside by the time its mode is changed."""
    data, victim = tmp_path / "data", tmp_path / "victim"
    data.mkdir(mode=0o700)
    entry = data / "m1"
    entry.write_bytes(b"x")
    entry.chmod(0o644)
    victim.write_bytes(b"secret")
    victim.chmod(0o644)

    swapped: list[bool] = []

    def swap_after(real: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
        def looked_at(*args: object, **kwargs: object) -> os.stat_result:
            result = real(*args, **kwargs)
            if stat.S_ISREG(result.st_mode) and result.st_size == 1 and not swapped:
                swapped.append(True)
                os.unlink(entry)
                os.symlink(victim, entry)
            return result

        return looked_at

    monkeypatch.setattr(os, "lstat", swap_after(os.lstat))  # where the old walk looked
    monkeypatch.setattr(os, "fstat", swap_after(os.fstat))  # where this one looks
    files.tighten(data)
    monkeypatch.undo()
    assert swapped and entry.is_symlink()
    assert mode(victim) == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away")
def test_anothers_file_hard_linked_in_is_not_given_away(tmp_path: Path) -> None:
    """The user may link a file of root's it can read and write (``fs.protected_hardlinks``
    allows that: a re-probe gave away a root 0666 file so), or any where the setting is off."""
    data, victim = tmp_path / "data", tmp_path / "victim"
    data.mkdir(mode=0o700)
    victim.write_bytes(b"secret")
    victim.chmod(0o644)
    os.link(victim, data / "m1")  # root's file, as /etc/shadow would be
    (data / "own").write_bytes(b"x")  # root's too, a single name: made by a CLI run as root
    files.tighten(data, NOBODY)
    st = victim.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)
    assert (data / "own").stat().st_uid == NOBODY[0] and data.stat().st_uid == NOBODY[0]


def test_only_the_top_entries_without_deep(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "mail").mkdir(parents=True)
    (data / "mail" / "m1").write_bytes(b"x")
    (data / "accounts").write_bytes(b"x")
    for path in (data, data / "mail", data / "mail" / "m1", data / "accounts"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    files.tighten(data, deep=False)
    assert [mode(data), mode(data / "mail"), mode(data / "accounts")] == [0o700, 0o700, 0o600]
    assert mode(data / "mail" / "m1") == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away")
def test_linked_copies_of_an_earlier_run_as_root_are_re_owned(tmp_path: Path) -> None:
    """A server that ran as root linked one file into the Maildirs of several recipients;
    with ``user`` set now, those copies must become the user's (or it could not read them):
    all their names are in the tree."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "a").write_bytes(b"mail")
    os.link(data / "a", data / "b")
    files.tighten(data, NOBODY)
    assert (data / "a").stat().st_uid == NOBODY[0] == (data / "b").stat().st_uid


def test_a_directory_swapped_for_a_link_to_a_fifo_never_blocks_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-probe: ``os.fwalk`` opened each directory with a plain O_RDONLY, following a link
    swapped in after the listing, and the start blocked on a FIFO outside for as long as
    nobody wrote to it."""
    import threading

    data, fifo = tmp_path / "data", tmp_path / "fifo"
    (data / "box" / "sub").mkdir(parents=True)
    (data / "box" / "plain").mkdir()
    os.mkfifo(fifo)
    real = files._tighten_at

    def then_swap(name: str, dir_fd: int, *args: object) -> None:
        real(name, dir_fd, *args)  # type: ignore[arg-type]
        if name == "sub":  # listed as a directory, tightened; now a link to the FIFO
            (data / "box" / "sub").rmdir()
            (data / "box" / "sub").symlink_to(fifo)
        elif name == "plain":  # and this one the FIFO itself
            (data / "box" / "plain").rmdir()
            os.mkfifo(data / "box" / "plain")

    monkeypatch.setattr(files, "_tighten_at", then_swap)
    walk = threading.Thread(target=files.tighten, args=(data,), daemon=True)
    walk.start()
    walk.join(10)
    assert not walk.is_alive(), "the walk blocked opening a FIFO"


def test_a_tree_nested_too_deep_is_walked_to_a_depth_and_the_start_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A re-probe: 1,000 levels made the walk's recursion fail, and the server never
    started again."""
    data = tmp_path / "data"
    deep = data
    for _ in range(files.TIGHTEN_DEPTH + 20):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (data / "d").chmod(0o755)
    files.tighten(data)
    assert mode(data / "d") == 0o700
    assert "nested too deep" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away")
def test_a_socket_of_anothers_linked_in_is_not_given_away(tmp_path: Path) -> None:
    import socket

    data, victim = tmp_path / "data", tmp_path / "victim.sock"
    data.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(victim))
        victim.chmod(0o660)
        os.link(victim, data / "s")
        files.tighten(data, NOBODY)
    st = victim.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o660)
