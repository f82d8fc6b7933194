"""Counts that every worker process sees: open connections and recent login failures per IP,
failed logins per account.

With ``workers = N`` each process used to count for itself, so one client got N times the
per-IP connection limit and N times the failed logins before a lockout. The counts now live
in a small table in an anonymous shared mapping made before the workers are forked (so a
restarted worker inherits it too), guarded by one process-shared lock: an open-addressed
hash table (linear probing, backward-shift deletion, no tombstones) of fixed size, keyed by
the 16-octet client key (:func:`client_key`), hashed with Python's keyed SipHash (its key is
inherited at the fork, so every worker hashes alike and a client cannot choose collisions).
A row holds a count and the time of its last change; a count that has reached zero, or has
aged past the caller's ``max_age``, frees its row. When the table is full the oldest rows are
forgotten (a flood of addresses makes the server forget, never grow).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import multiprocessing
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence

_ROW = struct.Struct("<16sid")  # address, count, time of the last change
_EMPTY = bytes(16)
_V4_MAPPED = bytes(10) + b"\xff\xff"
# The interface half of an IPv6 address, not counted: a mark in its place, so that no key is
# all zeros, the empty row's (::1 was, and its rows went wrong: wiped, counted below zero).
_SLASH_64 = bytes(7) + b"\x01"
DEFAULT_ROWS = 1 << 16  # 65,536 rows of 32 octets: 2 MiB per table
GAP_WAIT = 1.0  # seconds a lock stays taken with no holder named before it counts as lost


def client_key(ip: str) -> bytes:
    """Who a client is, for counting, in 16 octets: an IPv4 address as v4-mapped, an IPv6
    address as its /64 (``inet_pton``: 1 us, ``ipaddress``: 14). A /64 is the smallest
    network a subscriber is given, and a host in it picks its own addresses (RFC 8981
    temporary addresses, or any it likes): counted one address at a time, whoever holds a
    /64 would have 2^64 fresh starts at every limit."""
    try:
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    except OSError:
        return b"\xff" * 16  # not an address (a Unix socket): one shared row
    if packed.startswith(_V4_MAPPED):  # an IPv4 client on a dual-stack socket
        return packed
    return packed[:8] + _SLASH_64


def account_key(name: str) -> bytes:
    """An account name (as the throttle counts it: lower-cased) in 16 octets, never the empty
    row's: failed logins per account are counted over all workers in a table of these."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=16).digest()
    return digest if digest != _EMPTY else _SLASH_64 * 2


class SharedCounts:
    """A count per client IP (or per whatever ``key`` names in 16 octets: see
    :func:`account_key`), shared by every process forked after it was made."""

    def __init__(
        self,
        rows: int = DEFAULT_ROWS,
        clock: Callable[[], float] = time.monotonic,
        key: Callable[[str], bytes] = client_key,
    ) -> None:
        self.rows = rows
        self._key = key
        self.size = _ROW.size + 4  # padded to 32 octets
        self._map = mmap.mmap(-1, rows * self.size)  # MAP_SHARED | MAP_ANONYMOUS
        self._lock = multiprocessing.Lock()
        # Who holds _lock (0: nobody): a POSIX semaphore stays taken when its holder dies,
        # so a worker killed inside (SIGKILL, the OOM killer) froze every other worker and
        # the supervisor for good. The supervisor, which reaps the dead, gives it back.
        self._holder = multiprocessing.Value("i", 0, lock=False)
        self._clock = clock
        self.used = multiprocessing.Value("i", 0, lock=False)  # rows in use (under _lock)

    @contextlib.contextmanager
    def _locked(self, wait: float | None = None) -> Iterator[None]:
        """Hold the lock (TimeoutError past ``wait`` seconds)."""
        if not self._lock.acquire(timeout=wait):
            raise TimeoutError("the shared counts' lock is held")
        self._holder.value = os.getpid()
        try:
            yield
        finally:
            self._holder.value = 0
            self._lock.release()

    def repair(self, dead: int) -> bool:
        """Give back the lock a process that died (pid ``dead``) held; whether it did. Killed
        between taking it and naming itself (or between unnaming itself and giving it back),
        it left the lock taken with no holder named: a living process names itself at once,
        so a lock that stays taken, unnamed, for ``GAP_WAIT`` seconds was the dead one's."""
        holder = self._holder.value
        if holder not in (dead, 0):
            return False
        if holder == 0:
            if self._lock.acquire(timeout=GAP_WAIT):  # free, or held by the living: well
                self._lock.release()
                return False
            if self._holder.value != 0:
                return False
        self._holder.value = 0
        with contextlib.suppress(ValueError):  # (released meanwhile after all)
            self._lock.release()
        return True

    # -- rows ----------------------------------------------------------------------------------

    def _read(self, i: int) -> tuple[bytes, int, float]:
        key, count, when = _ROW.unpack_from(self._map, i * self.size)
        return key, count, when

    def _write(self, i: int, key: bytes, count: int, when: float) -> None:
        _ROW.pack_into(self._map, i * self.size, key, count, when)

    def _find(self, key: bytes) -> tuple[int, bool]:
        """The row of ``key`` (True) or the empty row where it would go (False)."""
        i = hash(key) % self.rows
        while True:
            k, _c, _w = self._read(i)
            if k == key:
                return i, True
            if k == _EMPTY:
                return i, False
            i = (i + 1) % self.rows

    def _delete(self, i: int) -> None:
        """Empty row ``i`` and shift later rows of the same run back (Knuth's algorithm R)."""
        j = i
        while True:
            self._write(i, _EMPTY, 0, 0.0)
            while True:
                j = (j + 1) % self.rows
                key, count, when = self._read(j)
                if key == _EMPTY:
                    self.used.value -= 1
                    return
                home = hash(key) % self.rows
                # Row j may move to i unless its home lies cyclically in (i, j].
                if (i < j and not i < home <= j) or (i > j and j < home <= i):
                    break
            self._write(i, key, count, when)
            i = j

    def _forget_oldest(self) -> None:
        """Full: drop the older half of the rows (a flood of addresses; forget, never grow)."""
        stamps = sorted(self._read(i)[2] for i in range(self.rows) if self._read(i)[0] != _EMPTY)
        cut = stamps[len(stamps) // 2] if stamps else 0.0
        i = 0
        while i < self.rows:
            key, _count, when = self._read(i)
            if key != _EMPTY and when <= cut:
                self._delete(i)  # a later row may have moved into i: look at it again
                continue
            i += 1

    # -- the interface -------------------------------------------------------------------------

    def get(self, ip: str, max_age: float | None = None, now: float | None = None) -> int:
        key = self._key(ip)
        now = self._clock() if now is None else now
        with self._locked():
            i, found = self._find(key)
            if not found:
                return 0
            _k, count, when = self._read(i)
            if max_age is not None and now - when > max_age:
                self._delete(i)
                return 0
            return count

    def add(
        self, ip: str, delta: int, max_age: float | None = None, now: float | None = None
    ) -> int:
        """Add ``delta`` (a count aged past ``max_age`` starts again from 0); the new count.
        A count that reaches 0 frees its row. ``now`` on the clock of the caller's choice
        (a system-wide one: every process must read the same)."""
        key = self._key(ip)
        now = self._clock() if now is None else now
        with self._locked():
            i, found = self._find(key)
            count = 0
            if found:
                _k, count, when = self._read(i)
                if max_age is not None and now - when > max_age:
                    count = 0
            count = max(0, count + delta)
            if found and count == 0:
                self._delete(i)
            elif found:
                self._write(i, key, count, now)
            elif count:
                if self.used.value >= self.rows * 3 // 4:
                    self._forget_oldest()
                    i, _found = self._find(key)
                self._write(i, key, count, now)
                self.used.value += 1
            return count

    def clear(self, wait: float | None = None) -> None:
        """Forget every count (TimeoutError if the lock is not had within ``wait``)."""
        with self._locked(wait):
            self._map[:] = bytes(len(self._map))
            self.used.value = 0


class WorkerCounts:
    """Open connections per client over all workers, each worker counting in a table of its
    own, which is cleared when that worker dies (its connections died with it): in one
    shared table they stayed counted against their IP until the server restarted."""

    def __init__(self, tables: Sequence[SharedCounts], mine: int) -> None:
        self.tables = tables
        self.mine = tables[mine]

    def get(self, ip: str, max_age: float | None = None, now: float | None = None) -> int:
        return sum(table.get(ip, max_age, now) for table in self.tables)

    def add(
        self, ip: str, delta: int, max_age: float | None = None, now: float | None = None
    ) -> int:
        """Add to this worker's count; the count over all workers (each read after the own
        add: two workers cannot both take the last place)."""
        self.mine.add(ip, delta, max_age, now)
        return self.get(ip, max_age, now)


class LocalCounts:
    """The same counts for one process (``workers = 1``): a dict, at a tenth of the cost."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        limit: int = 100_000,
        key: Callable[[str], bytes] = client_key,
    ) -> None:
        self._key = key
        self._clock = clock
        self._limit = limit
        self._rows: dict[bytes, tuple[int, float]] = {}

    def get(self, ip: str, max_age: float | None = None, now: float | None = None) -> int:
        return self._get(self._key(ip), max_age, now)

    def _get(self, key: bytes, max_age: float | None, now: float | None) -> int:
        row = self._rows.get(key)
        if row is None:
            return 0
        now = self._clock() if now is None else now
        if max_age is not None and now - row[1] > max_age:
            del self._rows[key]
            return 0
        return row[0]

    def add(
        self, ip: str, delta: int, max_age: float | None = None, now: float | None = None
    ) -> int:
        key = self._key(ip)
        now = self._clock() if now is None else now
        count = max(0, self._get(key, max_age, now) + delta)
        if count:
            if len(self._rows) >= self._limit and key not in self._rows:
                self._rows.clear()  # a flood of addresses: forget rather than grow
            self._rows[key] = (count, now)
        else:
            self._rows.pop(key, None)
        return count


Counts = SharedCounts | LocalCounts | WorkerCounts
