"""A node's PostgreSQL stores in one test process: pools, queue, mailboxes, maildrops.

Several of these on one database stand for several nodes (each has its own pools and its own
lease owner name), without starting servers: for the unit tests of ``storage/postgresql/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from postroom.queue.envelope import Envelope, Recipient, new_queue_id
from postroom.storage.interfaces import LocalCopy
from postroom.storage.postgresql import migrations
from postroom.storage.postgresql.db import Database
from postroom.storage.postgresql.mailboxes import PgMailboxes, PgMaildrop, PgMaildrops
from postroom.storage.postgresql.queue import PgQueue


async def until(check: Callable[[], bool], timeout: float = 1.0) -> float:
    """Seconds until ``check()`` holds, the event loop running meanwhile; fails after
    ``timeout`` (by default a second: what a change takes to reach every node)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "not seen in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


@dataclass
class Node:
    database: Database
    queue: PgQueue
    mailboxes: PgMailboxes
    maildrops: PgMaildrops

    def maildrop(self, key: str) -> PgMaildrop:
        return self.maildrops.maildrop(key)

    async def accept(
        self,
        local: Sequence[str] = (),
        remote: Sequence[str] = (),
        message: bytes = b"Subject: hi\r\n\r\nbody\r\n",
        sender: str = "s@x.test",
        queue_id: str | None = None,
        next_attempt: float = 0.0,
    ) -> Envelope:
        """A message accepted as the runner hands it over: local copies made in the commit,
        remote recipients' first attempt counted (``next_attempt``)."""
        envelope = Envelope(
            queue_id or new_queue_id(),
            sender,
            [Recipient(r) for r in [*local, *remote]],
            created=1.0,
            attempts=1 if remote else 0,
            next_attempt=next_attempt,
        )
        draft = self.queue.draft(envelope.id, sender)
        draft.write(message)
        copies = [LocalCopy(i, key) for i, key in enumerate(local)]
        errors = await self.queue.accept(envelope, draft, copies)
        assert errors == [None] * len(copies)
        for copy in copies:
            envelope.recipients[copy.index].status = "delivered"
        return envelope


async def migrate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def nodes(
    url: str, tmp_path: Path, count: int = 2, lease: float = 60.0
) -> AsyncIterator[list[Node]]:
    """``count`` nodes on the database at ``url`` (migrated first)."""
    await migrate(url)
    made: list[Node] = []
    try:
        for i in range(count):
            database = Database(url, 4, 4)
            await database.open()
            queue = PgQueue(url, database, tmp_path / f"node{i}", lease)
            made.append(Node(database, queue, PgMailboxes(database, queue), PgMaildrops(database)))
        yield made
    finally:
        for node in made:
            await node.queue.close()
            await node.database.close()


async def read(drop: PgMaildrop, number: int) -> bytes:
    """RETR as the POP3 server does it: at hand, or in pieces."""
    now = drop.read_now(number)
    if now is not None:
        return now
    return b"".join([piece async for piece in drop.chunks(number)])


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]
