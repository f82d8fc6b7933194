"""The argon2 threads, and the order in which waiting password checks get them.

argon2 is slow on purpose (about 0.1 s of CPU per check here: that is what makes guessing
expensive), so a worker checks only :data:`THREADS` passwords at a time and the rest wait. In
one first-come queue, a guessing campaign spread over many IPs (each one below the per-IP
lockout of :mod:`postroom.throttle`) holds every real user back: 300 IPs sending one wrong AUTH
each made a correct login wait 21.6 s (2 vCPUs). Here a check for a login that succeeded from
the same client IP (an IPv6 client's /64) within :data:`KNOWN_TIME` goes ahead of every check
that is not. Behind them come, in order of arrival, the checks of clients without recent
failures, and last those of clients whose IP failed within the lockout time (the caller says
which, from :mod:`postroom.throttle`'s counts): a campaign's IPs that guess more than once
fall behind a real user logging in from somewhere new. A mail client logs in from the same
network for days, so its user does not notice the campaign. A failed check forgets its pair,
so a guesser behind the same NAT as a user gets one check ahead of the others, not more.

The known pairs live in this worker's memory (at most :data:`MAX_KNOWN`, the oldest dropped
first; one pair is ~200 bytes): after a restart, and in a worker a client has not logged in
through yet, its check waits its turn as everyone's did before. This is OWASP's "device
cookie" defence against credential stuffing, with the client's network in place of the cookie
that mail protocols do not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from postroom.sharedcounts import client_key

THREADS = 4
KNOWN_TIME = 30 * 86400.0
MAX_KNOWN = 100_000

Verify = Callable[[str, str], str | None]
"""An account store's ``verify_password(login, password)``: the account key or None."""


KNOWN, FRESH, FAILED = 0, 1, 2  # the tiers of waiting checks, served in this order


class PasswordChecks:
    """Runs password checks on :data:`THREADS` threads: known clients first, clients that
    failed recently last."""

    def __init__(self, threads: int = THREADS, clock: Callable[[], float] = time.monotonic):
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="postroom-cpu")
        self._free = threads
        # Waiting checks, each a future that is set when it gets a thread, by tier.
        self._waiting: tuple[deque[asyncio.Future[None]], ...] = (deque(), deque(), deque())
        self._known: dict[tuple[bytes, str], float] = {}  # (client, login) -> until; oldest first
        self._clock = clock

    async def check(
        self, ip: str, login: str, password: str, verify: Verify, failed_recently: bool = False
    ) -> str | None:
        """``verify(login, password)`` in a thread, once one is free for this check
        (``failed_recently``: a login from this client IP failed within the lockout time)."""
        pair = _pair(ip, login)
        await self._take(KNOWN if self._knows(pair) else FAILED if failed_recently else FRESH)
        loop = asyncio.get_running_loop()
        job = self._executor.submit(verify, login, password)
        # The thread is given back when the check ends, even if its caller was cancelled.
        job.add_done_callback(lambda _: self._give_back_from(loop))
        key = await asyncio.wrap_future(job)
        self._known.pop(pair, None)  # re-inserted at the end: the dict is ordered by age
        if key is not None:
            if len(self._known) >= MAX_KNOWN:
                del self._known[next(iter(self._known))]
            self._known[pair] = self._clock() + KNOWN_TIME
        return key

    def knows(self, ip: str, login: str) -> bool:
        """Did ``login`` succeed from this client within :data:`KNOWN_TIME`."""
        return self._knows(_pair(ip, login))

    def _knows(self, pair: tuple[bytes, str]) -> bool:
        until = self._known.get(pair)
        return until is not None and self._clock() < until

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _take(self, tier: int) -> None:
        if self._free:  # no one is waiting while a thread is free
            self._free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting[tier].append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._give_back()  # handed a thread just as its caller went away
            raise

    def _give_back_from(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._give_back)

    def _give_back(self) -> None:
        for waiting in self._waiting:
            while waiting:
                turn = waiting.popleft()
                if not turn.done():  # a cancelled caller's turn is skipped
                    turn.set_result(None)
                    return
        self._free += 1


def _pair(ip: str, login: str) -> tuple[bytes, str]:
    return client_key(ip), login.lower()
