"""Mailboxes in PostgreSQL: local delivery into them, and the POP3 maildrop on them.

One row per message copy in ``messages``: the owner's key, its UIDL, its size, its flags and
the body, with CRLF line ends (what RETR sends before dot-stuffing, RFC 1939 §3), so that LIST
sizes need no reading and RETR no conversion. Bodies are ``bytea`` stored uncompressed out of
line (``STORAGE EXTERNAL``), not large objects: a row and its body are one thing that a DELETE
removes, a transaction covers, pg_dump copies and a replica follows, with no orphans to clean
(a large object outlives its row unless something unlinks it, and pg_dump handles millions of
them slowly); a large body is read in slices without decompressing it from the start each time.

Delivery is idempotent: a copy's UIDL is its queue id, unique in a mailbox, and a delivery that
is repeated after a crash (``ON CONFLICT DO NOTHING``) stores nothing twice. Every copy of one
message is inserted in one transaction, one commit.

:class:`PgMaildrop` is one POP3 session's view (RFC 1939): at login it takes a session-level
advisory lock on a connection of its own, held until the session ends; PostgreSQL drops it
when that connection closes or dies, so a crashed node never locks a mailbox for good, and a
second session on any node gets ``[IN-USE]`` (RFC 2449 §8.1.1). The listing is read once
(message numbers refer to it; the session's marks are the caller's); deletions and the seen
flag are applied at QUIT in one transaction on the same connection: if the connection (and so
the lock) was lost meanwhile, nothing is applied. Small messages are read ahead, several in one
round trip, since clients mostly RETR in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from asyncpg.pool import PoolConnectionProxy

from postroom.errors import PostroomError, TemporaryStorageError
from postroom.storage.postgresql import db
from postroom.storage.postgresql.db import Database

ACQUIRE_TIMEOUT = 5.0
READ_CHUNK = 1 << 18
READ_AHEAD = 1 << 20

T = TypeVar("T")

_INSERT = (
    "INSERT INTO messages (mailbox, uidl, size, body) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (mailbox, uidl) DO NOTHING"
)


class MailboxInUse(PostroomError):
    """Another session, on this node or another, holds the mailbox."""


def lock_key(mailbox: str) -> int:
    """The advisory lock of a mailbox: 64 bits of its key's SHA-256, as a signed bigint."""
    return int.from_bytes(hashlib.sha256(mailbox.encode()).digest()[:8], "big", signed=True)


class PgMailboxes:
    """Local delivery into ``messages``."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def deliver(
        self, queue_id: str, sender: str, recipients: Sequence[str], message: bytes
    ) -> list[OSError | None]:
        """Store a copy for each recipient key, with ``Return-Path`` (RFC 5321 §4.4) and
        ``Delivered-To`` prepended, in one transaction; for each: None once committed, or the
        error that kept all of them out (the caller tries again later)."""
        rows = []
        for key in recipients:
            body = f"Return-Path: <{sender}>\r\nDelivered-To: {key}\r\n".encode() + message
            rows.append((key, queue_id, len(body), body))
        try:
            async with self.database.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                await conn.executemany(_INSERT, rows)  # one transaction (asyncpg >= 0.22)
        except db.FAILED as exc:
            error = ConnectionError(f"PostgreSQL: {exc}")
            return [error for _ in recipients]
        return [None for _ in recipients]

    async def withdraw(self, queue_id: str, recipients: Sequence[str]) -> None:
        """Take back copies :meth:`deliver` stored (a message refused after all)."""
        async with self.database.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            await conn.execute(
                "DELETE FROM messages WHERE uidl=$1 AND mailbox = ANY($2::text[])",
                queue_id,
                list(recipients),
            )

    def maildrop(self, mailbox: str) -> PgMaildrop:
        return PgMaildrop(self.database, mailbox)


@dataclass(frozen=True, slots=True)
class PgMessage:
    """One message of a session's snapshot: what POP3 sees (``size``, ``uid``) and its row."""

    size: int  # octets RETR sends before dot-stuffing (CRLF)
    uid: str
    id: int
    flags: str


class PgMaildrop:
    """One POP3 session's locked snapshot of a mailbox; messages are numbered from 1."""

    def __init__(self, database: Database, mailbox: str) -> None:
        self.database = database
        self.mailbox = mailbox
        self.messages: list[PgMessage] = []
        self._conn: PoolConnectionProxy | None = None
        self._ahead: dict[int, bytes] = {}  # bodies read ahead, by message number

    async def open(self) -> list[PgMessage]:
        """Lock and list, oldest first; MailboxInUse if another session has the mailbox,
        TemporaryStorageError if PostgreSQL cannot be reached (or no connection is free)."""
        try:
            conn = await self.database.sessions.acquire(timeout=ACQUIRE_TIMEOUT)
        except db.FAILED as exc:
            raise TemporaryStorageError(f"PostgreSQL: {exc}") from None
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(self.mailbox)):
                raise MailboxInUse(self.mailbox)
            rows = await conn.fetch(
                "SELECT id, uidl, size, flags FROM messages WHERE mailbox=$1 ORDER BY id",
                self.mailbox,
            )
        except BaseException as exc:
            await self._release(conn)
            if isinstance(exc, db.FAILED):
                raise TemporaryStorageError(f"PostgreSQL: {exc}") from None
            raise
        self._conn = conn
        self.messages = [PgMessage(r["size"], r["uidl"], r["id"], r["flags"]) for r in rows]
        return self.messages

    async def _release(self, conn: PoolConnectionProxy) -> None:
        # The pool's reset on release also runs pg_advisory_unlock_all(); a connection that
        # broke is discarded by the pool, and its lock went with it.
        try:
            await self.database.sessions.release(conn, timeout=ACQUIRE_TIMEOUT)
        except db.FAILED:
            conn.terminate()

    async def close(self) -> None:
        """End the session: unlock (nothing is applied: that is :meth:`update`)."""
        conn, self._conn = self._conn, None
        self._ahead.clear()
        if conn is not None:
            await self._release(conn)

    def _connection(self) -> PoolConnectionProxy:
        if self._conn is None:
            raise TemporaryStorageError("the maildrop is closed")
        return self._conn

    def read_now(self, number: int) -> bytes | None:
        """The message if it was read ahead (the next RETR of a client that fetches in
        order), else None: then :meth:`chunks`."""
        return self._ahead.pop(number, None)

    async def chunks(self, number: int, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The message in pieces of at most ``size`` octets. A small one is read together
        with the small ones after it (up to ``READ_AHEAD`` octets, one round trip): clients
        mostly RETR in order. FileNotFoundError if it was removed meanwhile."""
        message = self.messages[number - 1]
        if message.size <= size:
            body = self._ahead.pop(number, None)
            if body is None:
                body = await self._read_ahead(number, size)
            yield body
            return
        conn = self._connection()
        for start in range(0, message.size, size):
            piece = await self._query(
                conn.fetchval(
                    "SELECT substring(body FROM $2 FOR $3) FROM messages WHERE id=$1",
                    message.id,
                    start + 1,  # SQL counts from 1
                    size,
                )
            )
            if piece is None:
                raise FileNotFoundError(message.uid)
            yield bytes(piece)

    async def _read_ahead(self, number: int, size: int) -> bytes:
        wanted: dict[int, int] = {}  # row id -> message number
        total = 0
        for n in range(number, len(self.messages) + 1):
            m = self.messages[n - 1]
            if n != number and (m.size > size or total + m.size > READ_AHEAD):
                break
            wanted[m.id] = n
            total += m.size
        rows = await self._query(
            self._connection().fetch(
                "SELECT id, body FROM messages WHERE id = ANY($1::bigint[])", list(wanted)
            )
        )
        self._ahead.clear()
        for r in rows:
            self._ahead[wanted[r["id"]]] = bytes(r["body"])
        body = self._ahead.pop(number, None)
        if body is None:
            raise FileNotFoundError(self.messages[number - 1].uid)
        return body

    @staticmethod
    async def _query(call: Awaitable[T]) -> T:
        try:
            return await call
        except db.FAILED as exc:
            raise TemporaryStorageError(f"PostgreSQL: {exc}") from None

    async def update(self, deleted: Sequence[int], seen: Sequence[int]) -> int:
        """The UPDATE state (RFC 1939 §6) in one transaction: remove ``deleted``, flag
        ``seen`` as read. Returns how many removals failed (all or none): nothing is applied
        if the connection, and with it the lock, was lost during the session."""
        gone = [self.messages[n - 1].id for n in deleted]
        read = [self.messages[n - 1].id for n in seen if "S" not in self.messages[n - 1].flags]
        if not gone and not read:
            return 0
        if self._conn is None:
            return len(gone)
        conn = self._conn
        try:
            async with conn.transaction():
                if gone:
                    await conn.execute(
                        "DELETE FROM messages WHERE mailbox=$1 AND id = ANY($2::bigint[])",
                        self.mailbox,
                        gone,
                    )
                if read:
                    await conn.execute(
                        "UPDATE messages SET flags = flags || 'S'"
                        " WHERE mailbox=$1 AND id = ANY($2::bigint[])",
                        self.mailbox,
                        read,
                    )
        except db.FAILED:
            return len(gone)
        return 0
