"""Deliveries per destination domain within this process (``max_per_destination``).

The :class:`~postroom.storage.interfaces.DestinationSlots` of the local backend, where one
process runs the retries; the PostgreSQL backend's takes one of these before its row in the
shared table. Written by hand rather than as a semaphore per domain: a reload's limit applies
at once (:meth:`ProcessSlots.relimit`), to the deliveries already waiting too (a semaphore
kept a domain's first limit until a restart); a freed slot goes to the delivery that has
waited longest, never to one that arrives just then (first come, first served); and a domain
with nothing under way or waiting is forgotten (a semaphore was kept for every domain ever
delivered to).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class _Destination:
    __slots__ = ("limit", "used", "users", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0  # slots taken (a woken delivery's included: handed over as it is woken)
        self.users = 0  # deliveries holding or waiting for a slot
        self.waiting: deque[asyncio.Future[None]] = deque()

    def wake(self) -> None:
        """Hand the free slots to the deliveries that have waited longest."""
        while self.used < self.limit and self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)


class ProcessSlots:
    """At most ``limit`` deliveries to one destination at once, in this process."""

    def __init__(self) -> None:
        self._destinations: dict[str, _Destination] = {}

    def relimit(self, limit: int) -> None:
        """A reload: every destination's limit is ``limit`` now, for those waiting too."""
        for dest in self._destinations.values():
            dest.limit = limit
            dest.wake()

    @contextlib.asynccontextmanager
    async def slot(self, destination: str, limit: int) -> AsyncIterator[None]:
        dest = self._destinations.get(destination)
        if dest is None:
            dest = self._destinations[destination] = _Destination(limit)
        dest.limit = limit
        dest.wake()  # (a limit raised by this delivery's own call: those waiting go first)
        dest.users += 1
        try:
            if dest.used < dest.limit and not dest.waiting:
                dest.used += 1
            else:
                waiter = asyncio.get_running_loop().create_future()
                dest.waiting.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter.done() and not waiter.cancelled():
                        dest.used -= 1  # handed a slot, then cancelled: the next one's
                        dest.wake()
                    else:  # (unless a wake dropped it already, as it drops any done)
                        with contextlib.suppress(ValueError):
                            dest.waiting.remove(waiter)
                    raise
            try:
                yield
            finally:
                dest.used -= 1
                dest.wake()
        finally:
            dest.users -= 1
            if not dest.users:
                del self._destinations[destination]
