"""Wires the running server together: listeners, the queue runner, signals and the control socket.

:class:`Services` is the one object every session gets: config, account store, queue, TLS
context, login throttle, connection limits. :func:`serve` starts everything listed in
``[listen]``, recovers the queue first (so nothing is served before a crashed delivery is
completed), and on SIGTERM/SIGINT stops accepting, answers idle sessions with 421, finishes
messages being stored, and exits 0 within 10 seconds. The workers run under the supervisor
(:mod:`postroom.supervisor`), which restarts a dead one and, at SIGHUP, reads the config and
the TLS pair and hands them to the workers (:func:`_apply`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from postroom import __version__, events, lifetime, logs, metrics, privileges, supervisor
from postroom import tls as tls_mod
from postroom.auth.helper import DkimHelper
from postroom.auth.keys import KeyStore, LocalKeyStore
from postroom.auth.lookup import DnsCache
from postroom.auth.service import QueueMessage, SenderAuth
from postroom.blocking import BlockingPool
from postroom.config import Config, format_endpoint
from postroom.errors import ConfigError, PostroomError, QueueError
from postroom.queue.runner import QueueRunner
from postroom.services import ConnectionLimiter, Services
from postroom.sharedcounts import Counts, LocalCounts, SharedCounts, WorkerCounts, account_key
from postroom.smtp.policy import Port
from postroom.storage import credentials
from postroom.storage.interfaces import AccountLookup, MailboxDelivery, Maildrops, MessageQueue
from postroom.storage.local import files
from postroom.storage.local.accounts import Accounts
from postroom.storage.local.maildir_writer import MaildirWriter
from postroom.storage.local.maildrop import LocalMaildrops
from postroom.storage.local.queue import LocalMailboxes, LocalQueue
from postroom.throttle import LoginThrottle
from postroom.wire import replies

if TYPE_CHECKING:
    from postroom.storage.factory import NodeStores

log = logging.getLogger("postroom")

CONTROL_SOCKET = "control.sock"


def build_services(
    cfg: Config,
    pair: tuple[bytes, bytes] | None = None,
    primary: bool = True,
    workers: int = 1,
    index: int = 0,
    shared: Shared | None = None,
    stores: NodeStores | None = None,
    io: BlockingPool | None = None,
    again: bool = False,
) -> tuple[Services, QueueRunner]:
    """The shared bundle and the queue runner that takes its finished messages: with the
    local storage backend, or with ``stores`` (PostgreSQL, from ``storage/factory.py``)."""
    files.make_dirs(cfg.data_dir)
    cpus = cpu_pair(index, workers) if cfg.pin_cpus else None
    io = io or BlockingPool()  # blocking file work: the queue's and POP3's
    queue: MessageQueue
    mailboxes: MailboxDelivery
    if stores is None:
        writer = MaildirWriter(
            cfg.data_dir / "journal",
            privileges.target_ids(cfg),
            cpus[1] if cpus else None,
            # Body files no journal names are removed at the server's start only: a primary
            # started again beside a living worker would take that worker's spare files.
            clean_bodies=primary and not (again and workers > 1),
        )
        local = LocalQueue(cfg.data_dir, cfg.hostname, writer, io, cfg.limits.header_size)
        queue, mailboxes, slots = local, LocalMailboxes(local), None
        accounts: AccountLookup = Accounts(cfg.data_dir, cfg.domains)
        maildrops: Maildrops = LocalMaildrops(cfg.data_dir, io)
        keys: KeyStore = LocalKeyStore(cfg.data_dir)
    else:
        queue, mailboxes, slots = stores.queue, stores.mailboxes, stores.slots
        accounts, maildrops, keys = stores.accounts, stores.maildrops, stores.keys
    services = Services(
        cfg=cfg,
        accounts=accounts,
        queue=queue,
        throttle=LoginThrottle(cfg.auth, by_ip=shared.logins, by_account=shared.accounts)
        if shared
        else LoginThrottle(cfg.auth),
        connections=ConnectionLimiter.for_config(
            cfg, workers, shared.connections(index) if shared else None
        ),
        tls=tls_mod.server_context(cfg, pair),
        maildrops=maildrops,
        io=io,
        primary=primary,
        worker_index=index,
        workers=workers,
        cpus=cpus,
    )
    services.sender_auth = SenderAuth(
        cfg,
        DnsCache(cfg.dns, size=cfg.dns.cache_size),
        keys,
        run_blocking=services.io.run,
        helper=DkimHelper(sorted(os.sched_getaffinity(0))),  # before pin_cpus pins the worker
    )
    lease_fresh = stores.lease_fresh if stores is not None else None
    runner = QueueRunner(services, queue, mailboxes, slots=slots, lease_fresh=lease_fresh)
    services.intake = runner
    return services, runner


@dataclass(frozen=True)
class Shared:
    """The tables every worker shares, made before the fork (for one worker, plain dicts: the
    shared table costs ~10 us per connection, a dict ~1): login failures per IP in one table
    and per account in another, open connections in one table per worker (see WorkerCounts)."""

    connection_tables: tuple[SharedCounts, ...] | LocalCounts
    logins: Counts
    accounts: Counts  # login failures per account name

    @classmethod
    def for_workers(cls, workers: int) -> Shared:
        if workers == 1:
            return cls(LocalCounts(), LocalCounts(), LocalCounts(key=account_key))
        tables = tuple(SharedCounts() for _ in range(workers))
        return cls(tables, SharedCounts(), SharedCounts(key=account_key))

    def connections(self, index: int) -> Counts:
        """The open-connection counts worker ``index`` adds to."""
        tables = self.connection_tables
        return tables if isinstance(tables, LocalCounts) else WorkerCounts(tables, index)

    def worker_gone(self, index: int, pid: int = 0) -> None:
        """Worker ``index`` (process ``pid``) died: its connections are gone with it, and a
        lock it held is given back (for the supervisor, which must never wait for one)."""
        if isinstance(self.connection_tables, LocalCounts):
            return
        for table in (*self.connection_tables, self.logins, self.accounts):
            if isinstance(table, SharedCounts) and table.repair(pid):
                log.warning("worker %d (pid %d) died holding a shared lock: given back", index, pid)
        try:
            self.connection_tables[index].clear(wait=2.0)
        except TimeoutError:  # (the one table's only writer is dead: nobody to disturb)
            log.error("worker %d's connection counts not cleared: their lock is held", index)


def queue_made_here(runner: QueueRunner) -> QueueMessage:
    """Queue a message made by the server itself (a DMARC report), through the one way in."""
    return runner.accept_made_here


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


LOW_FD_LIMIT = 1024  # under this, warn at start: a worker holds about 35 with no client


def _raise_fd_limit() -> None:
    """Many idle connections need many descriptors: raise the soft limit to the hard one, and
    say so at start when even that leaves little room (sessions get 421 near the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < LOW_FD_LIMIT:
        log.warning(
            "the descriptor limit is %d (ulimit -n): a worker refuses connections (421) once"
            " it nears it; give it %d or more (LimitNOFILE=)",
            soft,
            LOW_FD_LIMIT,
        )


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


LISTENER_KINDS = ("smtp", "submission", "submissions", "pop3", "pop3s", "http")


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
                    if cfg.workers > 1:
                        _claim(family, addr)
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
                        exc.errno,
                        f"cannot listen on {format_endpoint(host, port)} ({kind}): {exc.strerror}",
                    ) from None
    except OSError:
        for listener in listeners:
            for sock in listener.socks:
                sock.close()
        raise
    return listeners


def _claim(family: socket.AddressFamily, addr: tuple[Any, ...]) -> None:
    """OSError if anyone listens on ``addr`` already. An SO_REUSEPORT group joins any other
    group on its port: a second server (or a second service of this one, its address spelled
    another way) would share its connections, each getting some at random. A socket bound
    without SO_REUSEPORT may join none, so it fails where the group would have joined."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(addr)
    finally:
        probe.close()


async def _start_listeners(services: Services, listeners: list[Listener]) -> list[asyncio.Server]:
    from postroom.http.server import Endpoints, HttpConnection
    from postroom.pop3.server import Pop3Connection
    from postroom.smtp.server import SmtpConnection

    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    endpoints = Endpoints(events.exposition, lambda: services.stopping, events.scrape_delay)
    for lst in listeners:
        sock = lst.keep_only(services.worker_index)
        implicit = lst.kind in ("submissions", "pop3s")
        factory: Callable[[], asyncio.Protocol]
        if lst.kind == "http":
            factory = functools.partial(HttpConnection, endpoints)
        elif lst.kind.startswith("pop3"):
            factory = functools.partial(Pop3Connection, services, implicit)
        else:
            factory = functools.partial(SmtpConnection, services, cast(Port, lst.kind), implicit)
        # Implicit TLS too is done by the connection (postroom.connection), with the context
        # in force when the client connects.
        servers.append(await loop.create_server(factory, sock=sock, backlog=1024))
        if services.primary:
            events.startup(f"{lst.kind} listening on {format_endpoint(lst.host, lst.port)}")
    return servers


def _refuse_while_waiting(cfg: Config, listeners: list[Listener], index: int) -> Callable[[], None]:
    """Answer every client of worker ``index`` at once with a temporary refusal, while it waits
    for PostgreSQL, and return the function that stops it. Its sockets are its own (the kernel
    spreads new connections over the workers' sockets): unanswered, one client in N would sit
    in the backlog for as long as the database is away, where a ``421`` (RFC 5321 §3.8) or
    ``-ERR [SYS/TEMP]`` (RFC 3206 §4) sends it to another MX or to a later try at once. The
    implicit-TLS ports and http are closed without a word (nothing can be said before a
    handshake)."""
    loop = asyncio.get_running_loop()
    smtp = replies.R(421, "4.3.2", f"{cfg.hostname} Service not available, try again later")
    words = {
        "smtp": smtp.render(),
        "submission": smtp.render(),
        "pop3": b"-ERR [SYS/TEMP] Service not available, try again later\r\n",
    }
    socks: list[socket.socket] = []

    def refuse(sock: socket.socket, answer: bytes) -> None:
        try:
            conn, _ = sock.accept()
        except OSError:  # taken meanwhile, or gone
            return
        with conn, contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(answer)

    for lst in listeners:
        sock = lst.keep_only(index)
        socks.append(sock)
        loop.add_reader(sock.fileno(), refuse, sock, words.get(lst.kind, b""))

    def stop() -> None:
        for sock in socks:
            loop.remove_reader(sock.fileno())

    return stop


def control_path(data_dir: Path, index: int) -> Path:
    """The control socket of worker ``index`` (the primary's is ``control.sock``)."""
    return data_dir / (CONTROL_SOCKET if index == 0 else f"control-{index}.sock")


async def _control_server(services: Services, runner: QueueRunner) -> asyncio.AbstractServer:
    """A Unix socket in data_dir: ``queue flush``/``delete`` from the CLI, ``submit`` from the
    other workers (a message they parked), one per worker (``delete`` of a message in its
    first attempt goes to the worker that makes it)."""
    path = control_path(services.cfg.data_dir, services.worker_index)
    queue = runner.queue
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def answer(verb: str, arg: str) -> str:
        if verb in ("flush", "adopt") and isinstance(queue, LocalQueue):
            if verb == "flush":  # what the start could not replay (a full disk) first
                await queue.replay_left()
            # A dead worker's messages, parked by the replay of its journal: scheduled
            # here (a flush as well: "every deferred message", whoever parked it).
            adopted = await queue.adopt(runner.busy)
            if adopted:
                log.info("queue: %d messages parked by another worker scheduled", adopted)
        if verb == "flush":
            runner.forget_unreachable()
            events.queue_action("flush", count=queue.flush(runner.busy))
            return "ok"
        if verb in ("adopt", "ping"):
            return "ok"
        if verb == "unsuspend":  # a flush at another worker: its hosts are dialled again
            runner.forget_unreachable()
            return "ok"
        if verb == "submit" and isinstance(queue, LocalQueue):
            # Another worker parked a message: the primary schedules its retries (unless
            # a flush adopted it first and its attempt runs: not a second one beside it).
            return "ok" if arg in runner.busy or queue.take(arg) is not None else "unknown"
        if verb == "delete":
            if not await runner.delete(arg):
                return "unknown"
            events.queue_action("delete", queue_id=arg)
            return "ok"
        return "unknown command"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
            verb, _, arg = line.partition(" ")
            try:
                reply = await answer(verb, arg)
            except OSError as exc:  # (a full disk, say: the CLI says so, not "done")
                reply = f"error: {exc}"
            writer.write(reply.encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError, ValueError):  # ValueError: not UTF-8, or too long
            pass
        finally:
            writer.close()

    with files.unix_address(path) as address:
        server = await asyncio.start_unix_server(handle, path=address)
    os.chmod(path, 0o600)
    ids = privileges.target_ids(services.cfg)
    if ids is not None:  # made before the drop (every worker): the CLI, run as user, uses it
        os.chown(path, *ids)
    return server


_handing_over: set[asyncio.Task[None]] = set()


def _hand_over(services: Services, queue_id: str) -> None:
    """A secondary worker parked a message after its first attempt: the primary, which owns
    the retries, is told over its control socket (and finds it at its next start anyway)."""
    task = asyncio.get_running_loop().create_task(_submit(services, queue_id))
    _handing_over.add(task)
    task.add_done_callback(_handing_over.discard)


async def _submit(services: Services, queue_id: str, command: str = "submit") -> None:
    """Tell the primary of ``queue_id`` (``command`` "adopt": of what the replay of a dead
    worker's journal parked, no id needed)."""
    path = control_path(services.cfg.data_dir, 0)
    for attempt in range(50):
        try:
            with files.unix_address(path) as address:
                reader, writer = await asyncio.open_unix_connection(address)
            writer.write(f"{command} {queue_id}\n".encode())
            await writer.drain()
            await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            return
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1 * (attempt + 1))
    services.log.error(
        "could not hand %s to the primary worker; it is tried at the next start", queue_id
    )


def _apply(services: Services, new: Config, pair: tuple[bytes, bytes] | None) -> None:
    """A reload from the supervisor: a new TLS context with the new pair (every listener and
    STARTTLS take it at their next handshake; open sessions keep theirs), the new settings
    for new sessions (domains, limits, auth, delivery, log level). A new context, not the
    pair loaded into the old one: OpenSSL keeps one pair per key type, so an RSA pair loaded
    where an EC one was would be served beside it, the old one to every client that takes
    EC."""
    if pair is not None and services.tls is not None:
        try:
            services.tls = tls_mod.server_context(new, pair)
        except (OSError, ssl.SSLError, ConfigError) as exc:  # checked by the supervisor
            log.error("reload: TLS pair not loaded, the old one stays: %s", exc)
        else:
            events.certificate(tls_mod.certificate_expiry(pair[0]))
    services.cfg = new
    services.accounts.local_domains = new.domains
    if services.sender_auth is not None:
        services.sender_auth.cfg = new
    connections = services.connections
    connections.max_total = new.limits.max_connections
    connections.max_per_ip = new.limits.max_connections_per_ip
    connections.set_exempt(new.per_ip_exempt_networks())
    services.throttle.cfg = new.auth
    logs.setup(new)
    if isinstance(services.intake, QueueRunner):
        services.intake.reconfigured()
    log.info("configuration reloaded%s", "" if pair is None else " with the TLS pair")


def _on_supervisor(services: Services, worker: Worker, stop: asyncio.Event) -> None:
    assert worker.channel is not None
    try:
        message = supervisor.read_message(worker.channel)
    except (OSError, ValueError, EOFError) as exc:
        log.error("reload: bad message from the supervisor: %s", exc)
        return
    if message is None:  # the supervisor is gone: so are we (PR_SET_PDEATHSIG, or here)
        asyncio.get_running_loop().remove_reader(worker.channel.fileno())
        stop.set()
        return
    _apply(services, *message)
    if worker.primary and services.sender_auth is not None:
        try:  # a domain added by the reload gets its DKIM keys now, as on first start
            services.sender_auth.ensure_keys()
        except (OSError, PostroomError) as exc:
            log.error("reload: DKIM keys not made: %s", exc)


async def serve(
    cfg: Config,
    listeners: list[Listener],
    worker: Worker,
    pair: tuple[bytes, bytes],
    shared: Shared | None = None,
) -> int:
    """One worker's event loop. The primary (worker 0) also recovers and runs the queue."""
    stores = None
    io = BlockingPool()
    if cfg.storage.backend == "postgresql":
        from postroom.storage import factory

        # Before privileges are dropped (a ~/.pgpass of the starting user is read now). A node
        # does not start without the database; a worker started again waits for it.
        waiting = functools.partial(_refuse_while_waiting, cfg, listeners, worker.index)
        stores = await factory.open_node(cfg, io, worker.index, worker.again, waiting)
    services, runner = build_services(
        cfg, pair, worker.primary, cfg.workers, worker.index, shared, stores, io, worker.again
    )
    loop = asyncio.get_running_loop()
    logs.flush_from(loop)
    control = None
    if services.cpus is not None:
        pin_process(services.cpus[0])
    elif cfg.pin_cpus:
        log.warning("pin_cpus: fewer than two CPUs per worker; not pinned")
    queue = services.queue
    if isinstance(queue, LocalQueue):
        assert queue.writer is not None
        await queue.writer.start()  # before privileges are dropped: see there
        if worker.primary:
            queue.recover(clean=not (worker.again and cfg.workers > 1))
        else:
            queue.on_parked = functools.partial(_hand_over, services)
            if worker.again:  # its writer replayed the dead one's journal: the primary looks
                task = loop.create_task(_submit(services, "", "adopt"))
                _handing_over.add(task)
                task.add_done_callback(_handing_over.discard)
    else:
        # Shared: a message deleted from any node stops its attempt here.
        queue.on_deleted = runner.deleted_elsewhere  # type: ignore[attr-defined]
        queue.on_flushed = runner.forget_unreachable  # type: ignore[attr-defined]
    if worker.primary:
        assert services.sender_auth is not None
        services.sender_auth.ensure_keys()  # DKIM keys made on first start
    servers = await _start_listeners(services, listeners)
    control = await _control_server(services, runner)
    from postroom.connection import IdleSweeper

    if worker.primary:
        privileges.secure_data_dir(cfg)
    privileges.preload(cfg)
    privileges.drop(cfg)
    lifetime.die_with_parent(worker.parent)  # again: a change of uid forgets it
    # After the drop: its files belong to the user.
    _setup_metrics(services, listeners, queue, pair[0])
    worker.release_others()  # the queue is recovered: the other workers may serve now
    tasks = [
        loop.create_task(IdleSweeper(services).run()),
        loop.create_task(runner.close_idle_sessions()),
    ]
    if worker.primary:
        tasks.append(loop.create_task(runner.run()))
        assert services.sender_auth is not None
        tasks.append(loop.create_task(services.sender_auth.run(queue_made_here(runner))))
    for task in tasks:
        task.add_done_callback(_log_if_failed)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if worker.channel is not None:
        # SIGHUP to a worker asks the supervisor, which reads what the worker may no longer
        # (over the channel: a worker that dropped root may not signal it).
        loop.add_signal_handler(signal.SIGHUP, supervisor.ask_reload, worker.channel)
        loop.add_reader(worker.channel.fileno(), _on_supervisor, services, worker, stop)
    if worker.primary:
        from postroom.datadir import add_user_command

        where = "embedded default; data" if cfg.path is None else "data"
        events.startup(f"{where} in {cfg.data_dir}")
        events.startup(f"add a user with: {add_user_command(cfg)}")
        events.startup("ready")
    if worker.channel is not None:
        supervisor.ready(worker.channel)
    await stop.wait()
    events.note("master", "shutting down")
    services.stopping = True  # /healthz answers 503 from now on
    runner.begin_stop()  # no final dot goes out while the sessions below finish
    http_servers = [s for s, lst in zip(servers, listeners, strict=True) if lst.kind == "http"]
    for server in servers:
        if server not in http_servers:
            server.close()
    if control is not None:
        control.close()
        with contextlib.suppress(OSError):
            control_path(cfg.data_dir, worker.index).unlink()
    for conn in list(services.connections.live):
        with contextlib.suppress(Exception):
            conn.shutdown()
    # Let in-flight messages finish storing, then stop the queue runner. One deadline for
    # both: deliveries run meanwhile, and a client dripping its DATA plus a peer that holds
    # its reply must not add up past the supervisor's grace (exit within 10 s of SIGTERM).
    deadline = loop.time() + 8
    while services.connections.live and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(services.connections.live):
        with contextlib.suppress(Exception):
            conn.cut_off()
    await asyncio.sleep(0)  # (their disconnects are logged)
    left = deadline - loop.time()
    await runner.stop(timeout=min(5.0, left), commit_timeout=left)
    if isinstance(queue, LocalQueue):
        assert queue.writer is not None
        await queue.writer.close()
        await queue.spares.close()
    for task in tasks:
        task.cancel()
    # (A task that ended by an error was logged then; the stop is still a clean one.)
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in http_servers:
        server.close()
    services.accounts.close()
    if stores is not None:
        await stores.close()
    logs.flush_from(None)
    logs.flush()
    return 0


def _log_if_failed(task: asyncio.Task[None]) -> None:
    """A background task of the server ended by an error: said when it happens, not at the
    stop (where it made the exit status 1) or never."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        name = getattr(task.get_coro(), "__qualname__", task.get_name())
        log.error("background task %s stopped: %r", name, exc, exc_info=exc)


def _setup_metrics(
    services: Services, listeners: list[Listener], queue: MessageQueue, cert_pem: bytes
) -> None:
    """This worker's metrics (``cert_pem``: the certificate chain served); with several
    workers, shared through ``data_dir/metrics``."""
    cfg = services.cfg
    shared = cfg.workers > 1 and bool(cfg.listen.http)

    def local_spool() -> tuple[int, float | None]:
        """Messages waiting for a retry, and when the oldest arrived."""
        assert isinstance(queue, LocalQueue)
        ids = queue.deferred.ids()
        oldest = None
        for qid in ids[:5]:  # ids sort by arrival; the first readable one is the oldest
            with contextlib.suppress(QueueError):
                oldest = queue.deferred.load(qid).created
                break
        return len(ids), oldest

    spool = local_spool
    storage_up = metrics.always_up  # the local backend has no database
    if not isinstance(queue, LocalQueue):
        from postroom.storage.postgresql.queue import PgQueue

        assert isinstance(queue, PgQueue)
        spool = queue.spool_stats  # never waits: a count made in the background
        storage_up = queue.storage_up

    events.setup(
        enabled=bool(cfg.listen.http),
        multiprocess_dir=cfg.data_dir / metrics.METRICS_DIR if shared else None,
        data_dir=cfg.data_dir,
        services=sorted({lst.kind for lst in listeners}),
        spool=spool,
        storage_up=storage_up,
    )
    events.certificate(tls_mod.certificate_expiry(cert_pem))


@dataclass
class Worker:
    """This process's place among the workers: ``workers`` processes share the listening
    sockets (made before the fork) and each runs its own event loop, so that SMTP and POP3
    use every core. The primary alone recovers and runs the queue; at the first start the
    others wait for it (a pipe) before they serve. All are children of the supervisor
    (:mod:`postroom.supervisor`) and die with it."""

    primary: bool
    index: int = 0
    parent: int = 0  # the supervisor
    channel: socket.socket | None = None  # to the supervisor
    go_fd: int | None = None  # the primary: written once recovered, to release the others
    again: bool = False  # started again after a worker of its slot died (not the first start)

    def release_others(self) -> None:
        if self.go_fd is not None:
            os.write(self.go_fd, b"g" * 64)
            os.close(self.go_fd)
            self.go_fd = None


def _loop_run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return int(uvloop.run(coro))


def _start_failed(cfg: Config, reason: str) -> None:
    """Why ``serve`` cannot start: ``postroom: error: REASON``, one line, as a JSON object
    too (its ``message``) with ``log_format = "json"``, where every line is one."""
    if cfg.log_format == "json":
        events.startup(reason, logs.ERROR)
    else:
        print(f"postroom: error: {logs.printable(reason)}", file=sys.stderr)


def run(cfg: Config) -> int:
    files.private_umask()
    # numpy serves wire/bulk.py's scans and no BLAS routine, but OpenBLAS starts a thread per
    # extra core when numpy loads, and that thread spun between the scans: 3% of both cores'
    # time at 100 KiB from 20 sessions (perf). One thread, unless the admin set it.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    logs.setup(cfg)
    log.info(
        "postroom %s starting: config %s, data_dir %s, %d worker(s)",
        __version__,
        cfg.path or "<default>",
        cfg.data_dir,
        cfg.workers,
    )
    _raise_fd_limit()
    try:
        data_lock = lock_data_dir(cfg.data_dir)
    except OSError as exc:
        _start_failed(cfg, str(exc))
        return 1
    if cfg.workers > 1 and cfg.listen.http:
        metrics.prepare_directory(cfg.data_dir)
    try:
        listeners = bind_listeners(cfg)
    except OSError as exc:
        # Typically a port that cannot be bound: one line, no traceback.
        _start_failed(cfg, str(exc.strerror or exc))
        return 1
    try:
        pair = tls_mod.read_pair(cfg)  # as root, if started so: the workers may not read it
        tls_mod.check_pair(cfg, *pair)
    except ConfigError as exc:
        _start_failed(cfg, str(exc))
        return 2
    parent = os.getpid()
    shared = Shared.for_workers(
        cfg.workers
    )  # before the fork: every worker, restarted ones too, sees the same

    def worker_main(
        index: int,
        primary: bool,
        channel: socket.socket,
        go: int | None,
        again: bool,
        cfg: Config,
        pair: tuple[bytes, bytes],
    ) -> int:
        lifetime.die_with_parent(parent)
        if go is not None and not primary:
            released = os.read(go, 1) == b"g"  # EOF: the primary failed to start
            os.close(go)
            if not released:
                return 0
            go = None
        worker = Worker(primary, index, parent, channel, go, again)
        # The hash an unknown user's login is checked against, made beside the start (argon2
        # lets go of the GIL) and not before it: 0.13-0.19 s of each start. A login that
        # comes first makes its own.
        threading.Thread(target=credentials.warm_up, daemon=True).start()
        try:
            return _loop_run(serve(cfg, listeners, worker, pair, shared))
        except (OSError, PostroomError) as exc:  # PostgreSQL away at start, a newer schema
            _start_failed(cfg, str(exc))
            return 1

    def stop_listening() -> None:
        # The workers close their listening sockets at SIGTERM; this process's copies would
        # keep the ports open, and a new client would wait in the kernel's backlog for an
        # accept that never comes. Without them it is refused, and an MTA tries the next MX.
        # (A worker's own /healthz socket stays open until it exits.)
        for listener in listeners:
            for sock in listener.socks:
                sock.close()

    status = supervisor.Supervisor(
        cfg, pair, worker_main, stop_listening, on_worker_gone=shared.worker_gone
    ).run()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # Stopped: another signal changes nothing. (Python's exit puts the default actions
        # back, and a second SIGTERM then ended the process by the signal, not with 0.)
        signal.signal(sig, signal.SIG_IGN)
    stop_listening()
    os.close(data_lock)
    log.info("stopped (exit status %d)", status)
    logs.flush()
    return status


def lock_data_dir(data_dir: Path, wait: float = 5.0) -> int:
    """An exclusive ``flock`` on ``data_dir`` for as long as this server runs (its workers
    inherit it): a second ``serve`` on the same directory would run a second queue runner on
    the same queue and, on stopping, remove the first one's control socket. Waits ``wait``
    seconds for a server that is just going (its workers die with the supervisor, a moment
    later); then OSError."""
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise OSError(
                    f"{data_dir}: another `postroom serve` is running with this data_dir"
                ) from None
            time.sleep(0.1)
