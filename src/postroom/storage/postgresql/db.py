"""Connections to PostgreSQL: the pools of one worker process, and a blocking door for the CLI.

The driver is asyncpg: every query goes through a prepared statement that the connection keeps
in its statement cache, so a query repeated per message is parsed and planned once per
connection. (A pooler in front of PostgreSQL must therefore keep sessions: PgBouncer in session
mode, not transaction mode.) Passwords need not be part of the config: the url is
``postgresql://USER@HOST:PORT/DB`` and libpq's ``PGPASSWORD`` or password file (``PGPASSFILE``,
else ``~/.pgpass``) supply one if the server asks; the file is read before privileges are
dropped (:func:`remember_password`).

:class:`Database` holds a worker's two pools: ``pool`` for short work (deliveries, account
changes, the queue) and ``sessions`` for POP3, where each logged-in session keeps one connection
for its life (its mailbox lock lives on it). :class:`Door` is one connection for synchronous
callers (the command line); :class:`Watcher` is a worker's one LISTEN connection, which keeps
the node's in-memory copies (accounts, DKIM keys) fresh and wakes its queue runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import asyncpg
import asyncpg.connect_utils
from asyncpg import Record
from asyncpg.pool import PoolConnectionProxy

from postroom.errors import StorageUnavailable, TemporaryStorageError

T = TypeVar("T")
log = logging.getLogger("postroom")
# asyncpg's pool logs a warning with a traceback at every try to reconnect its idle floor
# (every few seconds while the database is away); the stores say when an outage starts and
# when it ends, once each.
logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
# PostgreSQL's probes of a connection idle this long, then every interval, ended after this
# many unanswered: a node that vanished (power lost, cut off) gives up its sessions' locks
# (a POP3 mailbox's [IN-USE]) within two minutes, not the two hours of the kernel's default.
KEEPALIVES = {
    "tcp_keepalives_idle": "60",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "6",
}
FULL_REFRESH = 300.0  # the watcher's subscribers load everything again this often
RECONNECT_DELAY = 1.0

# What a failed call to PostgreSQL raises when the server is away or the connection broke:
# answered with a 4xx by the servers (the caller may try again), "failure at run time" by the CLI.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57P: shutting down, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.InterfaceError,  # "connection is closed"
    # "cannot switch to state N; another operation is in progress": asyncpg's protocol got
    # the server's farewell (a shutdown) in the middle of a round trip
    asyncpg.exceptions.InternalClientError,
)
# Any failed call: the above, or an error PostgreSQL reported (a constraint, a bad schema).
FAILED: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)
ACQUIRE_TIMEOUT = 5.0  # seconds to wait for a connection of a pool
# What a reconnection may heal.
TRANSIENT: tuple[type[BaseException], ...] = (TemporaryStorageError, *UNAVAILABLE)
CLOSE_FAILED: tuple[type[BaseException], ...] = (TimeoutError, *UNAVAILABLE)


_PASSWORDS: dict[str, str] = {}


def remember_password(url: str) -> None:
    """Read the password of ``url`` from the password file now, while this process is still
    the user that started it: after the privilege drop HOME still names that user's
    directory, whose ``.pgpass`` the server's user cannot read, and every connection made
    later (a reconnection after PostgreSQL restarted) would go without. A password in the url
    or in ``PGPASSWORD`` needs nothing (asyncpg finds it at every connection)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password or os.environ.get("PGPASSWORD"):
        return
    passfile = os.environ.get("PGPASSFILE") or os.path.join(os.path.expanduser("~"), ".pgpass")
    # asyncpg's own reader (libpq's format, matching and permission rules); if a newer
    # asyncpg lacks it, it still reads the file itself at every connection.
    reader = getattr(asyncpg.connect_utils, "_read_password_from_pgpass", None)
    if reader is None:
        return
    try:
        found = reader(
            passfile=pathlib.Path(passfile),
            hosts=[parts.hostname or "localhost"],
            ports=[parts.port or 5432],
            database=urllib.parse.unquote(parts.path.lstrip("/")),
            user=urllib.parse.unquote(parts.username or ""),
        )
    except (TypeError, OSError):
        return
    if found:
        _PASSWORDS[url] = found


def _why(exc: BaseException, waited: float = CONNECT_TIMEOUT) -> str:
    """What went wrong, in words (a time-out's own text is empty)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {waited:g} s"
    return str(exc) or type(exc).__name__


def _settings(url: str, name: str) -> dict[str, str]:
    """Our server settings for a connection: ``name`` as its application_name and
    :data:`KEEPALIVES`, but for those the url sets itself (asyncpg lets ours win)."""
    own = {key.lower() for key, _ in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)}
    ours = {"application_name": name, **KEEPALIVES}
    return {key: value for key, value in ours.items() if key not in own}


async def connect(url: str, name: str = "postroom") -> asyncpg.Connection:
    """One connection of its own (the CLI, the LISTEN connection, migrations); ``name`` is
    its ``application_name`` (what ``pg_stat_activity`` shows)."""
    try:
        return await asyncpg.connect(
            url,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings=_settings(url, name),
            password=_PASSWORDS.get(url),
        )
    except FAILED as exc:  # away, or refused: no such database or role, a wrong password
        raise StorageUnavailable(f"cannot connect to PostgreSQL: {_why(exc)}") from None


class Database:
    """The pools of one worker process."""

    def __init__(self, url: str, pool_size: int, sessions: int) -> None:
        self.url = url
        self._sizes = (pool_size, sessions)
        self._pool: asyncpg.Pool | None = None
        self._sessions: asyncpg.Pool | None = None
        self.up = True  # the last round trip noted got an answer (``postroom_storage_up``)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[PoolConnectionProxy[Record]]:
        """A connection of the pool for a round trip or a few. Its outcome sets :attr:`up`:
        an answer (an error PostgreSQL reported included) means up, a failure to reach it
        down; so every store's traffic says whether the database answers."""
        try:
            conn = await self.pool.acquire(timeout=ACQUIRE_TIMEOUT)
        except UNAVAILABLE:
            self.up = False
            raise
        try:
            yield conn
        except UNAVAILABLE:
            self.up = False
            raise
        except asyncpg.PostgresError:
            self.up = True
            raise
        else:
            self.up = True
        finally:
            # The work is done once its reply is read (a statement's commit above all): a
            # connection that breaks as the pool resets it (PostgreSQL shutting down just
            # then) takes nothing back, and asyncpg has terminated it. Raised from here, it
            # turned a committed message into a 452, which its client sent again.
            try:
                await self.pool.release(conn)
            except Exception:  # whatever broke there, asyncpg has terminated the connection
                self.up = False

    def _make_pool(self, name: str, min_size: int, max_size: int, **extra: Any) -> asyncpg.Pool:
        return asyncpg.create_pool(
            self.url,
            min_size=min_size,
            max_size=max_size,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings=_settings(self.url, name),
            password=_PASSWORDS.get(self.url),
            **extra,
        )

    async def open(self) -> None:
        size, sessions = self._sizes
        try:
            self._pool = await self._make_pool("postroom", 1, size)
            # An idle session connection is closed after a while: POP3 comes in bursts.
            self._sessions = await self._make_pool(
                "postroom-pop3", 0, sessions, max_inactive_connection_lifetime=60.0
            )
        except FAILED as exc:
            await self.close()
            raise StorageUnavailable(f"cannot connect to PostgreSQL: {_why(exc)}") from None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "Database.open() first"
        return self._pool

    @property
    def sessions(self) -> asyncpg.Pool:
        assert self._sessions is not None, "Database.open() first"
        return self._sessions

    async def close(self) -> None:
        for pool in (self._sessions, self._pool):
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), 5)
                except CLOSE_FAILED:
                    pool.terminate()
        self._pool = self._sessions = None


class Door:
    """One connection for synchronous callers: the CLI, and the rare synchronous write of a
    running server (a DKIM key saved). Its event loop runs in a thread of its own, so it may
    be called from any thread, one that runs another event loop included (which then waits
    for the round trip). A connection that broke is made again at the next call."""

    def __init__(self, url: str, name: str = "postroom-cli") -> None:
        self.url = url
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._conn: asyncpg.Connection | None = None
        try:
            self._connection()
        except BaseException:
            self._stop()
            raise

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result()

    def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = self.run(connect(self.url, self.name))
        return self._conn

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(conn, *args)`` to completion; PostgreSQL away -> TemporaryStorageError."""
        with self._lock:  # one caller at a time on the one connection
            try:
                return self.run(fn(self._connection(), *args))
            except UNAVAILABLE as exc:
                raise StorageUnavailable(f"PostgreSQL: {_why(exc, COMMAND_TIMEOUT)}") from None

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._conn is not None:
            try:
                self.run(self._conn.close(timeout=5))
            except CLOSE_FAILED:
                self._conn.terminate()
        self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class Subscriber(Protocol):
    """Something a :class:`Watcher` keeps fresh: a node's copy of a table, a waiting runner."""

    channel: str

    def notified(self, payload: str) -> bool:
        """A NOTIFY on :attr:`channel`; True if :meth:`refresh` has work to do now."""
        ...

    async def load_all(self, conn: asyncpg.Connection) -> None:
        """Read everything again (at start, after a reconnection, every FULL_REFRESH)."""
        ...

    async def refresh(self, conn: asyncpg.Connection) -> None:
        """Read what the notifications since the last call named."""
        ...


class Watcher:
    """The one LISTEN connection of a worker process, shared by its subscribers (the accounts
    copy, the DKIM keys copy, the queue runner's wake-up).

    LISTEN comes before each load, so a change committed after a load's snapshot is always
    notified and read again after it. Every ``FULL_REFRESH`` seconds and after every
    reconnection everything is loaded again, in case a notification was missed. While
    PostgreSQL is away the subscribers keep what they have, and the watcher retries."""

    def __init__(self, url: str, subscribers: Sequence[Subscriber]) -> None:
        self.url = url
        self.subscribers = list(subscribers)
        self._wake = asyncio.Event()
        self._dirty: set[int] = set()
        self._first: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_full_load = 0.0
        self.connected = False

    async def start(self) -> None:
        """Connect, LISTEN and load everything; the first failure is raised (a node does not
        serve without its accounts)."""
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._task = loop.create_task(self._run())
        try:
            await self._first
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _settle(self, error: BaseException | None) -> None:
        if self._first is not None and not self._first.done():
            if error is None:
                self._first.set_result(None)
            else:
                self._first.set_exception(error)

    def _listener(self, index: int) -> Callable[[object, int, str, object], None]:
        def notified(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            if self.subscribers[index].notified(str(payload)):
                self._dirty.add(index)
                self._wake.set()

        return notified

    async def _run(self) -> None:
        away = False  # logged once per outage, not once per try
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self.url, "postroom-watch")
                conn.add_termination_listener(lambda _c: self._wake.set())
                for i, sub in enumerate(self.subscribers):
                    await conn.add_listener(sub.channel, self._listener(i))
                await self._load_all(conn)
                self.connected = True
                if away:
                    log.warning("PostgreSQL answers the watcher again; accounts and keys reloaded")
                    away = False
                self._settle(None)
                while not conn.is_closed():
                    wait = self.last_full_load + FULL_REFRESH - time.monotonic()
                    if wait <= 0:
                        await self._load_all(conn)
                        continue
                    if self._dirty:
                        dirty, self._dirty = self._dirty, set()
                        for i in sorted(dirty):
                            await self.subscribers[i].refresh(conn)
                        continue
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
            except Exception as exc:  # keep what the copies hold, and retry
                self._settle(exc)
                if isinstance(exc, TRANSIENT):
                    if not away:
                        log.warning("PostgreSQL unavailable to the watcher (%s); retrying", exc)
                    away = True
                else:  # a schema that does not fit, say
                    log.exception("watcher: reload failed; retrying")
            finally:
                self.connected = False
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(RECONNECT_DELAY)

    async def _load_all(self, conn: asyncpg.Connection) -> None:
        self._dirty.clear()  # what is notified from here on is read again afterwards
        for sub in self.subscribers:
            await sub.load_all(conn)
        self.last_full_load = time.monotonic()
