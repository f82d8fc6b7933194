"""datadir's answers as an ordinary user sees them (asked in a child that becomes nobody)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postroom import datadir

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")


@pytest.fixture
def base(open_tmp: Path) -> Path:
    return open_tmp


def as_nobody(path: Path) -> str | None:
    return datadir.as_user(NOBODY, NOBODY, lambda: datadir._problem(path, "nobody", owner=True))


def test_a_directory_of_its_own_is_fine(base: Path) -> None:
    os.chown(base, NOBODY, NOBODY)
    assert as_nobody(base / "data") is None
    (base / "data").mkdir()
    os.chown(base / "data", NOBODY, NOBODY)
    assert as_nobody(base / "data") is None


def test_another_users_directory_says_whose_it_is(base: Path) -> None:
    data = base / "data"
    data.mkdir(mode=0o755)
    problem = as_nobody(data)
    assert problem is not None
    assert problem.startswith(f"{data} is not writable by nobody (owner root, mode 0755)")
    assert "run postroom as root" in problem


def test_nowhere_to_create_it(base: Path) -> None:
    problem = as_nobody(base / "data")
    assert problem is not None
    assert problem.startswith(f"nobody cannot create a directory in {base} (owner root")


def test_its_own_read_only_directory(base: Path) -> None:
    data = base / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    data.chmod(0o555)
    assert as_nobody(data) == (
        f"{data} is not writable by its owner nobody (owner nobody, mode 0555); chmod u+rwx {data}"
    )


def test_a_root_owned_entry_inside(base: Path) -> None:
    data = base / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    (data / "queue").mkdir(mode=0o700)
    problem = as_nobody(data)
    assert problem is not None
    assert problem.startswith(f"{data / 'queue'} belongs to root and is not usable by nobody")


def test_parents_made_on_the_way_let_the_servers_user_through(tmp_path: Path) -> None:
    """Made by root under umask 077, missing parents were 0700 root's: the server's user
    could not reach its own data_dir (a raw errno from the CLI, a traceback from serve)."""
    from postroom.storage.local import files

    data_dir = tmp_path / "a" / "b" / "data"
    old = os.umask(0o077)
    try:
        files.make_data_dir(data_dir)
    finally:
        os.umask(old)
    modes = [os.stat(p).st_mode & 0o777 for p in (tmp_path / "a", tmp_path / "a" / "b", data_dir)]
    assert modes == [0o755, 0o755, 0o700]
    files.make_data_dir(data_dir)  # there already: nothing changes
