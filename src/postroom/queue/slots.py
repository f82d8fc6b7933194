"""Deliveries per destination domain within this process (``max_per_destination``).

The :class:`~postroom.storage.interfaces.DestinationSlots` of the local backend, where one
process runs the retries; the PostgreSQL backend's takes one of these before its row in the
shared table. Written by hand rather than as a semaphore per domain: the limit is the one
configured when a delivery asks (a reload applies at once, also to a domain that has had
mail: a semaphore kept its first limit until a restart), and a domain with nothing under way
or waiting is forgotten (one semaphore per domain ever delivered to was kept for good).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class _Destination:
    __slots__ = ("limit", "used", "users", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # as the last delivery that asked was configured
        self.used = 0  # slots taken
        self.users = 0  # deliveries holding or waiting for a slot
        self.waiting: deque[asyncio.Future[None]] = deque()

    def wake(self) -> None:
        """Let as many waiting deliveries on as there are free slots."""
        free = self.limit - self.used
        while free > 0 and self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class ProcessSlots:
    """At most ``limit`` deliveries to one destination at once, in this process."""

    def __init__(self) -> None:
        self._destinations: dict[str, _Destination] = {}

    @contextlib.asynccontextmanager
    async def slot(self, destination: str, limit: int) -> AsyncIterator[None]:
        dest = self._destinations.get(destination)
        if dest is None:
            dest = self._destinations[destination] = _Destination(limit)
        dest.limit = limit
        dest.users += 1
        try:
            dest.wake()  # (a limit raised by a reload lets those waiting on at once)
            while dest.used >= dest.limit:
                waiter = asyncio.get_running_loop().create_future()
                dest.waiting.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter.done() and not waiter.cancelled():
                        dest.wake()  # woken, then cancelled before it ran: the next one goes
                    else:
                        dest.waiting.remove(waiter)
                    raise
            dest.used += 1
            try:
                yield
            finally:
                dest.used -= 1
                dest.wake()
        finally:
            dest.users -= 1
            if not dest.users:
                del self._destinations[destination]
