"""Mailboxes on a real PostgreSQL: copies made at intake and by later attempts, exactly once;
the POP3 maildrop across nodes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from postroom.errors import MailboxInUse
from postroom.storage.interfaces import LocalCopy
from postroom.storage.postgresql import db
from tests.pgnode import nodes, read, run, until

MESSAGE = b"Subject: hi\r\n\r\nline one\r\n.dot line\r\n"


def test_intake_copies_are_the_stored_message_with_crlf(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            env = await a.accept(["ann@a.test", "bob@a.test"], message=MESSAGE)
            drop = b.maildrop("ann@a.test")
            messages = await drop.open()
            try:
                expected = b"Return-Path: <s@x.test>\r\n" + MESSAGE
                assert [(m.uid, m.size) for m in messages] == [(f"{env.id}.0", len(expected))]
                assert await read(drop, 1) == expected
            finally:
                await drop.close()
            drop = a.maildrop("bob@a.test")
            assert [m.uid for m in await drop.open()] == [f"{env.id}.1"]
            await drop.close()
            # Nothing was left in the queue: every recipient was done in the commit.
            assert a.queue.entries() == []

    run(main())


def test_a_later_attempt_makes_each_copy_once(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            env = await a.accept(remote=["r@remote.test"], next_attempt=0)
            await a.queue.record(env, [])
            (claimed,) = await b.queue.claim(1e12, 10)
            copies = [LocalCopy(0, "ann@a.test")]
            assert await b.mailboxes.deliver(claimed, copies) == [None]
            drop = a.maildrop("ann@a.test")
            assert len(await drop.open()) == 1
            # Fetched and deleted before the attempt was recorded; then the node died and the
            # attempt runs again elsewhere: the copy is not made a second time.
            assert await drop.update(deleted=[1], seen=[]) == 0
            await drop.close()
            assert await a.mailboxes.deliver(claimed, copies) == [None]
            drop = a.maildrop("ann@a.test")
            assert await drop.open() == []
            await drop.close()

    run(main())


def test_in_use_across_nodes_and_released_at_close(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            await a.accept(["ann@a.test"])
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

    run(main())


def test_dele_applied_at_quit_only_and_uidls_stable(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            for _ in range(3):
                await a.accept(["ann@a.test"])
            drop = a.maildrop("ann@a.test")
            uids = [m.uid for m in await drop.open()]
            assert len(set(uids)) == 3
            await drop.close()  # dropped without QUIT: nothing applied
            drop = b.maildrop("ann@a.test")
            assert [m.uid for m in await drop.open()] == uids
            assert await drop.update(deleted=[1, 2], seen=[3]) == 0
            await drop.close()
            drop = a.maildrop("ann@a.test")
            assert [m.uid for m in await drop.open()] == uids[2:]
            assert drop._rows[0][1] == "S"
            await drop.close()

    run(main())


def test_lock_dies_with_the_connection_and_its_quit_applies_nothing(
    pg_url: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            await a.accept(["ann@a.test"])
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
            assert await first.update(deleted=[1], seen=[]) == 1  # its lock is gone
            await first.close()
            await second.close()
            check = a.maildrop("ann@a.test")
            assert len(await check.open()) == 1
            await check.close()

    run(main())


def test_a_read_after_the_connection_broke_is_a_connection_error(
    pg_url: str, tmp_path: Path
) -> None:
    """asyncpg refuses a call on a connection it has let go at the call itself: that too is
    the storage being away (the POP3 server answers [SYS/TEMP] and keeps the session)."""

    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, _):
            for i in range(2):
                await a.accept(["ann@a.test"], message=MESSAGE + b"x" * 300 * i)
            drop = a.maildrop("ann@a.test")
            await drop.open()
            killer = await asyncpg.connect(pg_url)
            await killer.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'postroom-pop3'"
            )
            await killer.close()
            await asyncio.sleep(0.5)  # asyncpg sees the connection close and lets it go
            for number, size in ((1, 65536), (2, 100)):  # read ahead; in slices
                with pytest.raises(ConnectionError):
                    await anext(drop.chunks(number, size))
            await drop.close()

    run(main())


def test_messages_read_ahead_and_in_slices(pg_url: str, tmp_path: Path) -> None:
    big = b"".join(b"line %07d of a long message\r\n" % i for i in range(40_000))

    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            for i in range(5):
                await a.accept(["ann@a.test"], message=MESSAGE + b"%d\r\n" % i)
            await a.accept(["ann@a.test"], message=big)  # spilled to a file while received
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
            assert list((tmp_path / "node0").iterdir()) == []  # the spill file is gone

    run(main())


def test_postgresql_restart_fails_intake_then_heals(pg_durable: object, tmp_path: Path) -> None:
    from postroom.errors import StorageUnavailable, TemporaryStorageError
    from tests.pgserver import PgServer

    assert isinstance(pg_durable, PgServer)
    server = pg_durable
    url = server.new_database()

    async def main() -> None:
        async with nodes(url, tmp_path) as (a, b):
            await a.accept(["ann@a.test"])
            assert a.database.pool.get_idle_size() > 0  # a connection for the crash to break
            server.stop("immediate")  # as a crash: recovery from the WAL at the next start
            # Until the pool has seen its connections close, as a running server's loop does
            # at once: a statement sent on one not yet seen closed might have committed, and
            # waits for PostgreSQL to be back (test_pg_commit_whose_reply_was_lost.py).
            await until(lambda: a.database.pool.get_idle_size() == 0, timeout=5)
            with pytest.raises(StorageUnavailable):  # the client gets 452, sends again
                await a.accept(["ann@a.test"])
            server.start()
            for _ in range(200):  # the pool drops dead connections and makes new ones
                try:
                    await a.accept(["ann@a.test"])
                    break
                except TemporaryStorageError:
                    await asyncio.sleep(0.05)
            drop = b.maildrop("ann@a.test")
            assert len(await drop.open()) == 2
            await drop.close()

    run(main())


def test_top_leaves_the_read_ahead_to_the_retr_that_follows(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: TOP took the message out of the read-ahead (read_now popped it), so the RETR
    # after it read the message again and, with it, up to 1 MiB of the ones after it (cleared
    # and read anew): a client that does TOP n, RETR n for each message read ~1 MiB per message.
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, _b):
            for i in range(4):
                await a.accept(["ann@a.test"], message=MESSAGE + b"%d\r\n" % i)
            drop = a.maildrop("ann@a.test")
            await drop.open()
            reads = 0
            query = drop._query

            async def counted(method, *args):  # type: ignore[no-untyped-def]
                nonlocal reads
                reads += 1
                return await query(method, *args)

            monkeypatch.setattr(drop, "_query", counted)
            for n in (1, 2, 3, 4):
                top = drop.read_now(n) if n > 1 else None  # TOP n (1: not read yet)
                retr = await read(drop, n)  # RETR n
                assert retr.endswith(MESSAGE + b"%d\r\n" % (n - 1))
                assert top is None or top == retr
            assert reads == 1  # one round trip read all four, TOPs or not
            await drop.close()

    run(main())


def test_no_free_session_connection_says_why(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past max_pop3_sessions a login waits, then gets "try again"; the admin's log line
    said "PostgreSQL: " and nothing more (the time-out's text is empty, scaleacct probe)."""
    from postroom.storage.postgresql import db

    monkeypatch.setattr(db, "ACQUIRE_TIMEOUT", 0.3)

    async def main() -> None:
        async with nodes(pg_url, tmp_path, count=1) as (a,):
            drops = [a.maildrop(f"u{n}@a.test") for n in range(4)]  # the node's 4 sessions
            for drop in drops:
                await drop.open()
            with pytest.raises(ConnectionError, match=r"all 4 POP3 connections .* in use"):
                await a.maildrop("u5@a.test").open()
            for drop in drops:
                await drop.close()

    run(main())


def test_the_lock_of_a_node_that_vanished_goes_in_minutes(pg_url: str) -> None:
    """A POP3 session's [IN-USE] lock is held by its connection: PostgreSQL dropped it when a
    node that vanished (power lost, cut off: no FIN ever comes) was found dead by the
    kernel's keepalive, after two hours. Every connection asks for probes after a minute
    idle, so a dead node's locks go within two (pg probe)."""
    show = "SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_count')"

    async def main() -> None:
        own = await db.connect(pg_url)
        assert tuple(await own.fetchrow(show)) == ("60", "6")
        await own.close()
        pooled = db.Database(pg_url, 2, 2)
        await pooled.open()
        async with pooled.connection() as conn:
            assert tuple(await conn.fetchrow(show)) == ("60", "6")
        await pooled.close()
        # What the url sets is its own (recheck probe: ours replaced it).
        joined = "&" if "?" in pg_url else "?"
        mine = await db.connect(f"{pg_url}{joined}tcp_keepalives_idle=30&application_name=x")
        assert tuple(await mine.fetchrow(show)) == ("30", "6")
        assert await mine.fetchval("SELECT current_setting('application_name')") == "x"
        await mine.close()

    run(main())
