"""Mailboxes on a real PostgreSQL: idempotent delivery, and the POP3 maildrop across nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from postroom.storage.postgresql import migrations
from postroom.storage.postgresql.db import Database
from postroom.storage.postgresql.mailboxes import MailboxInUse, PgMailboxes, PgMaildrop

MESSAGE = b"Subject: hi\r\n\r\nline one\r\n.dot line\r\n"


async def read(drop: PgMaildrop, number: int) -> bytes:
    """RETR as the POP3 server does it: at hand, or in pieces."""
    now = drop.read_now(number)
    if now is not None:
        return now
    return b"".join([piece async for piece in drop.chunks(number)])


def run(pg_url: str, body: Callable[[PgMailboxes, PgMailboxes], Awaitable[None]]) -> None:
    """Two nodes' worth of pools on one database: ``body(node_a, node_b)``."""

    async def main() -> None:
        conn = await asyncpg.connect(pg_url)
        await migrations.migrate(conn)
        await conn.close()
        a, b = Database(pg_url, 2, 4), Database(pg_url, 2, 4)
        await a.open()
        await b.open()
        try:
            await body(PgMailboxes(a), PgMailboxes(b))
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_delivery_is_idempotent_and_prepends_the_trace(pg_url: str) -> None:
    async def body(a: PgMailboxes, b: PgMailboxes) -> None:
        assert await a.deliver("Q1", "s@x.test", ["ann@a.test", "bob@a.test"], MESSAGE) == [
            None,
            None,
        ]
        # The same delivery again, as after a crash before it was recorded: nothing doubles.
        assert await b.deliver("Q1", "s@x.test", ["ann@a.test"], MESSAGE) == [None]
        drop = a.maildrop("ann@a.test")
        messages = await drop.open()
        try:
            assert [(m.uid, m.size) for m in messages] == [("Q1", len(MESSAGE) + 51)]
            data = await read(drop, 1)
            assert data == b"Return-Path: <s@x.test>\r\nDelivered-To: ann@a.test\r\n" + MESSAGE
        finally:
            await drop.close()

    run(pg_url, body)


def test_in_use_across_nodes_and_released_at_close(pg_url: str) -> None:
    async def body(a: PgMailboxes, b: PgMailboxes) -> None:
        await a.deliver("Q1", "", ["ann@a.test"], MESSAGE)
        first = a.maildrop("ann@a.test")
        await first.open()
        with pytest.raises(MailboxInUse):
            await b.maildrop("ann@a.test").open()
        with pytest.raises(MailboxInUse):
            await a.maildrop("ann@a.test").open()  # the same node, another session
        other = b.maildrop("bob@a.test")
        await other.open()  # another mailbox is free
        await other.close()
        await first.close()
        again = b.maildrop("ann@a.test")
        await again.open()
        await again.close()

    run(pg_url, body)


def test_dele_applied_at_quit_only_and_uidls_stable(pg_url: str) -> None:
    async def body(a: PgMailboxes, b: PgMailboxes) -> None:
        for i in range(3):
            await a.deliver(f"Q{i}", "", ["ann@a.test"], MESSAGE)
        drop = a.maildrop("ann@a.test")
        uids = [m.uid for m in await drop.open()]
        assert uids == ["Q0", "Q1", "Q2"]
        await drop.close()  # dropped without QUIT: nothing applied
        drop = b.maildrop("ann@a.test")
        assert [m.uid for m in await drop.open()] == uids
        assert await drop.update(deleted=[1, 2], seen=[3]) == 0
        await drop.close()
        drop = a.maildrop("ann@a.test")
        assert [(m.uid, m.flags) for m in await drop.open()] == [("Q2", "S")]
        await drop.close()

    run(pg_url, body)


def test_lock_dies_with_the_connection_and_its_quit_applies_nothing(pg_url: str) -> None:
    async def body(a: PgMailboxes, b: PgMailboxes) -> None:
        await a.deliver("Q1", "", ["ann@a.test"], MESSAGE)
        first = a.maildrop("ann@a.test")
        await first.open()
        killer = await asyncpg.connect(pg_url)
        killed = await killer.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks"
            " WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"
        )
        await killer.close()
        assert killed == 1
        second = b.maildrop("ann@a.test")
        for _ in range(100):  # the backend takes a moment to go
            try:
                messages = await second.open()
                break
            except MailboxInUse:
                await asyncio.sleep(0.02)
        assert len(messages) == 1
        assert await first.update(deleted=[1], seen=[]) == 1  # its lock is gone: not applied
        await first.close()
        await second.close()
        check = a.maildrop("ann@a.test")
        assert len(await check.open()) == 1
        await check.close()

    run(pg_url, body)


def test_messages_read_ahead_and_in_slices(pg_url: str) -> None:
    big = b"".join(b"line %07d of a long message\r\n" % i for i in range(40_000))

    async def body(a: PgMailboxes, b: PgMailboxes) -> None:
        for i in range(5):
            await a.deliver(f"Q{i}", "", ["ann@a.test"], MESSAGE + b"%d\r\n" % i)
        await a.deliver("Q9", "", ["ann@a.test"], big)
        drop = b.maildrop("ann@a.test")
        messages = await drop.open()
        assert drop.read_now(1) is None  # nothing read yet
        first = b"".join([p async for p in drop.chunks(1)])
        assert first.endswith(MESSAGE + b"0\r\n")
        for n in (2, 3, 4, 5):  # read ahead with the first: at hand now
            now = drop.read_now(n)
            assert now is not None and now.endswith(b"%d\r\n" % (n - 1))
        pieces = [p async for p in drop.chunks(6, 100_000)]
        whole = b"".join(pieces)
        assert len(pieces) > 1 and len(whole) == messages[5].size
        assert whole.endswith(big)
        await drop.close()

    run(pg_url, body)


def test_postgresql_restart_fails_deliveries_then_heals(pg_durable: object) -> None:
    from tests.pgserver import PgServer

    assert isinstance(pg_durable, PgServer)
    server = pg_durable
    url = server.new_database()

    async def body(a: PgMailboxes, b: PgMailboxes) -> None:
        assert await a.deliver("Q1", "", ["ann@a.test"], MESSAGE) == [None]
        server.stop("immediate")  # as a crash: recovery from the WAL at the next start
        failed = await a.deliver("Q2", "", ["ann@a.test"], MESSAGE)
        assert isinstance(failed[0], OSError)  # the caller defers and tries again
        server.start()
        for _ in range(200):  # the pool drops dead connections and makes new ones
            if await a.deliver("Q2", "", ["ann@a.test"], MESSAGE) == [None]:
                break
            await asyncio.sleep(0.05)
        drop = b.maildrop("ann@a.test")
        assert [m.uid for m in await drop.open()] == ["Q1", "Q2"]
        await drop.close()

    run(url, body)
