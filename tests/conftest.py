"""Shared fixtures: free loopback ports, and a real ``postroom serve`` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open")


def insecure() -> ssl.SSLContext:
    """A client TLS context for the servers' self-signed test certificates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def need_tool(name: str) -> str:
    """The path of an external client; fails in CI (CI=true), skips locally when missing."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI but not installed")
        pytest.skip(f"{name} not installed (apt-get install {name})")
    return path


def env_with_src() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(
    *args: str, config: Path | None = None, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "postroom", *args]
    if config is not None:
        cmd += ["-c", str(config)]
    proc = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, env=env_with_src(), timeout=60
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Server:
    """A running ``postroom serve`` and what the tests need to reach it."""

    config: Path
    data_dir: Path
    host: str
    ports: dict[str, int]
    domains: list[str]
    extra: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path("/dev/null"))

    def cli(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=self.config, stdin=stdin, check=check)

    def add_user(self, address: str, password: str = "secret") -> None:
        self.cli("user", "add", address, "--password-stdin", stdin=password + "\n")

    def start(self) -> None:
        assert self.proc is None
        ready_before = self.log.read_text().count("postroom: ready") if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "postroom", "serve", "-c", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env_with_src(),
                start_new_session=True,
            )
        # Ports are bound before the queue is recovered; "ready" comes once it serves.
        deadline = time.monotonic() + 20
        while self.log.read_text().count("postroom: ready") <= ready_before:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("server did not start:\n" + self.log.read_text())
            time.sleep(0.05)
        for port in self.ports.values():
            wait_port(self.host, port)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        return code

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def maildir(self, address: str) -> Path:
        local, _, domain = address.lower().rpartition("@")
        return self.data_dir / "mail" / domain / local

    def messages(self, address: str) -> list[bytes]:
        """The files in the user's Maildir new/ and cur/, oldest name first."""
        md = self.maildir(address)
        files = sorted([*md.glob("new/*"), *md.glob("cur/*")], key=lambda p: p.name)
        return [p.read_bytes() for p in files]

    def wait_messages(self, address: str, count: int, timeout: float = 10) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages(address)
            if len(msgs) >= count or time.monotonic() > deadline:
                return msgs
            time.sleep(0.02)


ServerFactory = Callable[..., Server]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Makes (and afterwards stops) servers: ``server_factory(domains=[...], extra_toml=...)``."""
    made: list[Server] = []

    def make(
        *,
        domains: tuple[str, ...] = ("a.test",),
        host: str = "127.0.0.1",
        hostname: str | None = None,
        extra_toml: str = "",
        start: bool = True,
        services: tuple[str, ...] = ("smtp", "submission", "submissions", "pop3", "pop3s"),
        name: str | None = None,
        ports: dict[str, int] | None = None,
    ) -> Server:
        base = tmp_path / (name or f"srv{len(made)}")
        base.mkdir()
        ports = {svc: (ports or {}).get(svc) or free_port(host) for svc in services}
        bracketed = f"[{host}]" if ":" in host else host  # an IPv6 address
        listen = "\n".join(f'{svc} = ["{bracketed}:{port}"]' for svc, port in ports.items())
        doms = ", ".join(f'"{d}"' for d in domains)
        cfg = base / "postroom.toml"
        text = (
            f'hostname = "{hostname or "mx." + domains[0]}"\n'
            f"domains = [{doms}]\n"
            f'data_dir = "{base / "data"}"\n'
            f"{_top_level(extra_toml)}\n"
            f"[listen]\n{listen}\n"
            f"{_tables(extra_toml)}\n"
        )
        cfg.write_text(text)
        srv = Server(
            cfg, base / "data", host, ports, list(domains), extra_toml, log=base / "server.log"
        )
        made.append(srv)
        if start:
            srv.start()
        return srv

    yield make
    for srv in made:
        if srv.proc is not None:
            with contextlib.suppress(Exception):
                srv.stop(timeout=12)


def _top_level(extra: str) -> str:
    out = []
    for line in extra.strip().splitlines():
        if line.strip().startswith("["):
            break
        out.append(line)
    return "\n".join(out)


def _tables(extra: str) -> str:
    lines = extra.strip().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("["):
            return "\n".join(lines[i:])
    return ""


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    """One private PostgreSQL for the session (fsync off: fast; see tests/pgserver.py)."""
    from tests.pgserver import running

    with running() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: object) -> str:
    """The url of a fresh, empty database on the session's PostgreSQL."""
    from tests.pgserver import PgServer

    assert isinstance(pg_server, PgServer)
    return pg_server.new_database()


@pytest.fixture
def pg_durable() -> Iterator[object]:
    """A PostgreSQL of the test's own with fsync on, for crash and restart tests."""
    from tests.pgserver import running

    with running(fsync=True) as server:
        yield server
