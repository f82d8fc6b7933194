"""The typed bundle every session shares: config, stores, queue intake, throttle, limits, TLS.

It sits below the servers and the queue runner and imports none of them (the runner is seen
through :class:`Intake`, the part of it a session uses), so that no module needs ``app.py``
and the import graph has no cycle.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from postroom.blocking import BlockingPool
from postroom.config import Config
from postroom.queue.store import Envelope, QueueStore
from postroom.sasl import ScramKeys
from postroom.storage.factory import AccountLookup
from postroom.throttle import LoginThrottle

log = logging.getLogger("postroom")


class Intake(Protocol):
    """What an SMTP session asks of the queue for a finished message."""

    def is_local(self, address: str) -> bool: ...

    def submit(self, envelope: Envelope) -> None: ...

    async def deliver_direct(self, envelope: Envelope, message: bytes) -> bool: ...

    async def withdraw_direct(self, envelope: Envelope, message: bytes) -> None: ...


class Closable(Protocol):
    """A live connection, as the limiter, the time-out sweeper and shutdown see it."""

    def shutdown(self) -> None: ...

    def check_timeout(self, now: float) -> None: ...


@dataclass
class ConnectionLimiter:
    """Counts open connections in total and per client IP (limits from ``[limits]``)."""

    max_total: int
    max_per_ip: int
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    live: set[Closable] = field(default_factory=set)
    per_ip: Counter[str] = field(default_factory=Counter)

    @classmethod
    def for_config(cls, cfg: Config, workers: int) -> ConnectionLimiter:
        """The limits of ``[limits]``; each of ``workers`` holds its share of the total."""
        lim = cfg.limits
        return cls(
            -(-lim.max_connections // workers),
            lim.max_connections_per_ip,
            cfg.per_ip_exempt_networks(),
        )

    def acquire(self, ip: str, conn: Closable) -> bool:
        if len(self.live) >= self.max_total:
            return False
        if self.per_ip[ip] >= self.max_per_ip and not self._exempt(ip):
            return False
        self.live.add(conn)
        self.per_ip[ip] += 1
        return True

    def release(self, ip: str, conn: Closable) -> None:
        if conn in self.live:
            self.live.discard(conn)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]

    def _exempt(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.exempt)


@dataclass
class Services:
    """Everything a session needs, created once per server."""

    cfg: Config
    accounts: AccountLookup
    store: QueueStore
    throttle: LoginThrottle
    connections: ConnectionLimiter
    tls: ssl.SSLContext | None
    log: logging.Logger = log
    cpu_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="postroom-cpu")
    )
    io: BlockingPool = field(default_factory=BlockingPool)  # blocking file work (POP3)
    intake: Intake | None = None  # the queue runner, set once it is made (app.build_services)
    stopping: bool = False
    primary: bool = True  # the worker that owns the queue runner and the control socket
    worker_index: int = 0
    workers: int = 1  # how many were started (a reload cannot change it)
    cpus: tuple[int, int] | None = None  # pin_cpus: the event loop's CPU, the writer's

    async def check_password(self, ip: str, login: str, password: str) -> str | None:
        """The account key if the password is right (argon2, in a worker thread). None without
        a check while ``ip`` is locked out (tested when its turn comes: see throttle.py)."""
        async with self.throttle.turn(ip):
            if self.throttle.refused(ip):
                return None
            loop = asyncio.get_running_loop()
            key: str | None = await loop.run_in_executor(
                self.cpu_executor, self.accounts.verify_password, login, password
            )
        return key

    def scram_keys(self, ip: str, login: str) -> ScramKeys | None:
        """None (as for an unknown user) while ``ip`` is locked out."""
        if self.throttle.refused(ip):
            return None
        found = self.accounts.scram_keys(login)
        return found[1] if found else None

    @property
    def banner(self) -> bytes:
        """The SMTP greeting (RFC 5321 §4.2: 220 and our host name)."""
        return f"220 {self.cfg.hostname} ESMTP postroom ready\r\n".encode()
