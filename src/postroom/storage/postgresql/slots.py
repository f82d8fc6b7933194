"""Deliveries per destination domain across nodes: ``max_per_destination`` slots in a table.

A delivery to a domain first takes a slot of this process (``queue/slots.py``, so a node never
asks for more than it may hold), then a row of ``delivery_slots`` (destination, slot number 0 to
limit-1): an INSERT that takes a free number, or one whose holder's time ran out (a node that
died). The row is renewed with the queue's leases (``queue.py``: the rows in ``held``, the
queue's ``held_slots``) while the delivery runs, and deleted when it ends; a row whose DELETE
fails (the database away at that moment) is renewed no more and runs out with its lease.
A node that finds every slot taken tries again after a short, growing pause; the wait is
short next to an SMTP transaction. This is the :class:`~postroom.storage.interfaces.
DestinationSlots` of the PostgreSQL backend; the local one is that of this process alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from postroom.errors import StorageUnavailable
from postroom.queue.slots import ProcessSlots
from postroom.storage.postgresql import db
from postroom.storage.postgresql.db import Database

FIRST_PAUSE, MAX_PAUSE = 0.05, 1.0

# A slot that ran out while the database was down is its holder's until the database has
# been up for a lease ($4), as a lease is (see queue.py's _CLAIM). Slots numbered past a
# limit a reload lowered, still held by deliveries begun before it, count against it too
# (a re-probe: another node began new ones beside them).
_TAKE = """
INSERT INTO delivery_slots (destination, slot, owner, until)
SELECT $1, s, $2, postroom_clock() + $4
FROM generate_series(0, $3 - 1) AS s
WHERE NOT EXISTS (
    SELECT 1 FROM delivery_slots d
    WHERE d.destination = $1 AND d.slot = s AND (d.until >= postroom_clock()
        OR extract(epoch FROM pg_postmaster_start_time()) >= postroom_clock() - $4)
) AND (
    SELECT count(*) FROM delivery_slots d
    WHERE d.destination = $1 AND (d.until >= postroom_clock()
        OR extract(epoch FROM pg_postmaster_start_time()) >= postroom_clock() - $4)
) < $3
ORDER BY s LIMIT 1
ON CONFLICT (destination, slot) DO UPDATE SET owner = EXCLUDED.owner, until = EXCLUDED.until
    WHERE delivery_slots.until < postroom_clock()
        AND extract(epoch FROM pg_postmaster_start_time()) < postroom_clock() - $4
RETURNING slot
"""


class PgSlots:
    """Slots per destination shared by every node."""

    def __init__(
        self, database: Database, node: str, lease: float, held: set[tuple[str, int]]
    ) -> None:
        self.database = database
        self.node = node
        self.lease = lease
        self.held = held
        self._local = ProcessSlots()
        self._limit = 1  # the latest asked for or reloaded: a row is taken under it

    def relimit(self, limit: int) -> None:
        self._limit = limit
        self._local.relimit(limit)

    @contextlib.asynccontextmanager
    async def slot(self, destination: str, limit: int) -> AsyncIterator[None]:
        self._limit = limit
        async with self._local.slot(destination, limit):
            number = await self._take(destination)
            self.held.add((destination, number))
            try:
                yield
            finally:
                self.held.discard((destination, number))
                with contextlib.suppress(*db.FAILED):  # else it runs out with the lease
                    async with self.database.connection() as conn:
                        await conn.execute(
                            "DELETE FROM delivery_slots"
                            " WHERE destination=$1 AND slot=$2 AND owner=$3",
                            destination,
                            number,
                            self.node,
                        )

    async def _take(self, destination: str) -> int:
        """A row of ``destination`` under the limit as it is at each try: a reload reaches
        a delivery waiting for one (a re-probe: one raised waited on at the old limit, one
        lowered let more through across the nodes than it allows)."""
        pause = FIRST_PAUSE
        while True:
            try:
                async with self.database.connection() as conn:
                    number = await conn.fetchval(
                        _TAKE, destination, self.node, self._limit, self.lease
                    )
            except db.FAILED as exc:
                raise StorageUnavailable(f"PostgreSQL: {exc}") from None
            if number is not None:
                return int(number)
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)
