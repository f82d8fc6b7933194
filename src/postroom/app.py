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
import functools
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

from postroom import config as config_mod
from postroom import lifetime, logs
from postroom import tls as tls_mod
from postroom.config import Config
from postroom.errors import PostroomError
from postroom.queue.runner import QueueRunner
from postroom.queue.store import QueueStore
from postroom.services import ConnectionLimiter, Services
from postroom.smtp.policy import Port
from postroom.storage import factory
from postroom.storage.factory import NodeStores
from postroom.storage.local.accounts import Accounts
from postroom.throttle import LoginThrottle

log = logging.getLogger("postroom")

CONTROL_SOCKET = "control.sock"


def build_services(
    cfg: Config,
    primary: bool = True,
    workers: int = 1,
    index: int = 0,
    stores: NodeStores | None = None,
) -> tuple[Services, QueueRunner]:
    """The shared bundle and the queue runner that takes its finished messages. Without
    ``stores``, those of the local backend."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    services = Services(
        cfg=cfg,
        accounts=stores.accounts if stores is not None else Accounts(cfg.data_dir),
        store=QueueStore(cfg.data_dir / "queue"),
        throttle=LoginThrottle(cfg.auth),
        connections=ConnectionLimiter.for_config(cfg, workers),
        tls=tls_mod.server_context(cfg),
        primary=primary,
        worker_index=index,
        workers=workers,
        cpus=cpu_pair(index, workers) if cfg.pin_cpus else None,
    )
    runner = QueueRunner(services)
    services.intake = runner
    return services, runner


def cpu_pair(index: int, workers: int) -> tuple[int, int] | None:
    """For ``pin_cpus``: two CPUs of those this process may use for worker ``index``, or None
    if there are fewer than two per worker."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 * workers:
        return None
    return cpus[2 * index], cpus[2 * index + 1]


def pin_process(cpu: int) -> None:
    """Keep every thread of this process on ``cpu`` (threads made later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), {cpu})


def _raise_fd_limit() -> None:
    """Many idle connections need many descriptors: raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Listener:
    """A listening socket made before the event loop (and before any worker is forked)."""

    kind: str  # smtp, submission, submissions, pop3, pop3s
    host: str
    port: int
    socks: list[socket.socket]  # one per worker (SO_REUSEPORT spreads connections evenly)

    def keep_only(self, index: int) -> socket.socket:
        """After the fork: worker ``index`` keeps its own socket and closes the others, so
        that the kernel never hands a connection to a socket nobody accepts on."""
        for i, sock in enumerate(self.socks):
            if i != index:
                sock.close()
        return self.socks[index]


LISTENER_KINDS = ("smtp", "submission", "submissions", "pop3", "pop3s")


def bind_listeners(cfg: Config) -> list[Listener]:
    """Bind every address in ``[listen]`` (as root if need be); OSError names the one at fault.

    With several workers each gets its own socket in an SO_REUSEPORT group, made here, before
    the fork: the kernel then spreads new connections evenly over the workers.
    """
    listeners: list[Listener] = []
    try:
        for kind in LISTENER_KINDS:
            for host, port in getattr(cfg.listen, kind):
                listener = Listener(kind, host, port, [])
                listeners.append(listener)
                try:
                    family, _t, _p, _c, addr = socket.getaddrinfo(
                        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                    )[0]
                    for _ in range(cfg.workers):
                        sock = socket.socket(family, socket.SOCK_STREAM)
                        listener.socks.append(sock)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        if cfg.workers > 1:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                        if family == socket.AF_INET6:
                            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        sock.bind(addr)
                        sock.listen(1024)
                        sock.setblocking(False)
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"cannot listen on {host}:{port} ({kind}): {exc.strerror}"
                    ) from None
    except OSError:
        for listener in listeners:
            for sock in listener.socks:
                sock.close()
        raise
    return listeners


async def _start_listeners(services: Services, listeners: list[Listener]) -> list[asyncio.Server]:
    from postroom.pop3.server import Pop3Connection
    from postroom.smtp.server import SmtpConnection

    loop = asyncio.get_running_loop()
    handshake = services.cfg.limits.tls_handshake_timeout
    servers: list[asyncio.Server] = []
    for lst in listeners:
        sock = lst.keep_only(services.worker_index)
        implicit = lst.kind in ("submissions", "pop3s")
        factory: Callable[[], asyncio.Protocol]
        if lst.kind.startswith("pop3"):
            factory = functools.partial(Pop3Connection, services, implicit)
        else:
            factory = functools.partial(SmtpConnection, services, cast(Port, lst.kind), implicit)
        servers.append(
            await loop.create_server(
                factory,
                sock=sock,
                backlog=1024,
                ssl=services.tls if implicit else None,
                ssl_handshake_timeout=handshake if implicit else None,
            )
        )
        if services.primary:
            print(f"postroom: {lst.kind} listening on {lst.host}:{lst.port}", file=sys.stderr)
    return servers


async def _control_server(services: Services, runner: QueueRunner) -> asyncio.AbstractServer:
    """A Unix socket in data_dir: ``queue flush``/``delete``/``reload`` from the CLI."""
    path = services.cfg.data_dir / CONTROL_SOCKET
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
            verb, _, arg = line.partition(" ")
            if verb == "flush":
                runner.flush()
                answer = "ok"
            elif verb == "submit":
                # Another worker spooled a message: the primary's runner delivers it.
                answer = "ok" if runner.submit_id(arg) else "unknown"
            elif verb == "delete":
                answer = "ok" if await runner.delete(arg) else "unknown"
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


def _reload(services: Services, worker: Worker) -> None:
    """SIGHUP: reload the TLS pair and the config parts that need no new sockets."""
    worker.signal_others(signal.SIGHUP)
    cfg = services.cfg
    try:
        new = config_mod.load(cfg.path) if cfg.path is not None else cfg
        services.tls = tls_mod.server_context(new)
    except Exception as exc:  # keep serving with the old settings
        log.error("reload failed: %s", exc)
        return
    services.cfg = new
    fresh = ConnectionLimiter.for_config(new, services.workers)
    connections = services.connections
    connections.max_total, connections.max_per_ip = fresh.max_total, fresh.max_per_ip
    connections.exempt = fresh.exempt
    services.throttle.cfg = new.auth
    log.info("configuration reloaded")


async def serve(cfg: Config, listeners: list[Listener], worker: Worker) -> int:
    """One worker's event loop. The primary (worker 0) also recovers and runs the queue."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    stores = await factory.open_node(cfg)
    services, runner = build_services(cfg, worker.primary, cfg.workers, worker.index, stores)
    loop = asyncio.get_running_loop()
    control = None
    if services.cpus is not None:
        pin_process(services.cpus[0])
    elif cfg.pin_cpus:
        log.warning("pin_cpus: fewer than two CPUs per worker; not pinned")
    await runner.local.writer.start()  # before privileges are dropped: see there
    if worker.primary:
        await runner.recover()
    servers = await _start_listeners(services, listeners)
    if worker.primary:
        control = await _control_server(services, runner)
    from postroom import privileges
    from postroom.smtp.server import IdleSweeper

    privileges.drop(cfg, chown=worker.primary)
    worker.release_others()  # the queue is recovered: the other workers may serve now
    tasks = [loop.create_task(IdleSweeper(services).run())]
    if worker.primary:
        tasks.append(loop.create_task(runner.run()))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, services, worker)
    if worker.primary:
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
    if control is not None:
        control.close()
        with contextlib.suppress(OSError):
            (cfg.data_dir / CONTROL_SOCKET).unlink()
    worker.signal_others(signal.SIGTERM)
    for conn in list(services.connections.live):
        with contextlib.suppress(Exception):
            conn.shutdown()
    # Let in-flight messages finish storing, then stop the queue runner.
    deadline = loop.time() + 8
    while services.connections.live and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await runner.stop()
    for task in tasks:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks)
    await worker.wait_others(deadline=loop.time() + 1)
    await stores.close()
    logs.flush()
    return 0


@dataclass
class Worker:
    """This process's place among the workers: ``workers`` processes share the listening
    sockets (made before the fork) and each runs its own event loop, so that SMTP and POP3
    use every core. The primary alone recovers and runs the queue; the others wait for it
    (a pipe) before they serve, and die with it (PR_SET_PDEATHSIG)."""

    primary: bool
    index: int = 0
    children: list[int] = field(default_factory=list)
    go_fd: int | None = None

    def release_others(self) -> None:
        if self.go_fd is not None:
            os.write(self.go_fd, b"g" * len(self.children))
            os.close(self.go_fd)
            self.go_fd = None

    def signal_others(self, sig: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def wait_others(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        pending = list(self.children)
        while pending:
            for pid in list(pending):
                try:
                    done, _status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    pending.remove(pid)
            if pending and loop.time() > deadline + 8:
                self.signal_others(signal.SIGKILL)
            if pending:
                await asyncio.sleep(0.05)


def _loop_run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return int(uvloop.run(coro))


def run(cfg: Config) -> int:
    logs.setup(cfg)
    _raise_fd_limit()
    try:
        listeners = bind_listeners(cfg)
    except OSError as exc:
        # Typically a port that cannot be bound: one line, no traceback.
        print(f"postroom: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    worker = Worker(primary=True)
    if cfg.workers > 1:
        parent = os.getpid()
        go_r, go_w = os.pipe()
        for index in range(1, cfg.workers):
            pid = os.fork()
            if pid == 0:
                os.close(go_w)
                lifetime.die_with_parent(parent)
                released = os.read(go_r, 1) == b"g"  # EOF: the primary failed to start
                os.close(go_r)
                if not released:
                    os._exit(0)
                try:
                    code = _loop_run(serve(cfg, listeners, Worker(primary=False, index=index)))
                except (OSError, PostroomError) as exc:
                    print(f"postroom: error: worker {index}: {exc}", file=sys.stderr)
                    code = 1
                os._exit(code)
            worker.children.append(pid)
        os.close(go_r)
        worker.go_fd = go_w
    try:
        return _loop_run(serve(cfg, listeners, worker))
    except (OSError, PostroomError) as exc:  # PostgreSQL away at start, a schema too new
        print(f"postroom: error: {exc}", file=sys.stderr)
        worker.signal_others(signal.SIGTERM)
        return 1
