"""A data_dir the server cannot use (a file, inside a directory closed to the server's user, a
directory its owner cannot write) gave a traceback from the Maildir writer and left root-owned
files behind, or bare errno text with exit 1. Now every command, ``serve`` included, stops
before making anything: one line ``postroom: error: FILE: data_dir: reason and fix``, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import env_with_src, free_port

COMMANDS = [
    ["serve"],
    ["user", "add", "x@a.test", "--password-stdin"],
    ["user", "passwd", "x@a.test", "--password-stdin"],
    ["user", "del", "x@a.test"],
    ["user", "list"],
    ["alias", "add", "team@a.test", "x@b.test"],
    ["alias", "del", "team@a.test"],
    ["alias", "list"],
    ["queue", "list"],
    ["queue", "show", "ABC"],
    ["queue", "flush"],
    ["queue", "delete", "ABC"],
]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (it drops to nobody)")


@pytest.fixture
def base(open_tmp: Path) -> Path:
    return open_tmp


def config(base: Path, data_dir: Path, extra: str = "") -> Path:
    cfg = base / "p.toml"
    cfg.write_text(
        f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{data_dir}"\n{extra}\n'
        f'[listen]\nsmtp = ["127.0.0.1:{free_port()}"]\n'
    )
    return cfg


def refused(cfg: Path, command: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "postroom", *command, "-c", str(cfg)],
        input="pw\n",
        capture_output=True,
        text=True,
        env=env_with_src(),
        timeout=60,
    )
    assert proc.returncode == 2, (command, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, (command, proc.stderr)
    assert lines[0].startswith(f"postroom: error: {cfg}: data_dir: "), lines[0]
    return lines[0]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_file_in_the_way(base: Path, command: list[str]) -> None:
    (base / "data").write_text("not a directory")
    cfg = config(base, base / "data")
    assert "is a file, not a directory" in refused(cfg, command)
    cfg = config(base, base / "data" / "below")
    assert "is a file, not a directory" in refused(cfg, command)
    assert tree(base) == ["data", "p.toml"]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_place_where_no_directory_can_be_made(base: Path, command: list[str]) -> None:
    # /proc passes every test of access(2) as root, and mkdir there fails: that was an errno
    # line with exit 1 (and, for serve, after the start-up warnings).
    assert "/proc/postroom-test" in refused(config(base, Path("/proc/postroom-test")), command)


@root_only
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_inside_a_directory_closed_to_the_servers_user(base: Path, command: list[str]) -> None:
    closed = base / "root-only"
    closed.mkdir(mode=0o700)
    cfg = config(base, closed / "data", 'user = "nobody"')
    message = refused(cfg, command)
    assert f"nobody cannot reach {closed}/data: {closed} is closed to nobody" in message
    assert list(closed.iterdir()) == []  # nothing left behind, root-owned or not


@root_only
@pytest.mark.parametrize("command", [["serve"], ["user", "add", "x@a.test", "--password-stdin"]])
def test_a_directory_its_owner_cannot_write(base: Path, command: list[str]) -> None:
    data = base / "data"
    data.mkdir(mode=0o555)
    data.chmod(0o555)
    cfg = config(base, data, 'user = "nobody"')
    assert f"{data} has mode 0555" in refused(cfg, command)
    assert tree(base) == ["data", "p.toml"]


def test_a_usable_directory_is_made_and_used(base: Path) -> None:
    cfg = config(base, base / "deep" / "data")
    proc = subprocess.run(
        [sys.executable, "-m", "postroom", "user", "list", "-c", str(cfg)],
        capture_output=True,
        text=True,
        env=env_with_src(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert (base / "deep" / "data").is_dir()
