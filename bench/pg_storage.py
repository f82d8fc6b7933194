"""PostgreSQL storage on its own (issue 18): delivery inserts, bodies, POP3 reads, accounts.

    python bench/pg_storage.py [--messages 4000] [--users 100000] [--concurrency 20]

Starts a private PostgreSQL (fsync on, as in production: tests/pgserver.py) and measures, on the
storage layer alone (no SMTP, no POP3 wire):

1. **Body storage** -- ``bytea`` compressed (EXTENDED with pglz, PostgreSQL's default, or lz4),
   ``bytea`` uncompressed (EXTERNAL, what postroom uses) and large objects: inserts/s of 10 KiB and
   1 MiB bodies, and reads/s of whole bodies and of 256 KiB slices.
2. **Delivery** -- 1 KiB messages for one local recipient, one and ``--concurrency`` at a
   time, messages/s: the intake (:meth:`PgQueue.accept`, the copy stored in the commit that
   accepts the message; concurrent messages share commits) and a later attempt
   (:meth:`PgMailboxes.deliver`, body read from the queue row, one commit per message).
3. **POP3 read** -- a :class:`PgMaildrop` session over 5,000 x 10 KiB messages doing RETR of
   each in order (read-ahead) and DELE of all at QUIT: messages/s.
4. **Accounts** -- ``--users`` users loaded into a node's live copy (:class:`LiveAccounts`
   under its :class:`Watcher`): load time, memory per user, lookups (``resolve``) per second,
   and the time from a change committed elsewhere to the copy seeing it.

The stores are the ones a node serves from (``storage/factory.py`` ``open_node``).
Not run by CI. Needs PostgreSQL installed (apt-get install postgresql).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.pgserver import PgServer, need_postgresql  # noqa: E402

from postroom import config  # noqa: E402
from postroom.address import Address  # noqa: E402
from postroom.blocking import BlockingPool  # noqa: E402
from postroom.queue.envelope import Envelope, Recipient, new_queue_id  # noqa: E402
from postroom.storage.factory import NodeStores, open_node  # noqa: E402
from postroom.storage.interfaces import LocalCopy  # noqa: E402
from postroom.storage.postgresql.accounts import LiveAccounts, PgAccounts  # noqa: E402
from postroom.storage.postgresql.db import Watcher  # noqa: E402


def sample_mail(size: int) -> bytes:
    """Mail as it mostly is: some prose, then an attachment in base64 (random octets)."""
    import base64
    import random

    rng = random.Random(7)
    words = [b"mail", b"server", b"meeting", b"report", b"the", b"of", b"and", b"tomorrow"]
    prose = b"\r\n".join(
        b" ".join(rng.choice(words) for _ in range(12)) for _ in range(size // 400)
    )
    attachment = base64.encodebytes(rng.randbytes(size)).replace(b"\n", b"\r\n")
    return (prose + b"\r\n\r\n" + attachment)[:size]


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s"


async def bodies(url: str, rounds: int) -> None:
    print("1. body storage (inserts/s, whole reads/s, 256 KiB slice reads/s)")
    conn = await asyncpg.connect(url)
    await conn.execute(
        "CREATE TABLE b_ext (id serial PRIMARY KEY, body bytea);"
        "ALTER TABLE b_ext ALTER COLUMN body SET STORAGE EXTERNAL;"
        "CREATE TABLE b_cmp (id serial PRIMARY KEY, body bytea);"
        "CREATE TABLE b_lz4 (id serial PRIMARY KEY, body bytea COMPRESSION lz4);"
        "CREATE TABLE b_lo (id serial PRIMARY KEY, body oid);"
    )
    for size, count in ((10 << 10, rounds), (1 << 20, max(20, rounds // 50))):
        body = sample_mail(size)  # about a fifth prose, the rest a base64 attachment
        for table in ("b_cmp", "b_lz4", "b_ext", "b_lo"):
            await conn.execute(f"TRUNCATE {table}")
            start = time.perf_counter()
            for _ in range(count):
                if table == "b_lo":
                    async with conn.transaction():
                        oid = await conn.fetchval("SELECT lo_from_bytea(0, $1)", body)
                        await conn.execute("INSERT INTO b_lo (body) VALUES ($1)", oid)
                else:
                    await conn.execute(f"INSERT INTO {table} (body) VALUES ($1)", body)
            insert = time.perf_counter() - start
            ids = [r[0] for r in await conn.fetch(f"SELECT id FROM {table}")]
            start = time.perf_counter()
            for i in ids:
                if table == "b_lo":
                    await conn.fetchval(f"SELECT lo_get(body) FROM {table} WHERE id=$1", i)
                else:
                    await conn.fetchval(f"SELECT body FROM {table} WHERE id=$1", i)
            read = time.perf_counter() - start
            start = time.perf_counter()
            slices = 0
            for i in ids:
                for off in range(0, size, 1 << 18):
                    slices += 1
                    if table == "b_lo":
                        await conn.fetchval(
                            f"SELECT lo_get(body, $2, $3) FROM {table} WHERE id=$1", i, off, 1 << 18
                        )
                    else:
                        await conn.fetchval(
                            f"SELECT substring(body FROM $2 FOR $3) FROM {table} WHERE id=$1",
                            i,
                            off + 1,
                            1 << 18,
                        )
            sliced = time.perf_counter() - start
            if table == "b_lo":
                disk = await conn.fetchval(
                    "SELECT sum(pg_column_size(data)) FROM pg_largeobject"
                    " WHERE loid IN (SELECT body FROM b_lo)"
                )
                await conn.execute("SELECT lo_unlink(body) FROM b_lo")  # TRUNCATE would not
            else:
                disk = await conn.fetchval(f"SELECT sum(pg_column_size(body)) FROM {table}")
            name = {
                "b_cmp": "bytea pglz",
                "b_lz4": "bytea lz4",
                "b_ext": "bytea EXTERNAL",
                "b_lo": "large object",
            }[table]
            print(
                f"   {size >> 10:5d} KiB  {name:17s} insert {rate(count, insert):>9s}"
                f"  read {rate(count, read):>9s}  slices {rate(slices, sliced):>9s}"
                f"  stored {disk / count / 1024:7.1f} KiB/msg"
            )
    await conn.close()


async def worker(step: Callable[[int], Awaitable[None]], counter: Iterator[int]) -> None:
    for i in counter:  # shared by the workers: each number is taken once
        await step(i)


def mail(sender: str, rcpt: str) -> Envelope:
    return Envelope(new_queue_id(), sender, [Recipient(rcpt)], time.time())


async def delivery(node: NodeStores, messages: int, concurrency: int) -> None:
    print("2. delivery of 1 KiB messages, one local recipient each")
    message = b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n"

    async def intake(i: int) -> None:
        # What SMTP does for a local recipient: the copy is committed with the message.
        envelope = mail("s@x.test", f"u{i % 50}@a.test")
        draft = node.queue.draft(envelope.id, envelope.sender)
        draft.write(message)
        copy = LocalCopy(0, envelope.recipients[0].address)
        assert await node.queue.accept(envelope, draft, [copy]) == [None]

    # A later attempt (a DSN queued by the CLI, say): the body is read back from its queue row.
    later = [mail("s@x.test", f"v{i % 50}@a.test") for i in range(messages * 2)]
    async with node.database.pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO queue (id, created, next_attempt, envelope, body)"
            " VALUES ($1, $2, 1e12, $3, $4)",
            [(e.id, e.created, e.to_json().decode(), message) for e in later],
        )
    pending = iter(later)

    async def attempt(_i: int) -> None:
        envelope = next(pending)
        copy = LocalCopy(0, envelope.recipients[0].address)
        assert await node.mailboxes.deliver(envelope, [copy]) == [None]

    for name, step in (
        ("intake, the copy in the accepting commit (PgQueue.accept)", intake),
        ("later attempt, one commit each (PgMailboxes.deliver)", attempt),
    ):
        print(f"   {name}:")
        for parallel in (1, concurrency):
            counter = iter(range(messages))
            start = time.perf_counter()
            await asyncio.gather(*(worker(step, counter) for _ in range(parallel)))
            print(f"   {parallel:5d} at a time: {rate(messages, time.perf_counter() - start)}")


async def pop3(node: NodeStores, count: int) -> None:
    print(f"3. POP3 session: RETR {count} x 10 KiB in order, DELE all, QUIT")
    message = (b"Subject: bench\r\n\r\n" + b"y" * 78 + b"\r\n") * 128
    async with node.database.pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO messages (mailbox, uidl, size, body) VALUES ($1, $2, $3, $4)",
            [("pop@a.test", f"P{i}", len(message), message) for i in range(count)],
        )
    drop = node.maildrops.maildrop("pop@a.test")
    start = time.perf_counter()
    listed = await drop.open()
    octets = 0
    for n in range(1, len(listed) + 1):
        body = drop.read_now(n)
        if body is None:
            body = b"".join([p async for p in drop.chunks(n)])
        octets += len(body)
    retr = time.perf_counter() - start
    assert octets == count * len(message)
    assert await drop.update(list(range(1, len(listed) + 1)), []) == 0
    total = time.perf_counter() - start
    await drop.close()
    print(
        f"   RETR {rate(count, retr)} ({octets / retr / 2**20:.0f} MiB/s);"
        f" with the QUIT that deletes all: {rate(count, total)}"
    )


async def accounts(url: str, users: int) -> None:
    print(f"4. accounts: {users:,} users and {users // 10:,} aliases in a node's live copy")
    # One real hash, copied: hashing 100,000 passwords would take minutes and measure argon2.
    admin = await asyncio.to_thread(PgAccounts, url, ["a.test"])  # the CLI's store; migrates
    await asyncio.to_thread(admin.add_user, Address("seed", "a.test"), "pw")
    conn = await asyncpg.connect(url)
    await conn.execute(
        "INSERT INTO users SELECT 'user' || g || '@a.test', password_hash, scram_salt,"
        " scram_iterations, scram_stored_key, scram_server_key, now()"
        " FROM users, generate_series(1, $1) g",
        users,
    )
    await conn.execute(
        "INSERT INTO aliases SELECT 'alias' || g || '@a.test', 'user' || g || '@a.test'"
        " FROM generate_series(1, $1) g",
        users // 10,
    )

    async def node_copy() -> tuple[LiveAccounts, Watcher]:
        live = LiveAccounts(["a.test"])  # as open_node makes it: loaded by the watcher
        watcher = Watcher(url, [live])
        await watcher.start()
        return live, watcher

    tracemalloc.start()
    live, watcher = await node_copy()
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    await watcher.close()
    start = time.perf_counter()
    live, watcher = await node_copy()
    loaded = time.perf_counter() - start
    keys = [f"user{i}@a.test" for i in range(1, users, 7)] + [
        f"alias{i}@a.test" for i in range(1, users // 10, 3)
    ]
    start = time.perf_counter()
    for key in keys:
        assert live.resolve(key)
    lookups = time.perf_counter() - start
    delays = []
    for i in range(20):  # committed on another connection (another node), seen by this copy
        key = Address(f"new{i}", "a.test").key
        await conn.execute(
            "INSERT INTO users SELECT $1, password_hash, scram_salt, scram_iterations,"
            " scram_stored_key, scram_server_key, now() FROM users WHERE address='seed@a.test'",
            key,
        )
        sent = time.perf_counter()
        while not live.user_exists(key):
            await asyncio.sleep(0.0005)
        delays.append(time.perf_counter() - sent)
    print(
        f"   full load {loaded:.2f} s, {memory / users:.0f} B/user (Python heap);"
        f" resolve {rate(len(keys), lookups)}; change seen after"
        f" {statistics.median(delays) * 1000:.1f} ms (median of 20)"
    )
    await watcher.close()
    await asyncio.to_thread(admin.close)
    await conn.close()


async def main(args: argparse.Namespace, server: PgServer) -> None:
    url = server.new_database()
    with tempfile.TemporaryDirectory() as data_dir:
        storage = {"backend": "postgresql", "url": url}
        cfg = config.from_dict({"domains": ["a.test"], "data_dir": data_dir, "storage": storage})
        node = await open_node(cfg, BlockingPool())  # migrates the schema, as a node does
        try:
            await bodies(url, args.messages // 4)
            await delivery(node, args.messages, args.concurrency)
            await pop3(node, 5000)
        finally:
            await node.close()
    await accounts(server.new_database(), args.users)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=20)
    opts = parser.parse_args()
    pg = PgServer(need_postgresql(), fsync=True)
    try:
        pg.start()
        version = pg.psql("postgres", "SHOW server_version")
        print(f"PostgreSQL {version} (fsync on), {os.cpu_count()} CPUs")
        asyncio.run(main(opts, pg))
    finally:
        pg.destroy()
