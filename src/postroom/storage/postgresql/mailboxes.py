"""Mailboxes in PostgreSQL: local delivery into them, and the POP3 maildrop on them.

One row per message copy in ``messages``: the owner's key, its UIDL, its size, its flags and
the body, with CRLF line ends (what RETR sends before dot-stuffing, RFC 1939 §3), so that LIST
sizes need no reading and RETR no conversion. Bodies are ``bytea`` stored uncompressed out of
line (``STORAGE EXTERNAL``), not large objects: a row and its body are one thing that a DELETE
removes, a transaction covers, pg_dump copies and a replica follows, with no orphans to clean
(a large object outlives its row unless something unlinks it, and pg_dump handles millions of
them slowly); a large body is read in slices without decompressing it from the start each time.

Most copies are made by the queue's intake, in the commit that accepts the message
(``queue.py``). :class:`PgMailboxes` makes those of a later attempt (a DSN queued by the CLI,
say): a copy's UIDL is ``QUEUEID.INDEX``, unique in its mailbox, and ``queue_copies`` records in
the same transaction that the copy was made, so an attempt repeated after a crash makes none
twice, even if the user fetched and deleted the first one meanwhile.

:class:`PgMaildrop` is one POP3 session's view (RFC 1939): at login it takes a session-level
advisory lock on a connection of its own, held until the session ends; PostgreSQL drops it
when that connection closes or dies, so a crashed node never locks a mailbox for good, and a
second session on any node gets ``[IN-USE]`` (RFC 2449 §8.1.1). The listing is read once
(message numbers refer to it; the session's marks are the caller's); deletions and the seen
flag are applied at QUIT in one transaction on the same connection: if the connection (and so
the lock) was lost meanwhile, nothing is applied. Small messages are read ahead, several in one
round trip, since clients mostly RETR in order. PostgreSQL being away is an OSError
(``ConnectionError``) to the POP3 server, which answers ``[SYS/TEMP]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from asyncpg.pool import PoolConnectionProxy

from postroom.errors import MailboxInUse, TemporaryStorageError
from postroom.queue.envelope import Envelope
from postroom.storage.interfaces import LocalCopy, MessageInfo
from postroom.storage.postgresql import db
from postroom.storage.postgresql.db import Database
from postroom.wire.framing import to_crlf

if TYPE_CHECKING:
    from postroom.storage.postgresql.queue import PgQueue

READ_CHUNK = 1 << 18
READ_AHEAD = 1 << 20

T = TypeVar("T")

# The body cannot be had (the queue's store) or the copies not stored: answered as unavailable.
_DELIVERY_FAILED: tuple[type[BaseException], ...] = (TemporaryStorageError, *db.FAILED)

# The copies not made yet: marked in queue_copies and stored, in one statement.
_DELIVER = """
WITH wanted AS (
    SELECT * FROM unnest($2::int[], $3::text[], $4::text[]) AS w(idx, mailbox, uidl)
), marked AS (
    INSERT INTO queue_copies (queue_id, idx) SELECT $1, idx FROM wanted
    ON CONFLICT DO NOTHING RETURNING idx
)
INSERT INTO messages (mailbox, uidl, size, body)
SELECT w.mailbox, w.uidl, octet_length($5::bytea), $5::bytea
FROM wanted w JOIN marked USING (idx)
ON CONFLICT (mailbox, uidl) DO NOTHING
"""


def unavailable(exc: BaseException) -> ConnectionError:
    """PostgreSQL away or failing, as the OSError the servers expect of a store."""
    return ConnectionError(f"PostgreSQL: {str(exc) or type(exc).__name__}")


def lock_key(mailbox: str) -> int:
    """The advisory lock of a mailbox: 64 bits of its key's SHA-256, as a signed bigint."""
    return int.from_bytes(hashlib.sha256(mailbox.encode()).digest()[:8], "big", signed=True)


class PgMailboxes:
    """Local delivery of a later attempt (:class:`~postroom.storage.interfaces.MailboxDelivery`)."""

    def __init__(self, database: Database, queue: PgQueue) -> None:
        self.database = database
        self.queue = queue

    async def deliver(
        self, envelope: Envelope, copies: Sequence[LocalCopy]
    ) -> list[OSError | None]:
        from postroom.storage.postgresql.queue import copy_uidl

        if not copies:
            return []
        try:
            body = to_crlf(await self.queue.body(envelope))
            async with self.database.connection() as conn:
                await conn.execute(
                    _DELIVER,
                    envelope.id,
                    [c.index for c in copies],
                    [c.mailbox for c in copies],
                    [copy_uidl(envelope.id, c.index) for c in copies],
                    body,
                )
        except _DELIVERY_FAILED as exc:
            return [unavailable(exc) for _ in copies]
        return [None for _ in copies]


class PgMaildrops:
    """Opens maildrops (:class:`~postroom.storage.interfaces.Maildrops`)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def maildrop(self, key: str) -> PgMaildrop:
        return PgMaildrop(self.database, key)


class PgMaildrop:
    """One POP3 session's locked snapshot of a mailbox; messages are numbered from 1."""

    def __init__(self, database: Database, mailbox: str) -> None:
        self.database = database
        self.mailbox = mailbox
        self.messages: list[MessageInfo] = []
        self._rows: list[tuple[int, str]] = []  # (row id, flags) of each message
        self._conn: PoolConnectionProxy | None = None
        self._ahead: dict[int, bytes] = {}  # bodies read ahead, by message number

    async def open(self) -> list[MessageInfo]:
        """Lock and list, oldest first; MailboxInUse if another session has the mailbox,
        ConnectionError if PostgreSQL cannot be reached (or no connection is free)."""
        try:
            conn = await self.database.sessions.acquire(timeout=db.ACQUIRE_TIMEOUT)
        except TimeoutError:  # (the admin reads why in the log; the user, "try again")
            pool = self.database.sessions
            most = pool.get_max_size()
            if pool.get_size() >= most and not pool.get_idle_size():
                why = f"all {most} POP3 connections of this worker are in use"
                why += " ([storage] max_pop3_sessions)"
            else:
                why = f"no connection within {db.ACQUIRE_TIMEOUT:.0f} s"
            raise ConnectionError(f"PostgreSQL: {why}") from None
        except db.FAILED as exc:
            raise unavailable(exc) from None
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
                raise unavailable(exc) from None
            raise
        self._conn = conn
        self.messages = [MessageInfo(r["size"], r["uidl"]) for r in rows]
        self._rows = [(r["id"], r["flags"]) for r in rows]
        return self.messages

    async def _release(self, conn: PoolConnectionProxy) -> None:
        # The pool's reset on release also runs pg_advisory_unlock_all(); a connection that
        # broke is discarded by the pool, and its lock went with it.
        try:
            await self.database.sessions.release(conn, timeout=db.ACQUIRE_TIMEOUT)
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
            raise ConnectionError("the maildrop is closed")
        return self._conn

    def read_now(self, number: int) -> bytes | None:
        """The message if it was read ahead (the next RETR of a client that fetches in
        order), else None: then :meth:`chunks`. The copy stays at hand (up to the next read
        ahead, so at most ``READ_AHEAD`` octets): a TOP of the message leaves it to the RETR
        that usually follows."""
        return self._ahead.get(number)

    async def chunks(self, number: int, size: int = READ_CHUNK) -> AsyncGenerator[bytes, None]:
        """The message in pieces of at most ``size`` octets. A small one is read together
        with the small ones after it (up to ``READ_AHEAD`` octets, one round trip): clients
        mostly RETR in order. FileNotFoundError if it was removed meanwhile."""
        message = self.messages[number - 1]
        if message.size <= size:
            body = self._ahead.get(number)
            if body is None:
                body = await self._read_ahead(number, size)
            yield body
            return
        conn, row_id = self._connection(), self._rows[number - 1][0]
        for start in range(0, message.size, size):
            piece = await self._query(
                conn.fetchval,
                "SELECT substring(body FROM $2 FOR $3) FROM messages WHERE id=$1",
                row_id,
                start + 1,  # SQL counts from 1
                size,
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
            wanted[self._rows[n - 1][0]] = n
            total += m.size
        rows = await self._query(
            self._connection().fetch,
            "SELECT id, body FROM messages WHERE id = ANY($1::bigint[])",
            list(wanted),
        )
        self._ahead.clear()
        for r in rows:
            self._ahead[wanted[r["id"]]] = bytes(r["body"])
        body = self._ahead.get(number)
        if body is None:
            raise FileNotFoundError(self.messages[number - 1].uid)
        return body

    @staticmethod
    async def _query(method: Callable[..., Awaitable[T]], *args: object) -> T:
        """``method(*args)``'s answer; ConnectionError when the session's connection broke
        (asyncpg may refuse at the call itself, before there is anything to await)."""
        try:
            return await method(*args)
        except db.FAILED as exc:
            raise unavailable(exc) from None

    async def update(self, deleted: Sequence[int], seen: Sequence[int]) -> int:
        """The UPDATE state (RFC 1939 §6) in one transaction: remove ``deleted``, flag
        ``seen`` as read. Returns how many removals failed (all or none): nothing is applied
        if the connection, and with it the lock, was lost during the session."""
        gone = [self._rows[n - 1][0] for n in deleted]
        read = [self._rows[n - 1][0] for n in seen if "S" not in self._rows[n - 1][1]]
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
