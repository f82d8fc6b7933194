"""Mailboxes on a real PostgreSQL: idempotent delivery, and the POP3 maildrop across nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from postroom.storage.postgresql import migrations
from postroom.storage.postgresql.db import Database
from postroom.storage.postgresql.mailboxes import MailboxInUse, PgMailboxes

MESSAGE = b"Subject: hi\r\n\r\nline one\r\n.dot line\r\n"


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
        await drop.open()
        try:
            assert drop.stat() == (1, len(MESSAGE) + 51)
            data = await drop.read(drop.entries[0])
            assert data == b"Return-Path: <s@x.test>\r\nDelivered-To: ann@a.test\r\n" + MESSAGE
            assert drop.entries[0].uid == "Q1"
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
        await drop.open()
        uids = [e.uid for e in drop.entries]
        assert uids == ["Q0", "Q1", "Q2"]
        assert drop.listing(uids=True) == b"1 Q0\r\n2 Q1\r\n3 Q2\r\n.\r\n"
        drop.entries[0].deleted = True
        drop.entries[2].retrieved = True
        await drop.close()  # dropped without QUIT: nothing applied
        drop = b.maildrop("ann@a.test")
        await drop.open()
        assert [e.uid for e in drop.entries] == uids
        drop.entries[0].deleted = True
        drop.entries[1].deleted = True
        drop.entries[2].retrieved = True
        assert await drop.update() == 0
        await drop.close()
        drop = a.maildrop("ann@a.test")
        await drop.open()
        assert [(e.uid, e.flags) for e in drop.entries] == [("Q2", "S")]
        await drop.close()

    run(pg_url, body)


def test_lock_dies_with_the_connection_and_its_quit_applies_nothing(pg_url: str) -> None:
    async def body(a: PgMailboxes, b: PgMailboxes) -> None:
        await a.deliver("Q1", "", ["ann@a.test"], MESSAGE)
        first = a.maildrop("ann@a.test")
        await first.open()
        first.entries[0].deleted = True
        killer = await asyncpg.connect(pg_url)
        await killer.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"
        )
        await killer.close()
        second = b.maildrop("ann@a.test")
        for _ in range(100):  # the backend takes a moment to go
            try:
                await second.open()
                break
            except MailboxInUse:
                await asyncio.sleep(0.02)
        assert len(second.entries) == 1
        assert await first.update() == 1  # its lock is gone: its QUIT must not apply
        await first.close()
        await second.close()
        check = a.maildrop("ann@a.test")
        await check.open()
        assert len(check.entries) == 1
        await check.close()

    run(pg_url, body)


def test_large_message_read_in_slices(pg_url: str) -> None:
    big = b"".join(b"line %07d of a long message\r\n" % i for i in range(40_000))

    async def body(a: PgMailboxes, b: PgMailboxes) -> None:
        await a.deliver("Q1", "", ["ann@a.test"], big)
        drop = b.maildrop("ann@a.test")
        await drop.open()
        entry = drop.entries[0]
        whole = await drop.read(entry)
        pieces = [p async for p in drop.chunks(entry, 100_000)]
        assert len(pieces) > 1 and b"".join(pieces) == whole and len(whole) == entry.size
        await drop.close()

    run(pg_url, body)
