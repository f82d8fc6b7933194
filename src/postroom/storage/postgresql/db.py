"""Connections to PostgreSQL: the pools of one worker process, and a blocking door for the CLI.

The driver is asyncpg: every query goes through a prepared statement that the connection keeps
in its statement cache, so a query repeated per message is parsed and planned once per
connection. (A pooler in front of PostgreSQL must therefore keep sessions: PgBouncer in session
mode, not transaction mode.) Passwords are not part of the config: the url is
``postgresql://USER@HOST:PORT/DB`` and libpq's ``PGPASSWORD`` or ``~/.pgpass`` supply one if the
server asks (asyncpg reads both).

:class:`Database` holds a worker's two pools: ``pool`` for short work (deliveries, account
changes, the queue) and ``sessions`` for POP3, where each logged-in session keeps one connection
for its life (its mailbox lock lives on it). :class:`Blocking` runs coroutines to completion on
a private event loop, for the command line, which is synchronous.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from postroom.errors import TemporaryStorageError

T = TypeVar("T")

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0

# What a failed call to PostgreSQL raises when the server is away or the connection broke:
# answered with a 4xx by the servers (the caller may try again), "failure at run time" by the CLI.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57P: shutting down, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.InterfaceError,  # "connection is closed"
)
# Any failed call: the above, or an error PostgreSQL reported (a constraint, a bad schema).
FAILED: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)
# What a reconnection may heal.
TRANSIENT: tuple[type[BaseException], ...] = (TemporaryStorageError, *UNAVAILABLE)
CLOSE_FAILED: tuple[type[BaseException], ...] = (TimeoutError, *UNAVAILABLE)


async def connect(url: str, name: str = "postroom") -> asyncpg.Connection:
    """One connection of its own (the CLI, the LISTEN connection, migrations); ``name`` is
    its ``application_name`` (what ``pg_stat_activity`` shows)."""
    try:
        return await asyncpg.connect(
            url,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings={"application_name": name},
        )
    except UNAVAILABLE as exc:
        raise TemporaryStorageError(f"cannot connect to PostgreSQL: {exc}") from None


class Database:
    """The pools of one worker process."""

    def __init__(self, url: str, pool_size: int, sessions: int) -> None:
        self.url = url
        self._sizes = (pool_size, sessions)
        self._pool: asyncpg.Pool | None = None
        self._sessions: asyncpg.Pool | None = None

    def _make_pool(self, name: str, min_size: int, max_size: int, **extra: Any) -> asyncpg.Pool:
        return asyncpg.create_pool(
            self.url,
            min_size=min_size,
            max_size=max_size,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings={"application_name": name},
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
        except UNAVAILABLE as exc:
            await self.close()
            raise TemporaryStorageError(f"cannot connect to PostgreSQL: {exc}") from None

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


class Blocking:
    """A connection driven from synchronous code (the CLI) on a private event loop."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self.conn: asyncpg.Connection = self.run(connect(url, "postroom-cli"))
        except BaseException:
            self._loop.close()
            raise

    def run(self, coro: Awaitable[T]) -> T:
        return self._loop.run_until_complete(coro)

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(conn, *args)`` to completion; PostgreSQL away -> TemporaryStorageError."""
        try:
            return self.run(fn(self.conn, *args))
        except UNAVAILABLE as exc:
            raise TemporaryStorageError(f"PostgreSQL: {exc}") from None

    def close(self) -> None:
        if not self._loop.is_closed():
            try:
                self.run(self.conn.close(timeout=5))
            except CLOSE_FAILED:
                self.conn.terminate()
            self._loop.close()
