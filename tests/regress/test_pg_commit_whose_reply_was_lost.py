"""An intake commit whose reply never came back was answered 452 though it may have been made.

The connection of a shared commit broke while its statement was in flight (PostgreSQL crashed,
the network dropped it, a pooler restarted): every message of the batch got a 452, also when
the commit had been made, and its client sent it again: stored twice. Now the committer asks
PostgreSQL, on a new connection, whether the batch's rows are there (once the old backend is
gone) and answers accordingly.

A relay between the pool and a real PostgreSQL cuts the connection at the chosen moment: after
the commit (its reply is dropped), before the statement reaches the server, or while the
statement still runs there (held by a lock), leaving that backend alive."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from postroom.errors import TemporaryStorageError
from postroom.queue.envelope import new_queue_id
from postroom.storage.postgresql import queue
from postroom.storage.postgresql.queue import copy_uidl
from tests.pgnode import Node, migrate, nodes, run

READY = b"Z\x00\x00\x00\x05"  # ReadyForQuery: the server is done with the statement (committed)


class Relay:
    """A TCP relay to PostgreSQL. :meth:`arm` marks the connections open now: ``reply`` drops
    the server's answer to the next INSERT (sent after its commit) and closes both sides;
    ``request`` drops the next statement and closes both sides; ``client`` closes the client's
    side at once and leaves the server's open (its backend goes on)."""

    def __init__(self, url: str) -> None:
        self.target = urllib.parse.urlsplit(url)
        self.pairs: list[dict[str, object]] = []
        self.fired = asyncio.Event()
        self._server: asyncio.Server | None = None

    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return self.target._replace(netloc=f"postgres@127.0.0.1:{port}").geturl()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._pair, "127.0.0.1", 0)

    def refuse(self) -> None:
        """Take no new connections (PostgreSQL away)."""
        assert self._server is not None
        self._server.close()

    async def close(self) -> None:
        self.refuse()
        for pair in self.pairs:
            self._cut(pair, server_too=True)

    def arm(self, mode: str) -> None:
        for pair in self.pairs:
            pair["mode"] = mode
            if mode == "client":
                self._cut(pair, server_too=False)

    def _cut(self, pair: dict[str, object], server_too: bool) -> None:
        client, server = pair["client"], pair["server"]
        assert isinstance(client, asyncio.StreamWriter) and isinstance(server, asyncio.StreamWriter)
        client.transport.abort()
        if server_too:
            server.transport.abort()
        pair["mode"] = "cut"
        self.fired.set()

    async def _pair(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection(self.target.hostname, self.target.port)
        pair: dict[str, object] = {"client": c_writer, "server": s_writer, "mode": None}
        self.pairs.append(pair)
        await asyncio.gather(
            self._pipe(pair, c_reader, s_writer, upstream=True),
            self._pipe(pair, s_reader, c_writer, upstream=False),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        pair: dict[str, object],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: bool,
    ) -> None:
        held = b""
        while data := await reader.read(65536):
            if pair["mode"] == "cut":
                return
            if upstream and pair["mode"] == "request":
                self._cut(pair, server_too=True)
                return
            if not upstream and pair["mode"] == "reply":
                held += data
                done = held.find(b"INSERT 0 ")
                if done >= 0:  # the INSERT's reply: dropped once the commit is made
                    if READY in held[done:]:
                        self._cut(pair, server_too=True)
                        return
                    continue
                data, held = held, b""
            writer.write(data)
        with contextlib.suppress(OSError):
            writer.close()


@contextlib.asynccontextmanager
async def relayed_node(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[Node, Relay]]:
    await migrate(pg_url)
    relay = Relay(pg_url)
    await relay.start()
    try:
        async with nodes(relay.url(), tmp_path, count=1) as (node,):
            yield node, relay
    finally:
        await relay.close()


async def outcome(node: Node, queue_id: str) -> bool:
    """Whether the message got its 250."""
    try:
        await node.accept(["ann@a.test"], ["r@remote.test"], queue_id=queue_id)
    except TemporaryStorageError:
        return False
    return True


async def stored(pg_url: str, queue_id: str) -> tuple[int, int]:
    """The message's queue rows and mailbox copies."""
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM queue WHERE id = $1", queue_id)
        copies = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE uidl = $1", copy_uidl(queue_id, 0)
        )
        return int(rows), int(copies)
    finally:
        await conn.close()


def test_a_commit_whose_reply_was_lost_is_answered_250(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with relayed_node(pg_url, tmp_path) as (node, relay):
            queue_id = new_queue_id()
            relay.arm("reply")
            answered = await outcome(node, queue_id)
            assert relay.fired.is_set()  # the reply was lost indeed
            assert await stored(pg_url, queue_id) == (1, 1)
            assert answered, "a stored message was answered 452: its client sends it again"
            assert node.queue.lease_fresh(queue_id)  # its first attempt here may go on

    run(main())


def test_a_statement_that_never_arrived_is_answered_452(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with relayed_node(pg_url, tmp_path) as (node, relay):
            queue_id = new_queue_id()
            relay.arm("request")
            assert not await outcome(node, queue_id)
            assert relay.fired.is_set()
            assert await stored(pg_url, queue_id) == (0, 0)

    run(main())


def test_a_statement_still_running_when_its_connection_broke_never_commits_after_a_452(
    pg_url: str, tmp_path: Path
) -> None:
    """The client's side broke while the backend still ran the statement (here it waits for
    a lock): a look at once would find nothing, and the statement would commit after the
    452. It is ended first."""

    async def main() -> None:
        async with relayed_node(pg_url, tmp_path) as (node, relay):
            queue_id = new_queue_id()
            blocker = await asyncpg.connect(pg_url)
            watcher = await asyncpg.connect(pg_url)  # pg_stat_activity: one view a transaction
            try:
                lock = blocker.transaction()
                await lock.start()
                await blocker.execute(  # the copy's key, uncommitted: the intake waits for it
                    "INSERT INTO messages (mailbox, uidl, size, body) VALUES ($1, $2, 0, '')",
                    "ann@a.test",
                    copy_uidl(queue_id, 0),
                )
                task = asyncio.create_task(outcome(node, queue_id))
                waiting = (
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO queue%'"
                )
                for _ in range(500):
                    if await watcher.fetchval(waiting):
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the intake never waited for the lock")
                relay.arm("client")
                answered = await asyncio.wait_for(task, 30)
                await lock.rollback()  # the intake's backend, if it is still there, goes on
                await asyncio.sleep(0.5)
            finally:
                await blocker.close()
                await watcher.close()
            # Its backend was ended before the look (while it still waited): nothing stored.
            assert await stored(pg_url, queue_id) == (0, 0), "answered 452 yet stored"
            assert not answered

    run(main())


def test_a_stopping_server_does_not_wait_for_the_outcome(pg_url: str, tmp_path: Path) -> None:
    """While the outcome is asked for (PostgreSQL away), stopping ends the wait: a 452."""

    async def main() -> None:
        async with relayed_node(pg_url, tmp_path) as (node, relay):
            relay.arm("reply")
            task = asyncio.create_task(outcome(node, new_queue_id()))
            await asyncio.wait_for(relay.fired.wait(), 10)
            relay.refuse()  # no new connection gets through: the look waits
            await asyncio.sleep(0.5)
            assert not task.done()  # the session waits for the answer
            started = time.monotonic()
            await node.queue.close()
            assert time.monotonic() - started < 2
            assert not await asyncio.wait_for(task, 2)

    run(main())


def test_past_the_deadline_the_batch_is_refused(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL still away at the deadline: a 452 without knowing (the one case left)."""
    monkeypatch.setattr(queue, "SETTLE_WAIT", 1.0)

    async def main() -> None:
        async with relayed_node(pg_url, tmp_path) as (node, relay):
            relay.arm("reply")
            task = asyncio.create_task(outcome(node, new_queue_id()))
            await asyncio.wait_for(relay.fired.wait(), 10)
            relay.refuse()
            assert not await asyncio.wait_for(task, 5)

    run(main())
