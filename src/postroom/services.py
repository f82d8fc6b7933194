"""The typed bundle every session shares: config, stores, queue intake, throttle, limits, TLS.

It sits below the servers and the queue runner and imports none of them (the runner is seen
through :class:`Intake`, the part of it a session uses), so that no module needs ``app.py``
and the import graph has no cycle.
"""

from __future__ import annotations

import ipaddress
import logging
import resource
import ssl
import time
from dataclasses import dataclass, field
from typing import Protocol

from postroom.auth.service import SenderAuth
from postroom.blocking import BlockingPool
from postroom.config import Config
from postroom.errors import LockedOut, PasswordUncheckable
from postroom.password_checks import PasswordChecks
from postroom.queue.envelope import Envelope
from postroom.sasl import ScramKeys
from postroom.sharedcounts import Counts, LocalCounts
from postroom.storage.credentials import login_key, password_matches
from postroom.storage.interfaces import AccountLookup, Maildrops, MessageDraft, MessageQueue
from postroom.throttle import LoginThrottle
from postroom.wire.replies import Reply

log = logging.getLogger("postroom")

FD_RESERVE = 32  # descriptors kept free for the sessions already open
FD_WARNING_EVERY = 10.0  # seconds between two warnings that descriptors run out


def descriptors_short(fileno: int) -> bool:
    """``fileno`` is within :data:`FD_RESERVE` of the process's descriptor limit."""
    return fileno >= resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE


class Accepted(Protocol):
    """The message is durable under ``queue_id``: the client may get its 250."""

    @property
    def queue_id(self) -> str: ...


class Intake(Protocol):
    """The one hand-off of a finished message (the queue runner's :meth:`accept`)."""

    async def accept(self, envelope: Envelope, draft: MessageDraft) -> Accepted | Reply:
        """``Accepted`` once the message is durable, or the reply to send (452, ...)."""
        ...


class Closable(Protocol):
    """A live connection, as the limiter, the time-out sweeper and shutdown see it."""

    def shutdown(self) -> None: ...

    def cut_off(self) -> None: ...

    def check_timeout(self, now: float) -> None: ...


# The row of the count over every client in the shared tables: no client connects from the
# unspecified address.
TOTAL = "0.0.0.0"


@dataclass
class ConnectionLimiter:
    """Counts open connections in total and per client IP. With several workers both counts
    live in the tables every worker shares (``shared_total``): ``max_connections`` and
    ``max_connections_per_ip`` hold over all workers, whichever takes the connection (a
    share per worker let in one more per worker when rounded up, and refused clients
    while another worker had room, since the kernel spreads them unevenly)."""

    max_total: int
    max_per_ip: int
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    per_ip: Counts = field(default_factory=LocalCounts)
    shared_total: bool = False
    # Each live connection: its client, and whether it is counted in per_ip (exempt ones are
    # not, until a reload takes their exemption away).
    live: dict[Closable, tuple[str, bool]] = field(default_factory=dict)
    _exempt_ips: dict[str, bool] = field(default_factory=dict)  # per client address, answered
    _fd_warned: float = -FD_WARNING_EVERY  # when descriptors running out was last logged

    @classmethod
    def for_config(
        cls, cfg: Config, workers: int, per_ip: Counts | None = None
    ) -> ConnectionLimiter:
        """The limits of ``[limits]``, over all ``workers`` (which share ``per_ip``)."""
        lim = cfg.limits
        limiter = cls(lim.max_connections, lim.max_connections_per_ip, cfg.per_ip_exempt_networks())
        if per_ip is not None:
            limiter.per_ip = per_ip
            limiter.shared_total = workers > 1
        return limiter

    def acquire(self, ip: str, conn: Closable, fileno: int = -1) -> bool:
        """Count a new connection, or False (the caller answers 421 and closes) when a limit
        is reached or descriptors run short. ``fileno`` is the connection's descriptor: Linux
        gives the lowest free number, so a number within :data:`FD_RESERVE` of the limit
        means at most that many are left, kept for the spool, Maildirs and the next 421. Out
        of them, libuv would accept and close connections without a word."""
        if descriptors_short(fileno):
            now = time.monotonic()
            if now - self._fd_warned >= FD_WARNING_EVERY:  # a flood would flood the log too
                self._fd_warned = now
                log.warning("descriptors running out (fd %d): connections refused with 421", fileno)
            return False
        # Counted first, then compared: two workers cannot both take the last place.
        if self.shared_total:
            if self.per_ip.add(TOTAL, 1) > self.max_total:
                self.per_ip.add(TOTAL, -1)
                return False
        elif len(self.live) >= self.max_total:
            return False
        # Counted also where no limit applies now (0: no limit per IP): a reload that sets
        # one then finds the ones already open. An exempt address's only once a reload takes
        # its exemption away (set_exempt): an IPv6 client is counted by its /64, and an exempt
        # relay's connections took the places of every other host in it.
        counted = not self._exempt(ip)
        if counted and self.per_ip.add(ip, 1) > self.max_per_ip and self.max_per_ip > 0:
            self.per_ip.add(ip, -1)
            if self.shared_total:
                self.per_ip.add(TOTAL, -1)
            return False
        self.live[conn] = (ip, counted)
        return True

    def release(self, ip: str, conn: Closable) -> None:
        held = self.live.pop(conn, None)
        if held is None:
            return
        if held[1]:
            self.per_ip.add(ip, -1)
        if self.shared_total:
            self.per_ip.add(TOTAL, -1)

    def set_exempt(
        self, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    ) -> None:
        """New networks (a reload): the answers given per address start over, and the open
        connections of an address no longer exempt count from now on."""
        self.exempt = networks
        self._exempt_ips.clear()
        for conn, (ip, counted) in list(self.live.items()):
            if not counted and not self._exempt(ip):
                self.per_ip.add(ip, 1)
                self.live[conn] = (ip, True)

    def _exempt(self, ip: str) -> bool:
        if not self.exempt:
            return False
        known = self._exempt_ips.get(ip)
        if known is not None:
            return known
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # (an IPv4 client on a dual-stack socket: counted so too)
        if len(self._exempt_ips) >= 4096:  # bounded: a wide botnet only makes it start over
            self._exempt_ips.clear()
        answer = self._exempt_ips[ip] = any(addr in net for net in self.exempt)
        return answer


def _as_unknown(_login: str, password: str) -> str | None:
    """The work and the answer of a login without an account: one argon2 verification."""
    password_matches(None, password)
    return None


@dataclass
class Services:
    """Everything a session needs, created once per server."""

    cfg: Config
    accounts: AccountLookup
    queue: MessageQueue
    throttle: LoginThrottle
    connections: ConnectionLimiter
    tls: ssl.SSLContext | None
    maildrops: Maildrops  # opens a user's mailbox for POP3
    log: logging.Logger = log
    password_checks: PasswordChecks = field(default_factory=PasswordChecks)  # argon2 threads
    io: BlockingPool = field(default_factory=BlockingPool)  # blocking file work
    intake: Intake | None = None  # the queue runner, set once it is made (app.build_services)
    sender_auth: SenderAuth | None = None  # DKIM signing and SPF/DKIM/DMARC checks
    stopping: bool = False
    primary: bool = True  # the worker that owns the queue runner and the control socket
    worker_index: int = 0
    workers: int = 1  # how many were started (a reload cannot change it)
    cpus: tuple[int, int] | None = None  # pin_cpus: the event loop's CPU, the writer's

    async def check_password(self, ip: str, login: str, password: str) -> str | None:
        """The account key if the password is right (argon2, in a thread; clients that logged
        in before go first, those that failed recently last, see password_checks.py), else
        None. :class:`LockedOut`, without a check, if ``ip`` is locked out when its turn comes
        (see throttle.py); :class:`PasswordUncheckable` (logged here) if argon2 failed."""
        async with self.throttle.turn(ip):
            if self.throttle.refused(ip):
                raise LockedOut(ip)
            failed = self.throttle.failures(ip) > 0
            named = login_key(login)
            # A retired domain's login costs what an unknown user's does, and fails as one:
            # checked after the password, a right one came back sooner (its check is kept).
            retired = named is not None and not self._in_service(named)
            verify = _as_unknown if retired else self.accounts.verify_password
            try:
                return await self.password_checks.check(ip, login, password, verify, failed)
            except PasswordUncheckable as exc:
                self.log.error("the password of %r could not be checked: %s", login[:320], exc)
                raise

    def scram_keys(self, login: str) -> ScramKeys | None:
        """The account's keys, None for an unknown user (the lockout is checked before:
        made-up keys for a real account while the client was locked out told who exists)."""
        found = self.accounts.scram_keys(login)
        return found[1] if found and self._in_service(found[0]) else None

    def _in_service(self, key: str) -> bool:
        """Is the account's domain still local? One taken out of ``domains`` (a SIGHUP) is
        retired: its users log in no more (they could still relay mail), as if unknown;
        their accounts and mailboxes stay until ``user del``."""
        return key.rpartition("@")[2] in self.accounts.local_domains

    @property
    def banner(self) -> bytes:
        """The SMTP greeting (RFC 5321 §4.2: 220 and our host name)."""
        return f"220 {self.cfg.hostname} ESMTP postroom ready\r\n".encode()
