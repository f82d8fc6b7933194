"""A private PostgreSQL server for the tests: initdb in a temporary directory, one loopback port.

Started as the ``postgres`` system user when the tests run as root (PostgreSQL refuses to run
as root), as the current user otherwise. ``fsync=False`` trades durability for speed (the
default for the suite); tests of crash promises start their own server with ``fsync=True``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian keeps it off PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def need_postgresql() -> Path:
    """The bin directory; fails in CI (CI=true), skips locally when PostgreSQL is missing."""
    bindir = pg_bindir()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is required in CI but not installed")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    return bindir


class PgServer:
    """One running ``postgres``; :meth:`new_database` hands out fresh databases."""

    def __init__(self, bindir: Path, fsync: bool = False) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.dir = Path(tempfile.mkdtemp(prefix="postroom-pg-"))
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._count = 0
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.dir, 0o700)
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.dir / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
        )

    def _run(self, cmd: list[str]) -> None:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120, **self._as_owner())

    def _as_owner(self) -> dict[str, Any]:  # subprocess's keyword arguments
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        assert self.proc is None
        self.port = self.port or free_port(self.host)
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.dir),
            "max_connections": "300",
            "shared_buffers": "64MB",
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "logging_collector": "off",
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.dir / "data")]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=log,
            start_new_session=True,
            **self._as_owner(),
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port)],
                check=False,
            )
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("PostgreSQL did not start:\n" + self.log())
            time.sleep(0.05)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "server.log").read_text(errors="replace")
        return ""

    def stop(self, mode: str = "fast") -> None:
        """``fast`` (SIGINT: sessions are ended, a clean shutdown) or ``immediate`` (SIGQUIT:
        as a crash, recovery at the next start)."""
        if self.proc is None:
            return
        sig = {"fast": 2, "immediate": 3, "kill": 9}[mode]
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def psql(self, database: str, sql: str) -> str:
        out = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.url(database),
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip()

    def new_database(self) -> str:
        """A fresh, empty database; its url."""
        self._count += 1
        name = f"t{os.getpid()}_{self._count}"
        self.psql("postgres", f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running(fsync: bool = False) -> Iterator[PgServer]:
    server = PgServer(need_postgresql(), fsync=fsync)
    try:
        server.start()
        yield server
    finally:
        server.destroy()
