"""Shared fixtures: free loopback ports, and a real ``postroom serve`` in a subprocess."""

from __future__ import annotations

import base64
import compileall
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
SRC = ROOT / "src"


def _below_ephemeral() -> range:
    """Ports under the kernel's ephemeral range, where no outgoing connection takes one."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile ``src/`` to bytecode once, before the first server or CLI process starts.

    The suite starts many hundreds of Python processes (each ``serve`` with its writer and
    helper, and 514 CLI commands in one run), each importing postroom afresh. Where
    ``PYTHONDONTWRITEBYTECODE`` is set, as on the machines this project is tested on, none of
    them writes ``__pycache__`` and each compiled every module from source again: 11% of the
    time of test_smtp.py and test_cli.py together (69 s against 62 s). Reading bytecode needs
    no write access, so compiling once here serves them all."""
    compileall.compile_dir(SRC, quiet=1)


_PORT_POOL = _below_ephemeral()
_next_port = random.randrange(len(_PORT_POOL))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, none handed out twice in one run.

    Not one the kernel picks (bind to port 0): that comes from the ephemeral range, where a
    client socket opened meanwhile (the server under test relaying, a test's own client) can
    take it before the server binds it; CI saw "Address already in use" from that."""
    global _next_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(len(_PORT_POOL)):
        port = _PORT_POOL[_next_port % len(_PORT_POOL)]
        _next_port += 1
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host}")


def wait_until(
    check: Callable[[], T], timeout: float = 10.0, what: str = "a condition", interval: float = 0.02
) -> T:
    """Poll ``check`` until it returns something true, and return that; AssertionError naming
    ``what`` after ``timeout`` seconds. Use it instead of a fixed sleep: it is as fast as the
    server, and as patient as a loaded machine needs."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    wait_until(lambda: _port_open(host, port), timeout, f"{host}:{port} to open", 0.05)


def first_line(sock: socket.socket) -> bytes:
    """The server's next line (its greeting, say), CRLF included; less if it closes."""
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        buf += chunk
    return buf


def wait_greeting(host: str, port: int, timeout: float = 10) -> None:
    """Until a new connection gets a 220 greeting (the server has seen earlier ones close)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.create_connection((host, port), timeout=10) as s:
            if first_line(s).startswith(b"220 "):
                return
        assert time.monotonic() < deadline, "no 220 greeting"
        time.sleep(0.1)


def insecure() -> ssl.SSLContext:
    """A client TLS context for the servers' self-signed test certificates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_by_hand(sock: socket.socket) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A client TLS handshake over ``sock`` through memory BIOs (the TLS object, what comes
    in, what goes out), for tests that must put their own octets on the wire around it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = insecure().wrap_bio(incoming, outgoing, server_side=False)
    while True:
        try:
            tls.do_handshake()
            return tls, incoming, outgoing
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)


def converse(srv: Server, payload: bytes, timeout: float = 20) -> bytes:
    """One raw session with the smtp port: the greeting read, ``payload`` sent as it is, the
    write side shut; all the server answered until it closed."""
    with socket.create_connection((srv.host, srv.ports["smtp"]), timeout=timeout) as s:
        s.recv(1000)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def need_tool(name: str) -> str:
    """The path of an external client; fails in CI (CI=true), skips locally when missing."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI but not installed")
        pytest.skip(f"{name} not installed (apt-get install {name})")
    return path


def scram_client_final(password: bytes, first_bare: str, server_first: str) -> tuple[str, str]:
    """A SCRAM-SHA-256 client's side (RFC 5802 §3): the client-final message for
    ``server_first`` and the server-final message to expect (``v=...``)."""
    import base64
    import hashlib
    import hmac

    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    final_wo = f"c=biws,r={attrs['r']}"
    auth_msg = f"{first_bare},{server_first},{final_wo}".encode()
    sig = hmac.new(hashlib.sha256(client_key).digest(), auth_msg, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig, strict=True)))
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    verifier = base64.b64encode(hmac.new(server_key, auth_msg, "sha256").digest()).decode()
    return f"{final_wo},p={proof.decode()}", f"v={verifier}"


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
        self.cli("user", "add", address, "--password-stdin", "--allow-short", stdin=password + "\n")

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
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError("server did not start:\n" + self.log.read_text())
            return self.log.read_text().count("postroom: ready") > ready_before

        try:
            wait_until(ready, 20, "the server to start", 0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log.read_text()}") from None
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

    def worker_pid(self, started: int = 1, timeout: float = 10) -> int:
        """The pid of worker 0 once the supervisor has logged its start ``started`` times. The
        supervisor writes that line itself, so it may come after the worker's "ready"."""
        pids = wait_until(
            lambda: [
                int(p) for p in re.findall(r"worker 0 started, pid (\d+)", self.log.read_text())
            ][started - 1 :],
            timeout,
            f"worker 0's start number {started} in the log",
        )
        return pids[0]

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def maildir(self, address: str) -> Path:
        local, _, domain = address.lower().rpartition("@")
        return self.data_dir / "mail" / domain / local

    def messages(self, address: str) -> list[bytes]:
        """The messages in the user's Maildir new/ and cur/, oldest name first, with CRLF line
        ends as SMTP and POP3 carry them (the files have LF: :meth:`files` checks them)."""
        return [p.read_bytes().replace(b"\n", b"\r\n") for p in self.files(address)]

    def files(self, address: str) -> list[Path]:
        """The files in the user's Maildir new/ and cur/, oldest name first."""
        md = self.maildir(address)
        return sorted([*md.glob("new/*"), *md.glob("cur/*")], key=lambda p: p.name)

    def wait_messages(self, address: str, count: int, timeout: float = 10) -> list[bytes]:
        """The messages once there are ``count`` of them (what there is after ``timeout``)."""
        with contextlib.suppress(AssertionError):
            wait_until(lambda: len(self.messages(address)) >= count, timeout)
        return self.messages(address)

    def queue_empty(self) -> bool:
        return self.cli("queue", "list").stdout == ""


ServerFactory = Callable[..., Server]


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory every user may enter (pytest's tmp_path is closed to others), for
    tests that run something as another user."""
    path = Path(tempfile.mkdtemp(prefix="postroom-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture(scope="module")
def rsa_signer() -> tuple[bytes, bytes]:
    """An RSA-2048 key: its PEM for dkimpy's signer, and its DKIM key record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, b"v=DKIM1; p=" + base64.b64encode(der)
