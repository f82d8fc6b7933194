"""The queue in PostgreSQL: intake with shared commits, and due work claimed under leases.

One row per queued message in ``queue`` (envelope as JSON, body with LF line ends, due time,
lease); see :class:`~postroom.storage.interfaces.MessageQueue` for what each call promises.

*Intake.* :meth:`PgQueue.accept` hands the message to the worker's :class:`Committer`, which
writes what has come in meanwhile as ONE statement (``unnest`` of arrays: the queue rows and the
mailbox copies together, so a single round trip and a single commit, atomic without a
``BEGIN``): concurrent sessions share the commit and its WAL flush, and the client's 250 waits
for that commit and nothing else. A message whose recipients are all local is stored only as
its mailbox copies; one with recipients left gets a queue row, under this node's lease (the
accepting node makes the first attempt at once), its local recipients already marked
delivered in the same commit. A batch refused by PostgreSQL (away, full) fails every message
in it with :class:`~postroom.errors.TemporaryStorageError` (the clients get 452 and send again);
a unique-key clash, which only a colliding queue id could cause, is retried one by one so that
only its own message is refused. A batch whose connection broke while its statement was in
flight (PostgreSQL crashed, the network or a pooler dropped it) may have been committed all
the same: its sessions are kept waiting (a client waits 10 minutes for the reply to the final
dot, RFC 5321 §4.5.3.2.6) while :meth:`Committer._settle` learns from PostgreSQL, on another
connection, whether the batch's rows are there, and each gets the answer that is true.

*Leases.* :meth:`claim` takes due rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` (two nodes
never wait for, nor take, the same row) and sets ``lease_owner``/``lease_until`` in the same
statement, committed before it returns. The lease is renewed every third of ``lease_time``
while this worker holds it (one UPDATE for all the rows it works on); :meth:`begin_attempt`
writes the attempt and next retry before a host is dialled and checks that the lease is ours
(:class:`~postroom.errors.LeaseLost` otherwise: deleted, or taken over after this node stalled
for a whole lease). :meth:`record` ends the lease; a node that dies leaves its leases to run
out, after which any node claims the message. Lease times come from the database's clock
(``postroom_clock()``), so nodes whose clocks differ agree on them. :meth:`lease_fresh` fences
remote deliveries: it keeps, per message, when this worker last sent a statement that set its
lease and got an answer, and lets a delivery send its final dot only within half a lease of
that (a renewal that no longer returns a message's id means another node has it). A lease
the fence found stale is no longer renewed: the dropped message is claimed again at its next
attempt once the lease runs out, never held by a worker that gave it up.

*Waking.* ``queue flush`` and ``queue delete`` from any node NOTIFY ``postroom_queue``; the
worker's watcher wakes the runner (and tells it of a deletion, so that an attempt running
here records and reports nothing). Polling every few seconds is the fallback, and what finds
messages whose lease ran out. The CLI's synchronous calls go through a :class:`~db.Door`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from postroom import events
from postroom.blocking import BlockingPool
from postroom.errors import LeaseLost, QueueError, StorageUnavailable, TemporaryStorageError
from postroom.queue.envelope import Attempt, Envelope, check_id, waiting
from postroom.storage.interfaces import LocalCopy, MessageDraft
from postroom.storage.local.queue import Draft, HoldBudget, SpareBodies
from postroom.storage.postgresql import db
from postroom.storage.postgresql.db import Database
from postroom.wire.framing import to_crlf

log = logging.getLogger("postroom")

CHANNEL = "postroom_queue"
STATS_AGE = 1.0  # the metrics' count of the queue is made again when older than this
STATS_TIMEOUT = 5.0  # and may take this long (then postroom_storage_up says 0)
MAX_BATCH = 200  # messages per shared commit
# Octets per shared commit (unless one message alone is more): PostgreSQL takes no protocol
# message of 1 GiB or more, and a batch of large messages is better written in several.
MAX_BATCH_OCTETS = 128 << 20
PARALLEL_COMMITS = 2  # batches in flight at once per worker (each on its own connection)
RECORD_RETRY = (0.05, 1.0)  # first and longest pause between tries of an outcome's record
SETTLE_WAIT = 60.0  # how long a batch whose commit went unanswered waits to learn its outcome
SETTLE_RETRY = 0.5  # ... asking this often while PostgreSQL is away

# How a statement that was sent fails when its answer never comes (the connection broke): it
# may have been committed. (An error that PostgreSQL reports says that it was not; asyncpg's
# own "connection was closed in the middle of operation" is a PostgresConnectionError.)
_UNANSWERED: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.PostgresConnectionError,
)

# The intake statement: queue rows and mailbox copies of a batch in one atomic statement. Its
# first line names it in pg_stat_activity (see _LINGERING).
_INTAKE = """/* postroom intake */
WITH q AS (
    INSERT INTO queue (id, created, next_attempt, lease_owner, lease_until, envelope, body)
    SELECT i, c, n, NULLIF(o, ''), CASE WHEN o = '' THEN NULL ELSE postroom_clock() + $8 END, e, b
    FROM unnest($1::text[], $2::float8[], $3::float8[], $4::text[], $5::text[], $6::bytea[])
        AS t(i, c, n, o, e, b)
    RETURNING 1
)
INSERT INTO messages (mailbox, uidl, size, body)
SELECT m, u, octet_length(($10::bytea[])[k]), ($10::bytea[])[k]
FROM unnest($7::text[], $9::text[], $11::int4[]) AS s(m, u, k)
"""
# The backend that ran an unanswered intake, if it still runs it: ended, so that its statement
# cannot commit after the look below. An idle one has ended its statement (committed or
# rolled back: the look sees which) and is left alone, as is one whose pid was reused since
# by a connection that runs no intake; one reused by another intake in flight costs that one
# its connection, and its batch is settled the same way.
_LINGERING = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE pid = $1 AND state <> 'idle' AND query LIKE '/* postroom intake */%'
"""
# Whether a batch was committed: any of its rows says so (the statement was atomic).
_STORED = """
SELECT EXISTS (SELECT 1 FROM queue WHERE id = ANY($1::text[]))
    OR EXISTS (
        SELECT 1 FROM messages
        WHERE (mailbox, uidl) IN (SELECT * FROM unnest($2::text[], $3::text[]))
    )
"""
# A lease that ran out is taken over only once the database has been up for a lease: one
# that ran out while it was down (restarted) is its holder's to renew when it comes back,
# not another node's to take (its holder, waiting for a host's reply to a final dot, would
# record a delivery that the other node is making again). The database's start within a
# lease ($4) is "up for less than a lease": the same test in slots.py.
_CLAIM = """
UPDATE queue q SET lease_owner = $3, lease_until = postroom_clock() + $4
FROM (
    SELECT id FROM queue
    WHERE next_attempt <= $1
        AND (lease_until IS NULL OR (lease_until < postroom_clock()
            AND extract(epoch FROM pg_postmaster_start_time()) < postroom_clock() - $4))
    ORDER BY next_attempt LIMIT $2
    FOR UPDATE SKIP LOCKED
) due
WHERE q.id = due.id
RETURNING q.id, q.envelope, q.next_attempt
"""
_BEGIN = """
UPDATE queue SET envelope = $3, next_attempt = $4, lease_until = postroom_clock() + $5
WHERE id = $1 AND lease_owner = $2
"""
_RECORD = """
UPDATE queue SET envelope = $3, next_attempt = $4, lease_owner = NULL, lease_until = NULL
WHERE id = $1 AND lease_owner = $2
"""
_RENEW = """
WITH s AS (
    UPDATE delivery_slots SET until = postroom_clock() + $2
    WHERE owner = $1 AND (destination, slot) IN (SELECT * FROM unnest($4::text[], $5::int[]))
)
UPDATE queue SET lease_until = postroom_clock() + $2
WHERE lease_owner = $1 AND id = ANY($3::text[]) RETURNING id
"""


def node_name() -> str:
    """This worker process's name as a lease owner: host, pid and a random part (a restarted
    process with a recycled pid does not pass for its predecessor)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


def copy_uidl(queue_id: str, index: int) -> str:
    """The UIDL of a copy: unique in its mailbox (RFC 1939 §7), the pair that names it."""
    return f"{queue_id}.{index}"


@dataclass
class _Intake:
    """One accepted message as the committer writes it."""

    queue_row: tuple[str, float, float, str, str, bytes] | None
    copies: list[tuple[str, str, bytes]]  # (mailbox, uidl, body CRLF), one body object each
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # What the intake statement carries for it: its queue row's body and its copies' bodies,
    # each body once.
    octets: int = field(init=False)

    def __post_init__(self) -> None:
        bodies = {id(c[2]): len(c[2]) for c in self.copies}
        self.octets = sum(bodies.values()) + (len(self.queue_row[5]) if self.queue_row else 0)


class _Unanswered(Exception):
    """The intake statement was sent on the connection to backend ``pid``, which broke before
    the answer came: committed or not, PostgreSQL knows."""

    def __init__(self, pid: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.pid = pid
        self.error = error


def intake_arguments(batch: Sequence[_Intake], lease: float) -> list[object]:
    """The arguments of :data:`_INTAKE` for ``batch``. Each body goes once, however many
    copies it makes: PostgreSQL refuses a protocol message of 1 GiB, which 22 copies of a
    49 MB message made."""
    rows = [i.queue_row for i in batch if i.queue_row is not None]
    copies = [c for i in batch for c in i.copies]
    bodies: list[bytes] = []
    where: dict[int, int] = {}  # id() of a body -> its place in ``bodies``, from 1
    for c in copies:
        if id(c[2]) not in where:
            bodies.append(c[2])
            where[id(c[2])] = len(bodies)
    return [
        *([r[k] for r in rows] for k in range(6)),
        [c[0] for c in copies],
        lease,
        [c[1] for c in copies],
        bodies,
        [where[id(c[2])] for c in copies],
    ]


class Committer:
    """Writes accepted messages in shared commits (see the module docstring)."""

    def __init__(self, database: Database, lease: float) -> None:
        self.database = database
        self.lease = lease
        self._pending: list[_Intake] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writing: set[asyncio.Task[None] | None] = set()  # the batches being written
        self._closed = False

    async def commit(self, item: _Intake) -> None:
        if self._closed:
            raise TemporaryStorageError("stopping")
        self._pending.append(item)
        self._kick()
        await item.done

    async def close(self) -> None:
        """Stop (the server is stopping, its sessions' time is up): a write still waiting to
        learn its outcome gives up, and its messages and those not yet written get a 452."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for item in self._pending:
            if not item.done.done():
                item.done.set_exception(TemporaryStorageError("stopping"))
        self._pending = []

    def _kick(self) -> None:
        while self._pending and len(self._writing) < PARALLEL_COMMITS and not self._closed:
            count, octets = 0, 0
            for item in self._pending[:MAX_BATCH]:
                if count and octets + item.octets > MAX_BATCH_OCTETS:
                    break
                count, octets = count + 1, octets + item.octets
            batch, self._pending = self._pending[:count], self._pending[count:]
            task = asyncio.get_running_loop().create_task(self._write(batch))
            self._tasks.add(task)
            self._writing.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, batch: list[_Intake]) -> None:
        outcome: list[BaseException | None] = [TemporaryStorageError("write cancelled")] * len(
            batch
        )
        try:
            outcome = await self._outcome(batch)
        finally:
            self._writing.discard(asyncio.current_task())
            for item, error in zip(batch, outcome, strict=True):
                if item.done.done():
                    continue
                if error is None:
                    item.done.set_result(None)
                else:
                    item.done.set_exception(StorageUnavailable(f"PostgreSQL: {error}"))
            self._kick()

    async def _outcome(self, batch: list[_Intake]) -> list[BaseException | None]:
        """None for each message committed, or why it was not."""
        try:
            error = await self._commit(batch)
        except asyncpg.UniqueViolationError as exc:
            if len(batch) == 1:
                return [exc]
            out: list[BaseException | None] = []
            for item in batch:  # only a clashing queue id gets refused
                try:
                    out.append(await self._commit([item]))
                except asyncpg.UniqueViolationError as clash:
                    out.append(clash)
            return out
        return [error] * len(batch)

    async def _commit(self, batch: list[_Intake]) -> BaseException | None:
        """None once ``batch`` is committed, or why it is not (a unique-key clash is raised)."""
        try:
            await self._insert(batch)
        except _Unanswered as exc:
            return await self._settle(batch, exc)
        except asyncpg.UniqueViolationError:
            raise
        except db.FAILED as exc:
            return exc
        return None

    async def _insert(self, batch: list[_Intake]) -> None:
        pid: int | None = None  # set once the statement may be on its way
        try:
            async with self.database.connection() as conn:
                pid = conn.get_server_pid()
                await conn.execute(_INTAKE, *intake_arguments(batch, self.lease))
        except _UNANSWERED as exc:
            if pid is None:  # no connection: nothing was sent
                raise
            raise _Unanswered(pid, exc) from exc

    async def _settle(self, batch: list[_Intake], unanswered: _Unanswered) -> BaseException | None:
        """Whether the batch whose statement went unanswered was committed: None if it was,
        else why not. Asked of PostgreSQL on another connection, again every SETTLE_RETRY
        while it is away, for up to SETTLE_WAIT: first the backend that ran the statement is
        ended if it is still there (a broken network leaves it running, and it could commit
        after the look), then the batch's rows are looked for, queue rows by id and copies by
        mailbox and UIDL. The statement was atomic: any row means all of them.

        Only past the deadline, or when the server stops meanwhile, is the batch refused
        without knowing (452, as any failed commit): then, and only then, a message may be
        stored though its client was told to send it again. (So may one whose rows were all
        removed before the look: copies fetched and deleted over POP3, or a row another node
        delivered after this worker's lease ran out; the look comes at the first moment
        PostgreSQL answers again.)"""
        # Its place goes to the next batch: while PostgreSQL is away, new messages get their
        # 452 at once rather than wait behind this one.
        self._writing.discard(asyncio.current_task())
        self._kick()
        log.warning(
            "PostgreSQL: the commit of %d message(s) went unanswered (%s); asking whether it"
            " was made before answering their clients",
            len(batch),
            unanswered.error,
        )
        ids = [i.queue_row[0] for i in batch if i.queue_row is not None]
        boxes = [c[0] for i in batch for c in i.copies]
        uidls = [c[1] for i in batch for c in i.copies]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_WAIT
        while loop.time() < deadline:
            try:
                async with asyncio.timeout_at(deadline), self.database.connection() as conn:
                    if not await conn.fetch(_LINGERING, unanswered.pid):
                        stored = bool(await conn.fetchval(_STORED, ids, boxes, uidls))
                        log.warning(
                            "PostgreSQL: that commit of %d message(s) was %s",
                            len(batch),
                            "made" if stored else "not made",
                        )
                        return None if stored else unanswered.error
            except db.FAILED:
                pass
            await asyncio.sleep(SETTLE_RETRY)
        log.error(
            "PostgreSQL: the outcome of a commit of %d message(s) is unknown after %.0f s;"
            " they are refused (a client may send a stored one again)",
            len(batch),
            SETTLE_WAIT,
        )
        return StorageUnavailable(f"outcome unknown: {unanswered.error}")


def _envelope(raw: str, next_attempt: float) -> Envelope:
    envelope = Envelope.from_json(raw)
    envelope.next_attempt = next_attempt  # the column is what schedules it (queue flush)
    return envelope


class PgQueue:
    """The shared queue (:class:`~postroom.storage.interfaces.MessageQueue`). A node's workers
    pass ``database`` (their pools); the CLI passes None and uses a door instead."""

    channel = CHANNEL

    def __init__(
        self,
        url: str,
        database: Database | None,
        spill_dir: Path,
        lease: float = 60.0,
        io: BlockingPool | None = None,
        header_limit: int = 1 << 20,
        node: str | None = None,
        clean: bool = False,
    ) -> None:
        self.url = url
        self.database = database
        self.lease = lease
        self.node = node or node_name()
        self.io = io or BlockingPool()
        self.header_limit = header_limit
        spill_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if clean:  # a worker's own folder: what is there is left from before a crash
            for leftover in spill_dir.iterdir():
                leftover.unlink(missing_ok=True)
        # Drafts of large messages spill to files here (read back at accept): no journal.
        self.spares = SpareBodies(spill_dir, None)
        self.budget = HoldBudget()
        self.committer = Committer(database, lease) if database is not None else None
        self.on_deleted: Callable[[str], None] | None = None  # the runner's deleted_elsewhere
        self.on_flushed: Callable[[], None] | None = None  # the runner's forget_unreachable
        # `queue delete`/`flush` from any node, logged once per node (by its first worker).
        self.log_actions = False
        self._door: db.Door | None = None
        self._bodies: dict[str, bytes] = {}  # of messages in their first attempt here
        self._wake = asyncio.Event()
        self._next_due: float | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._stats: tuple[int, float | None] = (0, None)  # the metrics' last count
        self._stats_at = float("-inf")
        self._stats_task: asyncio.Task[None] | None = None
        # Queue id -> when (time.monotonic()) the last statement that set this worker's lease
        # on it was sent, and that statement succeeded: the lease runs at least lease_time
        # from then (the database sets it later, and its clock runs at the same rate).
        self._confirmed: dict[str, float] = {}
        self._written: dict[str, float] = {}  # when each of those entries was made
        # Held here when a `queue flush` came: due at once as their attempts end (the record
        # would otherwise overwrite the flush's next_attempt with the retry interval's).
        self._flush_next: set[str] = set()
        # The delivery slots (destination, number) this worker holds now (PgSlots keeps it):
        # renewed with the leases. Only these: a row whose DELETE failed (an outage as the
        # delivery ended) or whose INSERT's answer was lost must run out, not live on for
        # as long as the worker does, holding the destination's slots from every node.
        self.held_slots: set[tuple[str, int]] = set()

    # -- life -----------------------------------------------------------------------------

    def start(self) -> None:
        """Renew this node's leases while it runs."""
        self._renewer = asyncio.get_running_loop().create_task(self._renew())
        self.spool_stats()  # counted now: the first scrape has a value

    async def close(self) -> None:
        """Stop renewing and hand back what this node holds, so another node takes it at
        once (its attempt and next retry were recorded before dialling: no hot loop)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self.committer is not None:
            await self.committer.close()
        if self.database is not None:
            with contextlib.suppress(*db.FAILED):
                async with self.database.connection() as conn:
                    await conn.execute(
                        "UPDATE queue SET lease_owner = NULL, lease_until = NULL"
                        " WHERE lease_owner = $1",
                        self.node,
                    )
                    await conn.execute("DELETE FROM delivery_slots WHERE owner = $1", self.node)
        self.close_door()

    def close_door(self) -> None:
        if self._door is not None:
            self._door.close()
            self._door = None

    async def _renew(self) -> None:
        assert self.database is not None
        failing = False  # an outage is logged when it starts and when it ends, not every try
        while True:
            await asyncio.sleep(self.lease / 3)
            sent = time.monotonic()
            try:
                async with self.database.connection() as conn:
                    held = list(self.held_slots)
                    rows = await conn.fetch(
                        _RENEW,
                        self.node,
                        self.lease,
                        list(self._confirmed),
                        [d for d, _ in held],
                        [n for _, n in held],
                    )
            except db.FAILED as exc:
                if not failing:
                    log.warning("queue leases not renewed (retrying quietly): %s", exc)
                failing = True
                continue
            if failing:
                log.info("queue leases renewed again")
                failing = False
            renewed = {r["id"] for r in rows}
            for queue_id, confirmed in list(self._confirmed.items()):
                if queue_id in renewed:
                    self._confirmed[queue_id] = max(confirmed, sent)
                elif self._written[queue_id] < sent:  # not a claim this renewal may not see
                    self._released(queue_id)  # the lease is gone

    def lease_fresh(self, queue_id: str) -> bool:
        """May a remote delivery of ``queue_id`` finish (send its final dot)? Only if this
        worker's lease on it was confirmed less than half a lease ago: then another node
        cannot have taken it over, and at least half a lease remains for the host's reply and
        the record. (Renewals come every third of a lease, so a node that reaches the
        database is never refused.) A lease found stale is given up: it is no longer renewed
        and runs out, so the message is claimed again at its next attempt (by this node or
        another) rather than held by a worker that dropped it."""
        confirmed = self._confirmed.get(queue_id)
        if confirmed is not None and time.monotonic() - confirmed < self.lease / 2:
            return True
        self._released(queue_id)
        return False

    def _confirm(self, queue_id: str, sent: float) -> None:
        self._confirmed[queue_id] = sent
        self._written[queue_id] = time.monotonic()

    def _released(self, queue_id: str) -> None:
        self._bodies.pop(queue_id, None)
        self._confirmed.pop(queue_id, None)
        self._written.pop(queue_id, None)
        self._flush_next.discard(queue_id)

    def door(self) -> db.Door:
        if self._door is None:
            self._door = db.Door(self.url, "postroom-queue")
        return self._door

    # -- the watcher's subscriber ---------------------------------------------------------

    def notified(self, payload: str) -> bool:
        # Payloads: "due" (a report made due), "flush N", "d" + a queue ID (a delete).
        if payload.startswith("d") and payload != "due":
            if self.on_deleted is not None:
                self.on_deleted(payload[1:])
            if self.log_actions:
                events.queue_action("delete", queue_id=payload[1:])
        else:
            if payload.startswith("flush"):
                self._flush_next = set(self._confirmed)
                if self.on_flushed is not None:
                    self.on_flushed()
                count = payload.removeprefix("flush").strip()
                if self.log_actions:
                    events.queue_action("flush", count=int(count) if count.isdigit() else None)
            self._next_due = 0.0
            self._wake.set()
        return False

    async def load_all(self, conn: asyncpg.Connection) -> None:
        self._wake.set()  # (re)connected: look for due work now

    async def refresh(self, conn: asyncpg.Connection) -> None:
        """Nothing to read: a notification only wakes the runner."""

    # -- intake ---------------------------------------------------------------------------

    def draft(
        self, queue_id: str, sender: str, make_prefix: Callable[[bytes], bytes] | None = None
    ) -> Draft:
        return Draft(
            self.spares,
            queue_id,
            sender,
            make_prefix,
            self.header_limit,
            self.budget,
            body_file=False,
        )

    async def accept(
        self,
        envelope: Envelope,
        draft: MessageDraft,
        deliver_now: Sequence[LocalCopy],
        hold: bool = False,
    ) -> list[OSError | None]:
        assert self.committer is not None and isinstance(draft, Draft)
        try:
            body, _body_file, _crc = await draft.finish_off_loop(self.io)  # never a file
        except (TemporaryStorageError, OSError) as exc:
            draft.abort()
            raise TemporaryStorageError(str(exc)) from None
        envelope.size, envelope.wire_size = draft.size, draft.wire_size
        now = {c.index for c in deliver_now}
        keep = hold or any(not r.done and i not in now for i, r in enumerate(envelope.recipients))
        row = None
        if keep:
            # The copies below are committed with the row: stored as delivered, so that a
            # node taking the message over never makes them again.
            data = envelope.to_dict()
            for index in now:
                data["recipients"][index]["status"] = "delivered"
            doc = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
            row = (envelope.id, envelope.created, envelope.next_attempt, self.node, doc, body)
        crlf = to_crlf(body) if deliver_now else b""
        copies = [(c.mailbox, copy_uidl(envelope.id, c.index), crlf) for c in deliver_now]
        sent = time.monotonic()
        await self.committer.commit(_Intake(row, copies))
        if keep:
            self._bodies[envelope.id] = body
            # Under this worker's lease from the commit, which came after ``sent`` (also when
            # its outcome was learnt later: the lease may then be found stale, never longer).
            self._confirm(envelope.id, sent)
        return [None] * len(deliver_now)

    def add_waiting(self, sender: str, recipients: list[str], message: bytes) -> str:
        envelope, body = waiting(sender, recipients, message)

        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO queue (id, created, next_attempt, envelope, body)"
                    " VALUES ($1, $2, 0, $3, $4)",
                    envelope.id,
                    envelope.created,
                    envelope.to_json().decode(),
                    body,
                )
                await conn.execute("SELECT pg_notify($1, 'due')", CHANNEL)

        self.door().call(run)
        return envelope.id

    # -- the runner -----------------------------------------------------------------------

    def _db(self) -> Database:
        assert self.database is not None, "the CLI's queue has no pool"
        return self.database

    async def claim(self, now: float, limit: int) -> list[Envelope]:
        sent = time.monotonic()
        try:
            async with self._db().connection() as conn:
                rows = await conn.fetch(_CLAIM, now, limit, self.node, self.lease)
                self._next_due = await conn.fetchval(
                    "SELECT min(next_attempt) FROM queue WHERE lease_owner IS NULL"
                )
        except db.FAILED as exc:
            log.warning("queue: cannot claim due messages: %s", exc)
            self._next_due = None
            return []
        rows = sorted(rows, key=lambda r: r["next_attempt"])
        for r in rows:
            self._confirm(r["id"], sent)
        out = []
        for r in rows:
            try:
                out.append(_envelope(r["envelope"], r["next_attempt"]))
            except QueueError as exc:
                log.error("queue: unreadable envelope of %s: %s", r["id"], exc)
        return out

    async def wait(self, timeout: float) -> None:
        if self._next_due is not None:
            timeout = min(timeout, self._next_due - time.time())
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.01, timeout))

    async def _execute(self, query: str, *args: object) -> str:
        try:
            async with self._db().connection() as conn:
                status: str = await conn.execute(query, *args)
        except db.FAILED as exc:
            raise StorageUnavailable(f"PostgreSQL: {exc}") from None
        return status

    async def begin_attempt(self, envelope: Envelope) -> None:
        # Nothing was done yet that only this worker knows: a database away fails it now.
        await self._store(envelope, self._execute)

    async def save(self, envelope: Envelope) -> None:
        # Outcomes with the DSNs they owe (a remote host's 250 among them) live only in this
        # worker's memory until written: retried while PostgreSQL is away, as record's are (a
        # pgcrash probe: given up, the message stayed leased here, unrecorded, until a
        # restart sent it again).
        await self._store(
            envelope, lambda query, *args: self._write_outcome(envelope.id, query, *args, end=False)
        )

    async def _store(self, envelope: Envelope, execute: Callable[..., Awaitable[str]]) -> None:
        sent = time.monotonic()
        status = await execute(
            _BEGIN,
            envelope.id,
            self.node,
            envelope.to_json().decode(),
            envelope.next_attempt,
            self.lease,
        )
        if status == "UPDATE 0":
            self._released(envelope.id)
            raise LeaseLost(f"{envelope.id} was deleted or another node holds it now")
        self._confirm(envelope.id, sent)

    async def peek(self, queue_id: str) -> Envelope | None:
        try:
            async with self._db().connection() as conn:
                row = await conn.fetchrow(
                    "SELECT envelope, next_attempt FROM queue WHERE id=$1", queue_id
                )
        except db.FAILED as exc:
            raise StorageUnavailable(f"PostgreSQL: {exc}") from None
        return None if row is None else _envelope(row["envelope"], row["next_attempt"])

    async def body(self, envelope: Envelope) -> bytes:
        body = self._bodies.get(envelope.id)
        if body is not None:
            return body
        try:
            async with self._db().connection() as conn:
                found = await conn.fetchval("SELECT body FROM queue WHERE id=$1", envelope.id)
        except db.FAILED as exc:
            raise StorageUnavailable(f"PostgreSQL: {exc}") from None
        if found is None:
            raise LeaseLost(f"{envelope.id} was deleted")
        return bytes(found)

    async def _write_outcome(
        self, queue_id: str, query: str, *args: object, end: bool = True
    ) -> str:
        """Write an attempt's outcome, again and again while PostgreSQL cannot be reached:
        what the attempt did (a remote host's 250 above all) exists only in this worker's
        memory until then, and given up it would be done again once the lease has run out.
        The lease is renewed meanwhile, so a short outage costs nothing; an error that
        PostgreSQL reports is not retried (TemporaryStorageError). ``end``: the write ends
        the attempt, and the lease with it."""
        pause, warned = RECORD_RETRY[0], False
        while True:
            try:
                async with self._db().connection() as conn:
                    status: str = await conn.execute(query, *args)
            except db.UNAVAILABLE as exc:
                if not warned:
                    log.warning("%s: outcome not recorded yet (retrying): %s", queue_id, exc)
                    warned = True
                try:
                    await asyncio.sleep(pause)
                except asyncio.CancelledError:  # the stop: what is only in memory is lost
                    log.warning(
                        "%s: outcome not recorded before the stop (PostgreSQL away): tried "
                        "again, and a host that took the message may get it twice",
                        queue_id,
                    )
                    raise
                pause = min(pause * 2, RECORD_RETRY[1])
                continue
            except asyncpg.PostgresError as exc:
                if end:
                    self._released(queue_id)
                raise StorageUnavailable(f"PostgreSQL: {exc}") from None
            if warned:
                log.info("%s: outcome recorded", queue_id)
            if end:
                self._released(queue_id)
            return status

    async def record(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        envelope.history.extend(attempts)
        due = 0.0 if envelope.id in self._flush_next else envelope.next_attempt
        self._flush_next.discard(envelope.id)
        status = await self._write_outcome(
            envelope.id, _RECORD, envelope.id, self.node, envelope.to_json().decode(), due
        )
        if status == "UPDATE 0":
            log.warning("%s: attempt not recorded: deleted, or another node holds it", envelope.id)
            return
        if self._next_due is None or due < self._next_due:
            self._next_due = due
            self._wake.set()

    async def finish(self, envelope: Envelope, attempts: Sequence[Attempt]) -> None:
        envelope.history.extend(attempts)
        # Only under this node's lease, as record: a node whose lease ran out while its attempt
        # stalled must not remove the message from the node that holds it now (with the DSN
        # that one may owe).
        status = await self._write_outcome(
            envelope.id, "DELETE FROM queue WHERE id=$1 AND lease_owner=$2", envelope.id, self.node
        )
        if status == "DELETE 0":
            log.info("%s: not removed here: deleted, or another node holds it", envelope.id)

    # -- the CLI --------------------------------------------------------------------------

    def entries(self) -> list[Envelope]:
        rows = self.door().call(
            lambda c: c.fetch("SELECT id, envelope, next_attempt FROM queue ORDER BY created, id")
        )
        out = []
        for r in rows:
            with contextlib.suppress(QueueError):
                out.append(_envelope(r["envelope"], r["next_attempt"]))
        return out

    def spool_stats(self) -> tuple[int, float | None]:
        """For the metrics: the messages in the shared queue (every node's), and when the
        oldest arrived (None if empty), as last counted. Never waits for the database (a
        scrape runs on the worker's event loop): a count older than STATS_AGE starts a new
        one in the background, bounded by STATS_TIMEOUT, which the next scrape shows."""
        stale = time.monotonic() - self._stats_at >= STATS_AGE
        if stale and self._stats_task is None and self.database is not None:
            with contextlib.suppress(RuntimeError):  # no event loop: nothing to count with
                self._stats_task = asyncio.get_running_loop().create_task(self._count())
        return self._stats

    async def _count(self) -> None:
        was_up = self.storage_up()
        try:
            async with self._db().connection() as conn:
                row = await conn.fetchrow(
                    "SELECT count(*), min(created) FROM queue", timeout=STATS_TIMEOUT
                )
            self._stats = (0, None) if row is None else (int(row[0]), row[1])
        except db.FAILED as exc:
            if was_up:  # once as it goes down, not at every scrape
                log.warning("queue: cannot count the queue for the metrics: %s", exc)
        finally:
            self._stats_at = time.monotonic()
            self._stats_task = None

    def storage_up(self) -> bool:
        """For ``postroom_storage_up``: whether this worker's last round trip succeeded."""
        return self.database is None or self.database.up

    def load(self, queue_id: str) -> Envelope:
        check_id(queue_id)
        row = self.door().call(
            lambda c: c.fetchrow("SELECT envelope, next_attempt FROM queue WHERE id=$1", queue_id)
        )
        if row is None:
            raise QueueError(f"no such message {queue_id}")
        return _envelope(row["envelope"], row["next_attempt"])

    def head(self, envelope: Envelope, limit: int = 65536) -> bytes:
        found = self.door().call(
            lambda c: c.fetchval(
                "SELECT substring(body FROM 1 FOR $2) FROM queue WHERE id=$1", envelope.id, limit
            )
        )
        if found is None:
            raise QueueError(f"no such message {envelope.id}")
        return bytes(found)

    async def delete(self, queue_id: str) -> None:
        check_id(queue_id)
        query = (
            "WITH d AS (DELETE FROM queue WHERE id=$1 RETURNING id)"
            " SELECT pg_notify($2, 'd' || id) FROM d"
        )
        if self.database is not None:
            try:
                async with self._db().connection() as conn:
                    rows = await conn.fetch(query, queue_id, CHANNEL)
            except db.FAILED as exc:
                raise StorageUnavailable(f"PostgreSQL: {exc}") from None
        else:
            rows = self.door().call(lambda c: c.fetch(query, queue_id, CHANNEL))
        if not rows:
            raise QueueError(f"no such message {queue_id}")
        self._released(queue_id)

    def flush(self, busy: AbstractSet[str] = frozenset()) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                n = await conn.fetchval(
                    "WITH f AS (UPDATE queue SET next_attempt = 0 WHERE next_attempt > 0"
                    " RETURNING 1) SELECT count(*) FROM f"
                )
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"flush {n}")
            return int(n)

        return self.door().call(run)

    def problems(self) -> list[str]:
        return []
