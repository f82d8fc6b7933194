"""The queue on a real PostgreSQL: shared commits, claims under leases across nodes, take-over
after a lease runs out, NOTIFY, per-destination slots across nodes, the CLI's view; and the
DKIM keys every node shares."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from postroom.auth.keys import DkimKey, KeyRing
from postroom.errors import LeaseLost, QueueError
from postroom.queue.envelope import Attempt
from postroom.storage.postgresql import db
from postroom.storage.postgresql.keys import KeysChanged, PgKeyStore
from postroom.storage.postgresql.slots import PgSlots
from tests.pgnode import migrate, nodes, run

FAR = 1e12  # "now" far ahead: everything is due


def count_batches(node: Any) -> list[int]:
    """The size of each shared commit ``node`` writes from now on."""
    committer = node.queue.committer
    assert committer is not None
    batches: list[int] = []
    insert = committer._insert

    async def counting(batch: list) -> None:  # type: ignore[type-arg]
        batches.append(len(batch))
        await insert(batch)

    committer._insert = counting
    return batches


def test_concurrent_intake_shares_commits(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path, count=1) as (a,):
            batches = count_batches(a)
            await asyncio.gather(*(a.accept(["ann@a.test"]) for _ in range(60)))
            assert sum(batches) == 60
            assert len(batches) < 20, batches  # many messages per commit, not one each
            drop = a.maildrop("ann@a.test")
            assert len(await drop.open()) == 60
            await drop.close()

    run(main())


def test_claims_on_two_nodes_never_take_the_same_message(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            ids = set()
            for _ in range(40):
                env = await a.accept(remote=["r@remote.test"])
                await a.queue.record(env, [])  # deferred, due at once, no lease
                ids.add(env.id)
            taken: list[list[str]] = [[], []]

            async def claimer(node_index: int) -> None:
                node = (a, b)[node_index]
                while got := await node.queue.claim(FAR, 3):
                    taken[node_index] += [e.id for e in got]
                    await asyncio.sleep(0)

            await asyncio.gather(claimer(0), claimer(1))
            assert sorted(taken[0] + taken[1]) == sorted(ids)  # each once
            assert taken[0] and taken[1]

    run(main())


def test_a_lease_keeps_others_off_until_it_runs_out(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path, lease=1.0) as (a, b):
            env = await a.accept(remote=["r@remote.test"])  # A makes its first attempt
            assert await b.queue.claim(FAR, 10) == []  # held by A's lease
            await asyncio.sleep(1.3)  # A stalls (or died): its lease runs out
            (taken,) = await b.queue.claim(FAR, 10)
            assert taken.id == env.id
            with pytest.raises(LeaseLost):  # A may not dial any more
                await a.queue.begin_attempt(env)
            await a.queue.record(env, [Attempt(2.0, ["r@remote.test"], None, None, "x")])
            # Nor end it: its stale attempt's "all done" removed the message B now held.
            await a.queue.finish(env, [])
            assert [e.id for e in a.queue.entries()] == [env.id]
            taken.recipients[0].status = "delivered"
            await b.queue.finish(taken, [])
            assert a.queue.entries() == []

    run(main())


def test_a_running_node_renews_its_leases(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path, lease=1.0) as (a, b):
            a.queue.start()
            env = await a.accept(remote=["r@remote.test"])
            await asyncio.sleep(2.0)  # two leases long: renewed meanwhile
            assert await b.queue.claim(FAR, 10) == []
            env.attempts, env.next_attempt = 2, 5.0
            await a.queue.begin_attempt(env)  # still A's
            await a.queue.close()  # a node that stops hands its messages back at once
            (taken,) = await b.queue.claim(FAR, 10)
            assert taken.id == env.id and taken.attempts == 2 and taken.next_attempt == 5.0

    run(main())


def test_a_delivery_may_finish_only_under_a_lease_confirmed_within_half_a_lease(
    pg_url: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path, lease=1.0) as (a, b):
            a.queue.start()
            mine = await a.accept(remote=["r@remote.test"])  # leased by the intake's commit
            taken = await a.accept(remote=["r@remote.test"])
            assert a.queue.lease_fresh(mine.id) and a.queue.lease_fresh(taken.id)
            assert not b.queue.lease_fresh(mine.id)  # never B's
            async with a.database.pool.acquire() as conn:  # another node steals one
                await conn.execute(
                    "UPDATE queue SET lease_owner = 'other', lease_until = postroom_clock() + 60"
                    " WHERE id = $1",
                    taken.id,
                )
            await asyncio.sleep(1.5)  # three renewals: the one still held stays fresh
            assert a.queue.lease_fresh(mine.id)
            assert not a.queue.lease_fresh(taken.id)
            # ...because a renewal no longer named it, not only because time passed:
            assert taken.id not in a.queue._confirmed
            await a.queue.record(mine, [])
            assert not a.queue.lease_fresh(mine.id)  # released with the record

    run(main())


def test_a_lease_the_fence_found_stale_is_no_longer_renewed(pg_url: str, tmp_path: Path) -> None:
    # A worker that could not reach the database for half a lease drops its delivery before
    # the final dot; it used to renew that row's lease for as long as it ran (its renewal
    # took every row it owned), so no node ever tried the message again.
    async def main() -> None:
        async with nodes(pg_url, tmp_path, lease=1.0) as (a, b):
            a.queue.start()
            held = await a.accept(remote=["r@remote.test"])
            a.queue._confirmed[held.id] -= 1.0  # as if the database had been away a while
            assert not a.queue.lease_fresh(held.id)
            await asyncio.sleep(1.5)  # renewals go on meanwhile, for the rest of A's rows
            (taken,) = await b.queue.claim(FAR, 10)
            assert taken.id == held.id

    run(main())


def test_state_and_history_survive_in_the_shared_row(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            env = await a.accept(
                ["ann@a.test"], remote=["r@remote.test"], message=b"Subject: s\r\n\r\nx\r\n"
            )
            env.recipients[1].status, env.recipients[1].last_error = "deferred", "451 later"
            env.next_attempt = 100.0
            await a.queue.record(env, [Attempt(2.0, ["r@remote.test"], "mx", "1.2.3.4", "451")])
            assert await b.queue.claim(99.0, 10) == []  # not due yet
            (taken,) = await b.queue.claim(100.0, 10)
            assert [r.status for r in taken.recipients] == ["delivered", "deferred"]
            assert taken.history[0].host == "mx"
            assert await b.queue.body(taken) == b"Return-Path: <s@x.test>\nSubject: s\n\nx\n"
            shown = b.queue.load(env.id)
            assert shown.recipients[1].last_error == "451 later"
            assert b.queue.head(shown, 15) == b"Return-Path: <s"
            with pytest.raises(QueueError):
                b.queue.load("NOSUCHID")

    run(main())


def test_a_node_that_dies_after_intake_leaves_no_copy_to_make_again(
    pg_url: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path, lease=1.0) as (a, b):
            await a.accept(["ann@a.test"], remote=["r@remote.test"])
            # A dies before recording its first attempt; B takes the message over.
            await asyncio.sleep(1.2)
            (taken,) = await b.queue.claim(FAR, 10)
            assert taken.recipients[0].status == "delivered"  # made in the intake commit

    run(main())


def test_flush_and_delete_reach_every_node(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            watcher = db.Watcher(pg_url, [b.queue])
            await watcher.start()
            deleted: list[str] = []
            b.queue.on_deleted = deleted.append
            try:
                env = await a.accept(remote=["r@remote.test"], next_attempt=time.time() + 3600)
                await a.queue.record(env, [])
                await b.queue.claim(time.time(), 10)  # nothing due: it learns when next is
                started = time.monotonic()
                waiting = asyncio.ensure_future(b.queue.wait(30))
                await asyncio.sleep(0.1)
                assert await asyncio.to_thread(a.queue.flush) == 1  # as the CLI does
                await asyncio.wait_for(waiting, 5)
                assert time.monotonic() - started < 5  # woken, not timed out
                (taken,) = await b.queue.claim(time.time(), 10)
                await a.queue.delete(env.id)
                for _ in range(100):
                    if deleted:
                        break
                    await asyncio.sleep(0.02)
                assert deleted == [env.id]
                with pytest.raises(LeaseLost):
                    await b.queue.begin_attempt(taken)
                with pytest.raises(QueueError):
                    await a.queue.delete(env.id)
            finally:
                await watcher.close()

    run(main())


def test_a_flush_during_an_attempt_makes_the_message_due_when_it_ends(
    pg_url: str, tmp_path: Path
) -> None:
    """A re-probe: on PostgreSQL a ``queue flush`` during an attempt was lost, the attempt's
    record setting next_attempt to the retry interval's over the flush's."""

    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, _b):
            env = await a.accept(remote=["r@remote.test"], next_attempt=time.time() + 3600)
            await a.queue.record(env, [])
            (taken,) = await a.queue.claim(FAR, 10)  # its attempt runs
            a.queue.notified("flush 1")  # what the flush's NOTIFY tells each node
            taken.next_attempt = time.time() + 3600
            await a.queue.record(taken, [])
            (again,) = await a.queue.claim(time.time() + 1, 10)
            assert again.id == env.id
            again.next_attempt = time.time() + 3600
            await a.queue.record(again, [])  # once: the next record keeps its schedule
            assert await a.queue.claim(time.time() + 1, 10) == []

    run(main())


def test_add_waiting_queues_a_message_due_now(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            qid = await asyncio.to_thread(
                a.queue.add_waiting, "", ["rua@remote.test"], b"Subject: r\r\n\r\nx\r\n"
            )
            (taken,) = await b.queue.claim(time.time(), 10)
            assert taken.id == qid and taken.sender == ""
            assert await b.queue.body(taken) == b"Return-Path: <>\nSubject: r\n\nx\n"

    run(main())


async def _through(slots: PgSlots) -> None:
    """Take a slot of remote.test and give it back."""
    async with slots.slot("remote.test", 1):
        pass


def test_destination_slots_hold_across_nodes(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            slots = [
                PgSlots(a.database, a.queue.node, 60.0, a.queue.held_slots),
                PgSlots(b.database, b.queue.node, 60.0, b.queue.held_slots),
            ]
            running = 0
            most = 0

            async def deliver(i: int) -> None:
                nonlocal running, most
                async with slots[i % 2].slot("remote.test", 2):
                    running += 1
                    most = max(most, running)
                    await asyncio.sleep(0.05)
                    running -= 1

            await asyncio.gather(*(deliver(i) for i in range(8)))
            assert most == 2

    run(main())


def test_a_reload_reaches_a_delivery_waiting_for_a_row(pg_url: str, tmp_path: Path) -> None:
    """A re-probe: a delivery waiting for a destination's row kept the limit it came with."""

    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            mine = PgSlots(a.database, a.queue.node, 60.0, a.queue.held_slots)
            theirs = PgSlots(b.database, b.queue.node, 60.0, b.queue.held_slots)
            async with mine.slot("remote.test", 1):
                waiting = asyncio.ensure_future(_through(theirs))
                await asyncio.sleep(0.3)
                assert not waiting.done()
                theirs.relimit(2)
                await asyncio.wait_for(waiting, 3)  # row 1, while row 0 is still held

    run(main())


def test_a_lowered_limit_counts_the_slots_taken_under_the_old_one(
    pg_url: str, tmp_path: Path
) -> None:
    """A re-probe: after a reload lowered the limit, a node took a free low-numbered slot
    while another node's delivery still held a slot numbered past the new limit."""

    async def main() -> None:
        async with nodes(pg_url, tmp_path) as (a, b):
            mine = PgSlots(a.database, a.queue.node, 60.0, a.queue.held_slots)
            theirs = PgSlots(b.database, b.queue.node, 60.0, b.queue.held_slots)
            first = mine.slot("remote.test", 3)
            await first.__aenter__()
            second = mine.slot("remote.test", 3)
            await second.__aenter__()
            assert a.queue.held_slots == {("remote.test", 0), ("remote.test", 1)}
            await first.__aexit__(None, None, None)  # row 0 free, row 1 held
            theirs.relimit(1)  # (a reload on the other node)
            waiting = asyncio.ensure_future(_through(theirs))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # row 1 counts against a limit of 1
            await second.__aexit__(None, None, None)
            await asyncio.wait_for(waiting, 5)

    run(main())


def test_a_slot_whose_release_failed_runs_out(pg_url: str, tmp_path: Path) -> None:
    """A delivery slot whose DELETE failed (the database away as the delivery ended) was
    renewed with the leases for as long as its worker ran: an outage during deliveries left
    every slot of a destination held, and no node delivered there again until a restart."""

    async def main() -> None:
        async with nodes(pg_url, tmp_path, lease=1.0) as (a, b):
            a.queue.start()
            mine = PgSlots(a.database, a.queue.node, 1.0, a.queue.held_slots)
            theirs = PgSlots(b.database, b.queue.node, 1.0, b.queue.held_slots)
            real = a.database.connection
            async with mine.slot("remote.test", 1):
                assert a.queue.held_slots == {("remote.test", 0)}
                await asyncio.sleep(1.5)  # renewed: still held past its first lease
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(_through(theirs), 0.5)

                def away() -> Any:
                    raise asyncpg.exceptions.CannotConnectNowError("the database is starting")

                a.database.connection = away  # type: ignore[method-assign]
            a.database.connection = real  # type: ignore[method-assign]
            assert a.queue.held_slots == set()
            await asyncio.wait_for(_through(theirs), 5)  # it runs out within a lease or so

    run(main())


def test_a_lease_that_ran_out_while_postgresql_was_down_stays_its_holders(
    tmp_path: Path,
) -> None:
    """A node waiting for a host's reply to its final dot could not renew its lease while
    PostgreSQL was down; once it was back, another node took the message at once and sent it
    again, and the first recorded its 250 too: two deliveries, no node dead (recheck probe).
    Its delivery slot went the same way (one delivery over max_per_destination). What ran
    out while the database was down is taken over only once it has been up for a lease."""
    from tests.pgserver import running

    lease = 1.5

    async def main(pg: Any, url: str) -> None:
        async with nodes(url, tmp_path, lease=lease) as (a, b):
            env = await a.accept(remote=["r@remote.test"])
            await a.queue.record(env, [])  # deferred, due at once, no lease
            (claimed,) = await a.queue.claim(FAR, 10)
            mine = PgSlots(a.database, a.queue.node, lease, a.queue.held_slots)
            theirs = PgSlots(b.database, b.queue.node, lease, b.queue.held_slots)
            async with mine.slot("remote.test", 1):
                a.queue.start()  # renews (and cannot, while the database is down)
                await asyncio.to_thread(pg.stop, "immediate")
                await asyncio.sleep(lease + 0.5)  # both ran out meanwhile
                await asyncio.to_thread(pg.start)
                for _ in range(50):  # (b's pool comes back)
                    try:
                        assert await b.queue.claim(FAR, 10) == []
                        break
                    except QueueError:
                        await asyncio.sleep(0.1)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(_through(theirs), 0.5)
                await asyncio.sleep(lease * 1.5)  # a lease of uptime: a has renewed both
                assert await b.queue.claim(FAR, 10) == []
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(_through(theirs), 0.5)
            assert claimed.id == env.id

    with running(fsync=True) as pg:  # (without, an immediate stop loses the last commits)
        url = pg.new_database()
        run(main(pg, url))


def test_dkim_keys_are_shared_and_clashes_are_caught(pg_url: str) -> None:
    async def main() -> None:
        await migrate(pg_url)
        node = PgKeyStore(pg_url, live=True)
        watcher = db.Watcher(pg_url, [node])
        await watcher.start()
        cli = PgKeyStore(pg_url, live=False)
        try:
            keys = await asyncio.to_thread(KeyRing(cli, 3600).ensure, "a.test", 1000.0)
            for _ in range(100):
                if node.load("a.test"):
                    break
                await asyncio.sleep(0.02)
            assert [k.selector for k in node.load("a.test")] == [k.selector for k in keys]
            version = node.version("a.test")
            # The node confirms a key while the CLI rotates: one of them must not win blindly.
            stale = node.load("a.test")
            await asyncio.to_thread(KeyRing(cli, 3600).rotate, "a.test", 2000.0)
            await asyncio.to_thread(node.save, "a.test", stale[:1])  # refused: takes theirs
            assert {k.created for k in node.load("a.test")} == {2000.0}
            assert node.version("a.test") != version
            cli.load("a.test")
            other = PgKeyStore(pg_url, live=False)
            other.load("a.test")
            await asyncio.to_thread(KeyRing(other, 3600).rotate, "a.test", 3000.0)
            with pytest.raises(KeysChanged):
                await asyncio.to_thread(cli.save, "a.test", [])
            other.close()
        finally:
            cli.close()
            node.close()
            await watcher.close()

    run(main())


def test_keys_made_meanwhile_by_another_node_are_taken_not_an_error(pg_url: str) -> None:
    """Two nodes (or `postroom dns` on two nodes) finding no keys at once: the one whose save
    loses takes the other's keys, as it would have had it come a moment later."""

    class SeesNoneYet:
        """A store whose first load returns before the other node saves its first pair."""

        def __init__(self, inner: PgKeyStore, other: PgKeyStore) -> None:
            self.inner, self.other, self.first = inner, other, True

        def load(self, domain: str) -> list[DkimKey]:
            keys = self.inner.load(domain)
            if self.first:
                self.first = False
                KeyRing(self.other, 3600).ensure(domain, 1000.0)
            return keys

        def save(self, domain: str, keys: list[DkimKey]) -> None:
            self.inner.save(domain, keys)

        def version(self, domain: str) -> object:
            return self.inner.version(domain)

    run(migrate(pg_url))
    mine, theirs = PgKeyStore(pg_url, live=False), PgKeyStore(pg_url, live=False)
    try:
        got = KeyRing(SeesNoneYet(mine, theirs), 3600).ensure("a.test", 1001.0)
        assert {k.created for k in got} == {1000.0}  # the other's pair, and no second one
        assert {k.created for k in theirs.load("a.test")} == {1000.0}
    finally:
        mine.close()
        theirs.close()


@pytest.mark.parametrize("confused", [False, True])
def test_a_commit_stands_when_its_connection_breaks_on_the_way_back_to_the_pool(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, confused: bool
) -> None:
    """PostgreSQL going away just after an intake's commit (its reply read) broke the
    connection as the pool reset it, and the message that was stored got a 452: its client
    sent it again, and the mailbox had it twice. ``confused``: asyncpg, whose connection got
    the server's farewell in the middle of the reset, reports its own protocol state (as it
    did under a PostgreSQL fast shutdown) rather than a closed connection."""
    armed: list[int] = []
    reset = asyncpg.Connection.reset

    async def breaking_reset(self: asyncpg.Connection, *, timeout: float | None = None) -> None:
        if armed:
            armed.clear()
            killer = await asyncpg.connect(pg_url)
            try:
                await killer.execute("SELECT pg_terminate_backend($1)", self.get_server_pid())
            finally:
                await killer.close()
            for _ in range(100):  # until the client has read the server's farewell
                if self.is_closed():
                    break
                await asyncio.sleep(0.01)
            if confused:
                raise asyncpg.exceptions.InternalClientError(
                    "cannot switch to state 15; another operation (2) is in progress"
                )
        await reset(self, timeout=timeout)

    async def main() -> None:
        async with nodes(pg_url, tmp_path, count=1) as (a,):
            monkeypatch.setattr(asyncpg.Connection, "reset", breaking_reset)
            armed.append(1)
            await a.accept(["ann@a.test"])  # no TemporaryStorageError: it is committed
            assert not armed  # the connection did break on its way back
            drop = a.maildrop("ann@a.test")
            assert len(await drop.open()) == 1
            await drop.close()

    run(main())


def test_a_body_goes_once_however_many_copies_and_large_batches_are_split(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL takes no protocol message of 1 GiB: a 49 MB message to 22 mailboxes made
    one (452 at every try), and so could a batch of large messages."""
    from postroom.storage.postgresql import queue as pg_queue

    async def main() -> None:
        body = b"x" * 1000
        one = pg_queue._Intake(None, [(f"u{i}@a.test", f"Q.{i}", body) for i in range(5)])
        args = pg_queue.intake_arguments([one], 30.0)
        assert args[9] == [body] and args[10] == [1] * 5  # the body once, five copies
        monkeypatch.setattr(pg_queue, "MAX_BATCH_OCTETS", 3000)
        async with nodes(pg_url, tmp_path, count=1) as (a,):
            batches = count_batches(a)
            big = b"Subject: big\r\n\r\n" + b"y" * 2000 + b"\r\n"
            boxes = ["ann@a.test", "bob@a.test"]
            await asyncio.gather(*(a.accept(boxes, message=big) for _ in range(4)))
            assert sum(batches) == 4 and max(batches) == 1  # over the octets: one each
            for box in boxes:
                drop = a.maildrop(box)
                sizes = [m.size for m in await drop.open()]
                assert len(sizes) == 4 and len(set(sizes)) == 1 and sizes[0] >= len(big)
                await drop.close()

    run(main())


def test_a_due_notice_wakes_the_runner_and_deletes_nothing(tmp_path: Path) -> None:
    # "due" (``dmarc report --now``) began with "d", a delete's mark: every node logged
    # "ue: removed (queue delete)" and no runner woke, so the report waited for the poll.
    from postroom.storage.postgresql.queue import PgQueue

    queue = PgQueue("postgresql://nobody@127.0.0.1:1/none", None, tmp_path)
    deleted: list[str] = []
    queue.on_deleted = deleted.append
    queue._wake.clear()
    queue.notified("due")
    assert deleted == [] and queue._wake.is_set()
    queue.notified("d0661F0EA2F409F00")
    assert deleted == ["0661F0EA2F409F00"]


def test_a_stop_while_postgresql_is_away_says_which_outcomes_it_could_not_keep(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A re-probe: a stop during an outage forgot the 250s its attempts held, in silence."""

    async def main() -> None:
        async with nodes(pg_url, tmp_path, count=1) as (a,):
            env = await a.accept(remote=["r@remote.test"])
            await a.queue.record(env, [])  # deferred, due at once, no lease
            (claimed,) = await a.queue.claim(FAR, 10)

            def away() -> Any:
                raise asyncpg.exceptions.CannotConnectNowError("the database is starting")

            real = a.database.connection
            a.database.connection = away  # type: ignore[method-assign]
            try:
                claimed.recipients[0].status = "delivered"
                writing = asyncio.ensure_future(a.queue.save(claimed))
                await asyncio.sleep(0.3)
                writing.cancel()  # the stop
                with pytest.raises(asyncio.CancelledError):
                    await writing
            finally:
                a.database.connection = real  # type: ignore[method-assign]
            assert env.id == claimed.id

    with caplog.at_level(logging.WARNING, logger="postroom"):
        run(main())
    assert "outcome not recorded before the stop" in caplog.text
