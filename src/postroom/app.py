"""Wires the running server together: listeners, the queue runner, signals and the control socket.

:class:`Services` is the one object every session gets: config, account store, queue, TLS
context, login throttle, connection limits. :func:`serve` starts everything listed in
``[listen]``, recovers the queue first (so nothing is served before a crashed delivery is
completed), and on SIGTERM/SIGINT stops accepting, answers idle sessions with 421, finishes
messages being stored, and exits 0 within 10 seconds. SIGHUP reloads the TLS certificate and
the parts of the config that can change without new sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import signal
import ssl
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from postroom import config as config_mod
from postroom import tls as tls_mod
from postroom.config import Config
from postroom.queue.store import QueueStore
from postroom.smtp.session import Port
from postroom.storage.accounts import Accounts
from postroom.throttle import LoginThrottle

log = logging.getLogger("postroom")

CONTROL_SOCKET = "control.sock"


class Closable(Protocol):
    """A live connection, as the limiter, the time-out sweeper and shutdown see it."""

    def shutdown(self) -> None: ...

    def check_timeout(self, now: float) -> None: ...


@dataclass
class ConnectionLimiter:
    """Counts open connections in total and per client IP (limits from ``[limits]``)."""

    max_total: int
    max_per_ip: int
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    live: set[Closable] = field(default_factory=set)
    per_ip: Counter[str] = field(default_factory=Counter)

    def acquire(self, ip: str, conn: Closable) -> bool:
        if len(self.live) >= self.max_total:
            return False
        if self.per_ip[ip] >= self.max_per_ip and not self._exempt(ip):
            return False
        self.live.add(conn)
        self.per_ip[ip] += 1
        return True

    def release(self, ip: str, conn: Closable) -> None:
        if conn in self.live:
            self.live.discard(conn)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]

    def _exempt(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.exempt)


@dataclass
class Services:
    """Everything a session needs, created once per server."""

    cfg: Config
    accounts: Accounts
    store: QueueStore
    throttle: LoginThrottle
    connections: ConnectionLimiter
    tls: ssl.SSLContext | None
    log: logging.Logger = log
    cpu_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="postroom-cpu")
    )
    runner: Any = None  # postroom.queue.runner.QueueRunner, set by build_services
    stopping: bool = False

    @property
    def banner(self) -> bytes:
        """The SMTP greeting (RFC 5321 §4.2: 220 and our host name)."""
        return f"220 {self.cfg.hostname} ESMTP postroom ready\r\n".encode()


def build_services(cfg: Config) -> Services:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    lim = cfg.limits
    services = Services(
        cfg=cfg,
        accounts=Accounts(cfg.data_dir),
        store=QueueStore(cfg.data_dir / "queue"),
        throttle=LoginThrottle(cfg.auth),
        connections=ConnectionLimiter(
            lim.max_connections, lim.max_connections_per_ip, cfg.per_ip_exempt_networks()
        ),
        tls=tls_mod.server_context(cfg),
    )
    from postroom.queue.runner import QueueRunner

    services.runner = QueueRunner(services)
    return services


def _raise_fd_limit() -> None:
    """Many idle connections need many descriptors: raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _start_listeners(services: Services) -> list[asyncio.Server]:
    from postroom.pop3 import server as pop3_server
    from postroom.smtp import server as smtp_server

    cfg = services.cfg
    servers: list[asyncio.Server] = []
    smtp_kinds: tuple[Port, ...] = ("smtp", "submission", "submissions")
    for kind in smtp_kinds:
        for host, port in getattr(cfg.listen, kind):
            servers.append(await smtp_server.start(services, host, port, kind))
            print(f"postroom: {kind} listening on {host}:{port}", file=sys.stderr)
    for pop_kind in ("pop3", "pop3s"):
        for host, port in getattr(cfg.listen, pop_kind):
            implicit = pop_kind == "pop3s"
            servers.append(await pop3_server.start(services, host, port, implicit_tls=implicit))
            print(f"postroom: {pop_kind} listening on {host}:{port}", file=sys.stderr)
    return servers


async def _control_server(services: Services) -> asyncio.AbstractServer:
    """A Unix socket in data_dir: ``queue flush``/``delete``/``reload`` from the CLI."""
    path = services.cfg.data_dir / CONTROL_SOCKET
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
            verb, _, arg = line.partition(" ")
            if verb == "flush":
                services.runner.flush()
                answer = "ok"
            elif verb == "delete":
                answer = "ok" if await services.runner.delete(arg) else "unknown"
            elif verb == "ping":
                answer = "ok"
            else:
                answer = "unknown command"
            writer.write(answer.encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    os.chmod(path, 0o600)
    return server


def _reload(services: Services) -> None:
    """SIGHUP: reload the TLS pair and the config parts that need no new sockets."""
    cfg = services.cfg
    try:
        new = config_mod.load(cfg.path) if cfg.path is not None else cfg
        services.tls = tls_mod.server_context(new)
    except Exception as exc:  # keep serving with the old settings
        log.error("reload failed: %s", exc)
        return
    services.cfg = new
    log.info("configuration reloaded")


async def serve(cfg: Config) -> int:
    _raise_fd_limit()
    services = build_services(cfg)
    loop = asyncio.get_running_loop()
    await services.runner.recover()
    servers = await _start_listeners(services)
    control = await _control_server(services)
    from postroom import privileges

    privileges.drop(cfg)
    runner_task = loop.create_task(services.runner.run())
    from postroom.smtp.server import IdleSweeper

    sweeper = loop.create_task(IdleSweeper(services).run())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, services)
    if cfg.path is None:
        print(
            f"postroom: embedded default; data in {cfg.data_dir.resolve()}\n"
            "postroom: add a user with: postroom user add you@localhost",
            file=sys.stderr,
        )
    print("postroom: ready", file=sys.stderr)
    await stop.wait()
    log.info("shutting down")
    services.stopping = True
    for server in servers:
        server.close()
    control.close()
    for conn in list(services.connections.live):
        with contextlib.suppress(Exception):
            conn.shutdown()
    # Let in-flight messages finish storing, then stop the queue runner.
    deadline = loop.time() + 8
    while services.connections.live and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await services.runner.stop()
    sweeper.cancel()
    runner_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner_task
    services.accounts.close()
    return 0


def run(cfg: Config) -> int:
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    try:
        if uvloop is not None:
            return int(uvloop.run(serve(cfg)))
        return asyncio.run(serve(cfg))
    except OSError as exc:
        # Typically a port that cannot be bound: one line, no traceback.
        print(f"postroom: error: {exc}", file=sys.stderr)
        return 1
