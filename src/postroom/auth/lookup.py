"""The DNS every sender-authentication check goes through: async, cached, bounded.

:class:`DnsCache` asks dnspython's async resolver (``[dns] nameservers``, ``[dns] timeout``)
and keeps answers for their TTL (clamped to ``MAX_TTL``) in an LRU of at most
``[dns] cache_size`` entries. Negative answers are kept for the SOA minimum when the server
sends an SOA (RFC 2308 §5), not at all otherwise; failures (time-out, SERVFAIL) are never
kept, so a DNS outage heals as soon as the server answers again. Concurrent questions for the
same name and type share one query. :meth:`DnsCache.peek` answers from the cache alone, so a
check whose data is all cached never waits (see ``spf.py``). :meth:`DnsCache.keep` and
:meth:`DnsCache.recall` hold results computed from cached answers (an SPF verdict) for as
long as every answer they were computed from is still cached, no longer.

Security notes: everything here comes from the network: names are checked for length and
labels before they are asked, TXT answers are kept as bytes, and the cache is bounded in
entries, each of at most 64 records and 8 KiB (a larger answer is used, not kept), so that
neither a flood of distinct names nor a zone of huge answers can grow memory without limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from postroom.config import DNSConfig
from postroom.resolver import CHAIN_TTL, MAX_NEGATIVE_TTL, MAX_TTL, async_resolver, resolve

Status = Literal["ok", "nxdomain", "nodata", "error"]
# An answer larger than this is used but not kept (no real SPF, DKIM or DMARC record comes near).
MAX_CACHED_RECORDS = 64
MAX_CACHED_OCTETS = 8 << 10
RDTYPES = ("A", "AAAA", "MX", "PTR", "TXT", "SPF")


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer. ``records``: A/AAAA address strings, MX ``(preference, host)``, PTR host
    names (lower case, no final dot), TXT/SPF tuples of byte strings (one per string)."""

    status: Status
    records: tuple[Any, ...] = ()
    error: str = ""

    @property
    def void(self) -> bool:
        """RFC 7208 §4.6.4: a lookup that found nothing (NXDOMAIN or no records)."""
        return self.status in ("nxdomain", "nodata") or (self.status == "ok" and not self.records)

    @property
    def temporary(self) -> bool:
        return self.status == "error"

    def txt(self) -> list[bytes]:
        """TXT records, the strings of each joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return [b"".join(parts) for parts in self.records] if self.status == "ok" else []


def normalise(name: str) -> str | None:
    """Lower case without the final dot; None for a name DNS cannot carry."""
    name = name.rstrip(".").lower()
    if not name or len(name) > 253:
        return None
    if any(not 0 < len(label) < 64 for label in name.split(".")):
        return None
    return name


def _convert(rdtype: str, rdata: Any) -> Any:
    if rdtype in ("A", "AAAA"):
        return rdata.address
    if rdtype == "MX":
        return (int(rdata.preference), rdata.exchange.to_text(omit_final_dot=True).lower())
    if rdtype == "PTR":
        return rdata.target.to_text(omit_final_dot=True).lower()
    return tuple(rdata.strings)  # TXT, SPF


def _negative_ttl(response: Any) -> float:
    """RFC 2308 §5: the SOA's minimum (capped by its TTL); 0 (not cached) without an SOA."""
    for rrset in getattr(response, "authority", ()) or ():
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum, MAX_NEGATIVE_TTL))
    return 0.0


K = TypeVar("K")
V = TypeVar("V")


def _get(lru: OrderedDict[K, tuple[float, V]], key: K, now: float) -> V | None:
    """The value kept under ``key`` until its expiry (then dropped), as most recently used."""
    entry = lru.get(key)
    if entry is None:
        return None
    if entry[0] <= now:
        del lru[key]
        return None
    lru.move_to_end(key)
    return entry[1]


def _small(answer: Answer) -> bool:
    """Whether ``answer`` may be kept: the cache is bounded in entries, so an entry must be
    bounded too (a hostile zone's TXT sets made 92 KB entries: 0.9 GB for 10,000)."""
    records = answer.records
    if len(records) > MAX_CACHED_RECORDS:
        return False
    size = 0
    for record in records:
        if isinstance(record, tuple):  # TXT strings, or an MX (preference, host)
            size += sum(len(part) for part in record if isinstance(part, bytes | str))
        else:
            size += len(record)
    return size <= MAX_CACHED_OCTETS


def _put(lru: OrderedDict[K, tuple[float, V]], key: K, until: float, value: V, size: int) -> None:
    """Keep ``value`` under ``key`` until ``until``, dropping the least recently used beyond
    ``size`` entries."""
    lru[key] = (until, value)
    lru.move_to_end(key)
    while len(lru) > size:
        lru.popitem(last=False)


class DnsCache:
    """Cached async lookups shared by the SPF, DKIM and DMARC checks and the key publisher."""

    def __init__(
        self,
        cfg: DNSConfig,
        *,
        size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        self._res = resolver or async_resolver(cfg)
        self._res.cache = None  # this class is the cache
        self._size = max(1, size)
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, Answer]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[Answer]] = {}
        self._derived: OrderedDict[object, tuple[float, object]] = OrderedDict()
        self.queries = 0  # answers asked of the network (for tests and metrics)

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, name: str, rdtype: str) -> Answer | None:
        """The cached answer, or None when it must be asked (without waiting)."""
        norm = normalise(name)
        if norm is None:
            return Answer("nxdomain")
        return _get(self._entries, (norm, rdtype), self._clock())

    def keep(self, key: object, value: object, sources: Iterable[tuple[str, str]]) -> None:
        """Hold ``value``, computed from the cached answers ``sources`` ((name, type), names
        normalised), until the first of them expires; nothing if one is not cached."""
        now = self._clock()
        until = float("inf")
        for source in sources:
            entry = self._entries.get(source)
            if entry is None or entry[0] <= now:
                return
            until = min(until, entry[0])
        _put(self._derived, key, until, value, self._size)

    def recall(self, key: object) -> object | None:
        """What :meth:`keep` holds for ``key`` while its sources are valid, else None."""
        return _get(self._derived, key, self._clock())

    async def query(self, name: str, rdtype: str, *, fresh: bool = False) -> Answer:
        """The answer for ``name``/``rdtype``; ``fresh`` skips (and refreshes) the cache."""
        assert rdtype in RDTYPES, rdtype
        norm = normalise(name)
        if norm is None:
            return Answer("nxdomain")
        key = (norm, rdtype)
        if not fresh:
            cached = _get(self._entries, key, self._clock())
            if cached is not None:
                return cached
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            answer, ttl = await self._ask(norm, rdtype)
        except BaseException as exc:  # cancelled: whoever shares the query learns it too
            if not future.done():
                future.set_result(Answer("error", error=f"lookup abandoned: {exc!r}"))
            raise
        finally:
            self._inflight.pop(key, None)
        if ttl > 0 and _small(answer):
            self._store(key, answer, ttl)
        if not future.done():
            future.set_result(answer)
        return answer

    def _store(self, key: tuple[str, str], answer: Answer, ttl: float) -> None:
        _put(self._entries, key, self._clock() + min(ttl, MAX_TTL), answer, self._size)

    async def _ask(self, name: str, rdtype: str) -> tuple[Answer, float]:
        self.queries += 1
        try:
            result, chain = await resolve(self._res, name, rdtype)
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.kwargs.get("responses", {}).values())
            ttl = _negative_ttl(responses[0]) if responses else 0.0
            # (through CNAMEs: no longer than the shortest of them)
            return Answer("nxdomain"), min(ttl, getattr(exc, CHAIN_TTL, ttl))
        except dns.resolver.YXDOMAIN:
            return Answer("nxdomain"), 0.0
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel):
            return Answer("nxdomain"), 0.0
        except dns.exception.Timeout:
            return Answer("error", error=f"DNS time-out for {name}/{rdtype}"), 0.0
        except dns.exception.DNSException as exc:  # SERVFAIL or refused from every server
            return Answer("error", error=f"DNS failure for {name}/{rdtype}: {exc}"), 0.0
        rrset = result.rrset
        # Through a CNAME, the answer lasts as long as the shortest TTL on the way to it (for
        # no data, the SOA's minimum with it).
        if rrset is None:
            return Answer("nodata"), min(_negative_ttl(result.response), chain)
        records = tuple(_convert(rdtype, rd) for rd in rrset)
        return Answer("ok", records), min(float(rrset.ttl), chain)
