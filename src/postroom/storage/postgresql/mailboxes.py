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
(message numbers refer to it); deletions and the seen flag are applied at QUIT in one
transaction on the same connection: if the connection (and so the lock) was lost meanwhile,
nothing is applied.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from asyncpg.pool import PoolConnectionProxy

from postroom.errors import PostroomError, TemporaryStorageError
from postroom.storage.postgresql import db
from postroom.storage.postgresql.db import Database

ACQUIRE_TIMEOUT = 5.0
READ_CHUNK = 1 << 18

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


@dataclass(slots=True)
class PgEntry:
    """One message of the session's listing."""

    id: int
    uid: str
    size: int
    flags: str
    deleted: bool = False
    retrieved: bool = False


class PgMaildrop:
    """One POP3 session's locked listing of a mailbox."""

    def __init__(self, database: Database, mailbox: str) -> None:
        self.database = database
        self.mailbox = mailbox
        self.entries: list[PgEntry] = []
        self._conn: PoolConnectionProxy | None = None

    async def open(self) -> None:
        """Lock and list; MailboxInUse if another session has the mailbox,
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
        self.entries = [PgEntry(r["id"], r["uidl"], r["size"], r["flags"]) for r in rows]

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
        if conn is not None:
            await self._release(conn)

    def _connection(self) -> PoolConnectionProxy:
        if self._conn is None:
            raise TemporaryStorageError("the maildrop is closed")
        return self._conn

    # -- the commands ----------------------------------------------------------------------

    def get(self, number: int) -> PgEntry | None:
        """The live (not deleted) message with this 1-based number."""
        if 1 <= number <= len(self.entries):
            entry = self.entries[number - 1]
            if not entry.deleted:
                return entry
        return None

    def stat(self) -> tuple[int, int]:
        live = [e.size for e in self.entries if not e.deleted]
        return len(live), sum(live)

    def listing(self, uids: bool) -> bytes:
        """The body of LIST or UIDL without an argument, ending with ``.\\r\\n``."""
        lines = [
            f"{i} {e.uid if uids else e.size}\r\n"
            for i, e in enumerate(self.entries, 1)
            if not e.deleted
        ]
        lines.append(".\r\n")
        return "".join(lines).encode()

    def reset(self) -> None:
        for e in self.entries:
            e.deleted = False

    async def read(self, entry: PgEntry) -> bytes:
        """The whole message (CRLF); FileNotFoundError if it was removed meanwhile."""
        try:
            body = await self._connection().fetchval(
                "SELECT body FROM messages WHERE id=$1", entry.id
            )
        except db.FAILED as exc:
            raise TemporaryStorageError(f"PostgreSQL: {exc}") from None
        if body is None:
            raise FileNotFoundError(entry.uid)
        return bytes(body)

    async def chunks(self, entry: PgEntry, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The message in slices of ``size`` octets (a large RETR, in bounded memory)."""
        conn = self._connection()
        for start in range(0, entry.size, size):
            try:
                piece = await conn.fetchval(
                    "SELECT substring(body FROM $2 FOR $3) FROM messages WHERE id=$1",
                    entry.id,
                    start + 1,  # SQL counts from 1
                    size,
                )
            except db.FAILED as exc:
                raise TemporaryStorageError(f"PostgreSQL: {exc}") from None
            if piece is None:
                raise FileNotFoundError(entry.uid)
            yield bytes(piece)

    async def update(self) -> int:
        """The UPDATE state (RFC 1939 §6) in one transaction: delete what was marked, flag
        what was read as seen. Returns how many deletions failed (all or none)."""
        deleted = [e.id for e in self.entries if e.deleted]
        seen = [e.id for e in self.entries if e.retrieved and not e.deleted and "S" not in e.flags]
        if not deleted and not seen:
            return 0
        if self._conn is None:
            return len(deleted)
        conn = self._conn
        try:
            async with conn.transaction():
                if deleted:
                    await conn.execute(
                        "DELETE FROM messages WHERE mailbox=$1 AND id = ANY($2::bigint[])",
                        self.mailbox,
                        deleted,
                    )
                if seen:
                    await conn.execute(
                        "UPDATE messages SET flags = flags || 'S'"
                        " WHERE mailbox=$1 AND id = ANY($2::bigint[])",
                        self.mailbox,
                        seen,
                    )
        except db.FAILED:
            return len(deleted)
        return 0
