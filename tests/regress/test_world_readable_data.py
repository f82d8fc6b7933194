"""Password hashes, SCRAM keys, mail and keys readable by every local user (issue: a 0644
``accounts.sqlite`` in a 0755 ``data_dir``). Everything the server and the CLI create under
``data_dir`` is 0700 (directories) or 0600 (files), whatever the umask; an existing install
is tightened when the server starts, and the account store when a CLI command opens it."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import smtplib
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server, ServerFactory, free_port, run_cli


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def loose(data_dir: Path, owner: int | None = None) -> list[str]:
    """Every path under ``data_dir`` (itself included) that others could read, or whose
    owner is not ``owner``."""
    bad = []
    for path in [data_dir, *data_dir.rglob("*")]:
        st = path.lstat()
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if stat.S_IMODE(st.st_mode) != want or (owner is not None and st.st_uid != owner):
            bad.append(f"{path.relative_to(data_dir.parent)} {oct(st.st_mode)} uid={st.st_uid}")
    return bad


def deliver(srv: Server, rcpt: str) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
        c.sendmail("x@remote.test", [rcpt], b"Subject: t\r\n\r\nhello\r\n")
    assert srv.wait_messages(rcpt, 1)


def expected_entries(data_dir: Path) -> None:
    names = {p.name for p in data_dir.iterdir()}
    for name in (
        "accounts.sqlite",
        "accounts.sqlite-wal",
        "accounts.sqlite-shm",
        "queue",
        "journal",
        "mail",
        "tls",
        "control.sock",
    ):
        assert name in names, names


def test_everything_private_under_a_loose_umask(server_factory: ServerFactory) -> None:
    with umask(0o022):
        srv = server_factory(start=False, services=("smtp",))
        srv.add_user("alice@a.test")
        assert loose(srv.data_dir) == []  # the CLI made data_dir and the account store
        srv.start()
        deliver(srv, "alice@a.test")
        expected_entries(srv.data_dir)
        assert loose(srv.data_dir) == []


def test_existing_install_is_tightened(server_factory: ServerFactory) -> None:
    srv = server_factory(services=("smtp",))
    srv.add_user("alice@a.test")
    deliver(srv, "alice@a.test")
    srv.stop()
    for path in [srv.data_dir, *srv.data_dir.rglob("*")]:  # as an older version left it
        path.chmod(0o755 if path.is_dir() else 0o644)
    run_cli("user", "list", config=srv.config)
    for name in ("", "accounts.sqlite", "mail"):
        mode = stat.S_IMODE((srv.data_dir / name).stat().st_mode)
        assert mode in (0o700, 0o600), (name, oct(mode))
    srv.start()
    assert loose(srv.data_dir) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_private_after_privilege_drop() -> None:
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="postroom-modes-"))
    base.chmod(0o755)  # the mail user must reach data_dir; nothing below it may be open
    try:
        port = free_port()
        cfg = base / "postroom.toml"
        cfg.write_text(
            f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{base}/data"\n'
            f'user = "nobody"\n[listen]\nsmtp = ["127.0.0.1:{port}"]\n'
        )
        srv = Server(cfg, base / "data", "127.0.0.1", {"smtp": port}, ["a.test"], log=base / "log")
        with umask(0o022):
            srv.add_user("alice@a.test")
            assert loose(srv.data_dir, nobody.pw_uid) == []
            srv.start()
        try:
            deliver(srv, "alice@a.test")
            expected_entries(srv.data_dir)
            assert loose(srv.data_dir, nobody.pw_uid) == []
        finally:
            srv.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
