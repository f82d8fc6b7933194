"""Brute-force protection for logins, shared by SMTP AUTH and POP3.

Failures are counted per client IP (an IPv6 client per /64) and per account, each in a table
every worker process shares (see :mod:`postroom.sharedcounts`), and forgotten ``lockout_time`` after
the last one. A failed login is answered after a delay that grows with the failures (so guessing
is slow); an IP with ``lockout_failures`` recent failures is refused before its password is even
checked (454 4.7.0 / -ERR [SYS/TEMP]). At most :data:`CHECKS_PER_IP` passwords of one IP are
checked at a time, the others wait their turn and are tested against the lockout when it comes:
many connections guessing at once cannot all pass the test before the first of them fails, while
many correct logins at once (webmail, NAT) only queue for a moment. A success does not wipe the
IP's count (an attacker with an account of their own could otherwise log in between guesses).
Per-account counts only ever add delay to *failures*: a correct password is never delayed or
refused because of an account's history, so an attacker cannot lock a real user out; and the
answers are the same whether or not the account exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from postroom.config import AuthConfig
from postroom.password_checks import THREADS
from postroom.sharedcounts import Counts, LocalCounts, account_key, client_key

MAX_DELAY = 8.0
CHECKS_PER_IP = THREADS  # as many as argon2 has threads: one IP may use them all, not more


@dataclass
class LoginThrottle:
    """Remembers recent login failures; all methods are cheap and non-blocking."""

    cfg: AuthConfig
    clock: Callable[[], float] = time.monotonic
    # Failures per IP, shared by every worker (a client gets lockout_failures in all).
    by_ip: Counts = field(default_factory=LocalCounts)
    # Failures per account name, shared alike (one guessed at from many IPs, whichever
    # worker each connection reaches, is slowed down as much as from one).
    by_account: Counts = field(default_factory=lambda: LocalCounts(key=account_key))
    # IP -> its turn-taking for password checks, and how many use it (dropped at 0)
    _slots: dict[bytes, tuple[asyncio.Semaphore, int]] = field(default_factory=dict)

    def failures(self, ip: str) -> int:
        """This IP's failed logins within ``lockout_time`` of the last one."""
        return self.by_ip.get(ip, self.cfg.lockout_time, self.clock())

    def refused(self, ip: str) -> bool:
        """True if this IP must be turned away without checking its password."""
        limit = self.cfg.lockout_failures
        return limit > 0 and self.failures(ip) >= limit  # 0: no lockout

    @contextlib.asynccontextmanager
    async def turn(self, ip: str) -> AsyncIterator[None]:
        """Wait for one of ``ip``'s :data:`CHECKS_PER_IP` turns to check a password; test
        :meth:`refused` inside it, not before."""
        key = client_key(ip)  # an IPv6 client's whole /64, as the failures are counted
        slots, users = self._slots.get(key) or (asyncio.Semaphore(CHECKS_PER_IP), 0)
        self._slots[key] = (slots, users + 1)
        try:
            async with slots:
                yield
        finally:
            slots, users = self._slots[key]
            if users == 1:
                del self._slots[key]
            else:
                self._slots[key] = (slots, users - 1)

    def failure(self, ip: str, account: str | None) -> float:
        """Record a failure; returns how long to wait before answering it."""
        now = self.clock()
        worst = self.by_ip.add(ip, 1, self.cfg.lockout_time, now)
        if account is not None:
            worst = max(worst, self.by_account.add(account, 1, self.cfg.lockout_time, now))
        extra = max(0, worst - self.cfg.free_failures)
        return float(min(MAX_DELAY, self.cfg.failure_delay * 2.0 ** min(extra, 8)))
