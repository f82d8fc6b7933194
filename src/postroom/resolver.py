"""Where mail for a domain goes: MX routing (RFC 5321 §5.1, RFC 7505 null MX) behind an interface.

:class:`Resolver` has one method, ``route(domain)``, answering with a :class:`Route`: either an
ordered list of :class:`Target` hosts (MX by preference, shuffled among equal preferences, each
with its A then AAAA addresses; the domain itself as the implicit MX when it has no MX records)
or a :class:`RouteFailure` carrying the enhanced status code a bounce or a deferral will report
(5.1.10 null MX, 5.1.2 no such domain, 5.4.4 no usable host, 4.4.3 DNS trouble).
:class:`DnsResolver` asks DNS through dnspython's async resolver and ``[dns] nameservers``;
:class:`StaticResolver` is the fake for tests. :func:`drop_self` applies the rule that a host
never relays to itself or to an MX no better than itself (RFC 5321 §5.1; loop -> 5.4.6).
Security notes: everything here comes from DNS, which an attacker may control, so the number of
MX hosts and addresses looked at is bounded, and names are never used as file names.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import random
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from postroom import events
from postroom.address import normalise_domain
from postroom.config import DNSConfig, Endpoint
from postroom.errors import ConfigError
from postroom.wire.replies import Reply

# Bounds on what a (possibly hostile) zone can make us do for one domain.
MAX_MX_HOSTS = 10
MAX_ADDRESSES_PER_HOST = 8

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Target:
    """One host to try: its name, its addresses in the order to try them, its MX preference."""

    host: str
    addresses: tuple[str, ...]
    preference: int = 0
    implicit: bool = False  # True for the domain's own A/AAAA (RFC 5321 §5.1 implicit MX)

    @property
    def label(self) -> str:
        """The host as replies and logs name it (:func:`host_label`)."""
        return host_label(self.host, self.addresses[0] if self.addresses else "")


def host_label(host: str, ip: str) -> str:
    """``host`` as replies and logs name it, before ``[ip]``: an address literal by its
    address, as Postfix does ("127.0.0.1[127.0.0.1]", not "[127.0.0.1][127.0.0.1]")."""
    return ip if host.startswith("[") and ip else host


@dataclass(frozen=True, slots=True)
class RouteFailure:
    """Why no target exists; ``status`` is an RFC 3463 code whose class says temporary or not."""

    status: str
    text: str

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")

    @property
    def reply(self) -> Reply:
        """The failure as an SMTP-style reply, for queue records and bounces (556 for a null
        MX: RFC 7504 §3, the code of a domain that accepts no mail)."""
        code = 556 if self.status == "5.1.10" else 550 if self.permanent else 451
        return Reply.make(code, self.status, self.text)


@dataclass(frozen=True, slots=True)
class Route:
    """The answer for one domain: ``targets`` in order, or a ``failure`` (never both).
    ``unreached``: the MX hosts left out because their addresses could not be looked up for now
    (DNS trouble), as ``(preference, host)``. (A route with any is never kept in the cache.)"""

    targets: tuple[Target, ...] = ()
    failure: RouteFailure | None = None
    unreached: tuple[tuple[int, str], ...] = ()

    @classmethod
    def fail(cls, status: str, text: str) -> Route:
        return cls((), RouteFailure(status, text))

    @property
    def ok(self) -> bool:
        return self.failure is None


class Resolver(Protocol):
    """Anything that can route a domain (the real DNS one, or a fake)."""

    async def route(self, domain: str) -> Route: ...


def literal_route(domain: str) -> Route | None:
    """``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` route to that address (RFC 5321 §4.1.3, §5.1)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        ip = ipaddress.ip_address(inner)
    except ValueError:
        return Route.fail("5.1.2", f"bad address literal {domain}")
    if not _dialable(str(ip)):  # (as an MX host's address: see _dialable)
        return Route.fail("5.1.2", f"address literal {domain} names no host to dial")
    return Route((Target(domain, (str(ip),)),))


def order_mx(records: Iterable[tuple[int, T]], rng: random.Random) -> list[tuple[int, T]]:
    """Sort (preference, host) pairs by preference, random among equal ones (RFC 5321 §5.1)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda r: r[0])  # sort is stable: ties keep the shuffled order


def async_resolver(cfg: DNSConfig) -> dns.asyncresolver.Resolver:
    """dnspython's async resolver for ``[dns] nameservers`` (else the system's) and ``timeout``."""
    if cfg.nameservers:
        res = dns.asyncresolver.Resolver(configure=False)
        res.nameservers = [
            dns.nameserver.Do53Nameserver(str(ipaddress.ip_address(host)), port)
            for host, port in cfg.nameservers
        ]
    else:
        try:
            res = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            raise ConfigError("dns: no system resolver configured; set [dns] nameservers") from None
    # Each server gets its share of the lookup's time: with the whole of it per attempt, a
    # first server that does not answer used it all, and the next was never asked.
    res.timeout = float(cfg.timeout) / max(1, len(res.nameservers))
    res.lifetime = float(cfg.timeout)
    # EDNS0 (RFC 6891) with 1,232 octets, the size that needs no IP fragmentation (DNS flag
    # day 2020): TXT answers over 512 octets (DKIM keys, SPF) come at once over UDP, not
    # truncated and asked again over TCP.
    res.use_edns(0, 0, 1232)
    return res


MAX_CNAME_HOPS = 8  # queries for one name through CNAMEs (Postfix: 10, then "name server loop")


async def resolve(
    res: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> tuple[dns.resolver.Answer, float]:
    """``res.resolve(name, rdtype)``, asked again for the name a CNAME points to when the
    server gave the CNAME without its target's records (RFC 1034 §5.3.3 step 4c: an
    authoritative-only server, a forwarder, dnslib's zone server; a recursive resolver follows
    the chain itself). Also the shortest TTL on the whole chain, which the answer's
    ``expiration`` then keeps too. The whole chain has ``res.lifetime`` (``[dns] timeout``),
    not each step. A longer chain is a temporary error, as Postfix takes it. Raises what
    ``resolve`` raises (NXDOMAIN of the name the chain ends at included: its
    ``CHAIN_TTL`` attribute is the shortest TTL of the CNAMEs before it)."""
    chain = float("inf")
    expires = float("inf")
    qname: str | dns.name.Name = name
    deadline = time.monotonic() + float(res.lifetime)
    for _ in range(MAX_CNAME_HOPS):
        left = deadline - time.monotonic()
        if left <= 0:
            raise dns.exception.Timeout(timeout=float(res.lifetime))  # type: ignore[no-untyped-call]
        try:
            with_edns = res.edns >= 0
            try:
                answer = await res.resolve(
                    qname, rdtype, search=False, raise_on_no_answer=False, lifetime=left
                )
            except dns.resolver.NoNameservers as exc:
                if not with_edns or not _refused_edns(exc):
                    raise
                # RFC 6891 §7: a server without EDNS answers FORMERR (or NOTIMP) to it; asked
                # again without, from now on (every server of the resolver: a rare old one).
                # Each query that went with it is asked again, also one a query beside it
                # already turned EDNS off for.
                res.use_edns(-1)
                left = deadline - time.monotonic()
                answer = await res.resolve(
                    qname, rdtype, search=False, raise_on_no_answer=False, lifetime=max(left, 0.1)
                )
        except dns.resolver.NXDOMAIN as exc:
            setattr(exc, CHAIN_TTL, chain)
            raise
        chain = min(chain, float(answer.chaining_result.minimum_ttl))
        expires = min(expires, answer.expiration)
        _answered_first(res, answer)
        if answer.rrset is not None or answer.canonical_name == answer.qname:
            if expires < answer.expiration:  # (a copy: dnspython may keep this one cached)
                answer = copy.copy(answer)
                answer.expiration = expires
            return answer, chain
        qname = answer.canonical_name
    too_long = f"the CNAME chain of {name} is longer than {MAX_CNAME_HOPS}"
    raise dns.exception.DNSException(too_long)  # type: ignore[no-untyped-call]


def _refused_edns(exc: dns.resolver.NoNameservers) -> bool:
    """Did a server answer FORMERR or NOTIMP (what one without EDNS says to an OPT record)?"""
    errors = exc.kwargs.get("errors") or ()
    return any(len(e) > 3 and e[3] in ("FORMERR", "NOTIMP") for e in errors)


CHAIN_TTL = "postroom_chain_ttl"
_SEEN = "postroom_seen"  # on an answer: _answered_first has looked at it


def _answered_first(res: dns.asyncresolver.Resolver, answer: dns.resolver.Answer) -> None:
    """The server that answered is asked first from now on: dnspython asks them in the listed
    order every time, so a first one that is down cost its share of ``[dns] timeout`` on
    every lookup (an SPF policy of six lookups in a row then ran out of ``check_timeout``)."""
    servers = res.nameservers
    # Only a fresh answer says who answers now: dnspython's cache hands the same object again,
    # and one kept from a server that has died since put it first again (recheck2 probe).
    if len(servers) < 2 or answer.nameserver is None or getattr(answer, _SEEN, False):
        return
    setattr(answer, _SEEN, True)
    for i, server in enumerate(servers):
        if isinstance(server, str):  # (a plain address: port 53)
            server = dns.nameserver.Do53Nameserver(server)
        if (server.answer_nameserver(), server.answer_port()) == (answer.nameserver, answer.port):
            if i:
                res.nameservers = [server, *servers[:i], *servers[i + 1 :]]
            return


# RFC 2308 §5: the longest a negative answer is kept (1-3 hours are "reasonable"), whatever
# the SOA says: a domain that did not exist yet, bounced, goes on bouncing that long.
MAX_NEGATIVE_TTL = 3600
MAX_TTL = 86400  # and any answer (a zone's TTL of 68 years kept its old MX host that long)


class _Cache(dns.resolver.LRUCache):
    """dnspython's cache, without the negative answers (NXDOMAIN, no records) that come
    without an SOA (RFC 2308 §5: they SHOULD NOT be cached; dnspython keeps them 300 s), the
    others for :data:`MAX_NEGATIVE_TTL` at most (dnspython: the SOA's minimum, a week), and
    every answer for :data:`MAX_TTL` at most (as resolvers cap them: Unbound at a day)."""

    def put(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer) -> None:
        longest = MAX_TTL
        if value.rrset is None:
            if not any(rrset.rdtype == dns.rdatatype.SOA for rrset in value.response.authority):
                return
            longest = MAX_NEGATIVE_TTL
        value.expiration = min(value.expiration, time.time() + longest)
        super().put(key, value)


class DnsResolver:
    """MX routing with dnspython's async resolver and ``[dns] nameservers``/``timeout``."""

    def __init__(
        self,
        cfg: DNSConfig,
        *,
        rng: random.Random | None = None,
        max_mx: int = MAX_MX_HOSTS,
    ) -> None:
        res = async_resolver(cfg)
        # Answers (negative ones too, for the SOA minimum: RFC 2308 §5) are kept for their TTL,
        # up to ``[dns] cache_size`` of them; failures are not kept, so a retry asks again.
        # Without it every relayed message cost three round trips (MX, A, AAAA).
        res.cache = _Cache(cfg.cache_size)
        self._res = res
        self._rng = rng or random.Random()
        self._max_mx = max_mx
        # Domain -> its route while every answer that made it lives: even from dnspython's
        # cache, the three lookups of a route cost ~100 us of CPU, for every relayed message.
        self._routes: dict[str, _Known] = {}
        self._routes_max = cfg.cache_size

    async def route(self, domain: str) -> Route:
        literal = literal_route(domain)
        if literal is not None:
            return literal
        try:
            domain = normalise_domain(domain)
        except ValueError as exc:
            return Route.fail("5.1.2", f"bad destination domain: {exc}")
        known = self._routes.get(domain)
        if known is not None:
            if time.time() < known.until:
                return known.route(self._rng)
            del self._routes[domain]
        route, until = await self._route(domain)
        if route.ok and until > time.time() and self._routes_max > 0:  # (0: keep none)
            if len(self._routes) >= self._routes_max:
                del self._routes[next(iter(self._routes))]  # the oldest
            self._routes[domain] = _Known(until, route.targets)
        return route

    async def _route(self, domain: str) -> tuple[Route, float]:
        """The route of ``domain`` from DNS, and until when it may be kept (``time.time()``:
        the first expiry of the answers that made it; 0 if it may not be kept)."""
        try:
            answer = await self._query(domain, "MX")
        except dns.resolver.NXDOMAIN:
            return Route.fail("5.1.2", f"domain {domain} does not exist (NXDOMAIN)"), 0
        except dns.exception.Timeout:
            return Route.fail("4.4.3", f"DNS time-out looking up MX for {domain}"), 0
        except dns.exception.DNSException as exc:  # SERVFAIL from every server, refused, ...
            return Route.fail("4.4.3", f"DNS failure looking up MX for {domain}: {exc}"), 0

        records = [
            (int(rr.preference), rr.exchange.to_text(omit_final_dot=True).lower())
            for rr in (answer.rrset or ())
        ]
        if not records:
            # RFC 5321 §5.1: no MX -> the domain itself is the implicit MX (A/AAAA only).
            addrs, trouble, until = await self._addresses(domain)
            if addrs:
                implicit = Target(domain, addrs, 0, implicit=True)
                return Route((implicit,)), min(until, answer.expiration)
            if trouble:
                return Route.fail("4.4.3", f"DNS failure looking up addresses of {domain}"), 0
            # RFC 3463 X.4.4: the domain exists but has no MX and no address: unable to route.
            return Route.fail("5.4.4", f"domain {domain} has no MX and no A/AAAA records"), 0

        usable = [(pref, host) for pref, host in records if host not in ("", ".")]
        if not usable:
            # RFC 7505 §3: "MX 0 ." says the domain accepts no mail at all.
            return Route.fail("5.1.10", f"domain {domain} accepts no mail (null MX, RFC 7505)"), 0
        ordered = order_mx(usable, self._rng)
        looked_up = await asyncio.gather(
            *(self._addresses(host) for _, host in ordered[: self._max_mx])
        )
        targets: list[Target] = []
        any_trouble = False
        unreached: list[tuple[int, str]] = []
        until = answer.expiration
        for (pref, host), (addrs, trouble, expires) in zip(ordered, looked_up, strict=False):
            any_trouble |= trouble
            until = min(until, expires)
            if addrs:
                targets.append(Target(host, addrs, pref))
            elif trouble:
                unreached.append((pref, host))
        if targets:
            # Kept only if every host was looked up, without trouble: the order among equal
            # preferences is drawn again for each message, from the same hosts.
            whole = not any_trouble and len(ordered) <= self._max_mx
            return Route(tuple(targets), unreached=tuple(unreached)), (until if whole else 0)
        if any_trouble:
            return Route.fail("4.4.3", f"DNS failure looking up the MX hosts of {domain}"), 0
        # RFC 5321 §5.1: MX records exist but none is usable -> report an error (no fallback to A).
        return Route.fail("5.4.4", f"no MX host of {domain} has an address"), 0

    async def _addresses(self, host: str) -> tuple[tuple[str, ...], bool, float]:
        """A then AAAA addresses of ``host``, whether a lookup failed in a temporary way, and
        when the first of the two answers expires."""
        results = await asyncio.gather(self._lookup(host, "A"), self._lookup(host, "AAAA"))
        out: list[str] = []
        trouble = False
        until = float("inf")
        for addrs, failed, expires in results:
            trouble |= failed
            until = min(until, expires)
            for a in addrs:
                if a not in out:
                    out.append(a)
        return tuple(out[:MAX_ADDRESSES_PER_HOST]), trouble, until

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer:
        """One query, counted by its result (``postroom_dns_lookups_total``)."""
        try:
            answer, _ttl = await resolve(self._res, name, rdtype)
        except dns.resolver.NXDOMAIN:
            events.dns_lookup("nxdomain")
            raise
        except dns.exception.Timeout:
            events.dns_lookup("timeout")
            raise
        except dns.exception.DNSException:
            events.dns_lookup("error")
            raise
        events.dns_lookup("ok" if answer.rrset else "nodata")
        return answer

    async def _lookup(self, host: str, rdtype: str) -> tuple[list[str], bool, float]:
        """The addresses, whether the lookup failed in a temporary way, and when the answer
        expires (0 for a failure or NXDOMAIN: a route made of one is not kept)."""
        try:
            answer = await self._query(host, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN):
            return [], False, 0.0
        except dns.exception.DNSException:
            return [], True, 0.0
        addresses = [rr.address for rr in (answer.rrset or ()) if _dialable(rr.address)]
        return addresses, False, answer.expiration


def _dialable(address: str) -> bool:
    """Whether an address from DNS names one host to dial: not "any" (0.0.0.0 and :: reach
    this host's own services), a multicast group or the broadcast address, which a hostile
    zone may give as its MX."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # (::ffff:0.0.0.0 is 0.0.0.0)
    return not (ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255")


@dataclass(frozen=True, slots=True)
class _Known:
    """A route as DNS gave it, kept by :class:`DnsResolver` until ``until`` (``time.time()``)."""

    until: float
    targets: tuple[Target, ...]

    def route(self, rng: random.Random) -> Route:
        """The route again, its MX hosts shuffled anew among equal preferences (RFC 5321 §5.1)."""
        if len(self.targets) < 2:
            return Route(self.targets)
        ordered = order_mx([(t.preference, t) for t in self.targets], rng)
        return Route(tuple(t for _p, t in ordered))


class StaticResolver:
    """A fake resolver for tests: domain -> Route (or a RouteFailure); unknown domains -> 5.1.2."""

    def __init__(self, routes: dict[str, Route | RouteFailure] | None = None) -> None:
        self.routes: dict[str, Route | RouteFailure] = dict(routes or {})
        self.queries: list[str] = []

    async def route(self, domain: str) -> Route:
        self.queries.append(domain)
        literal = literal_route(domain)
        if literal is not None:
            return literal
        found = self.routes.get(domain.lower().rstrip("."))
        if found is None:
            return Route.fail("5.1.2", f"domain {domain} does not exist (NXDOMAIN)")
        if isinstance(found, RouteFailure):
            return Route((), found)
        return found


# --- Are we the target? (RFC 5321 §5.1 loop prevention) -----------------------------------------


def _is_local_ip(ip: str) -> bool:
    """True if ``ip`` is an address of this host (binding to it succeeds only then)."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if parsed.is_loopback or parsed.is_unspecified:
        return True
    family = socket.AF_INET6 if parsed.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def unmapped(ip: str) -> str:
    """The address a connection to ``ip`` reaches: an IPv4-mapped IPv6 address
    (``::ffff:192.0.2.1``) is its IPv4 host (dialled over IPv6 it needs a dual-stack socket,
    and a ``bind_address6`` makes it unreachable); an unspecified one (``0.0.0.0``, ``::``)
    is this host's loopback, where Linux connects it."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    if parsed.is_unspecified:
        return "::1" if parsed.version == 6 else "127.0.0.1"
    return str(parsed)


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(unmapped(a)) == ipaddress.ip_address(unmapped(b))
    except ValueError:
        return False


def is_self(
    target: Target,
    *,
    hostnames: Iterable[str],
    listeners: Sequence[Endpoint],
    port: int,
) -> bool:
    """True if ``target`` is this host: its name is one of ours, or one of its addresses at
    ``port`` (the ``[delivery] port``) is one of our SMTP ``listeners``.

    The port matters: two instances on one address with different ports are not each other.
    A wildcard listener (``0.0.0.0``/``::``) covers every address bound to this host.
    """
    name = target.host.lower().rstrip(".")
    if any(name == h.lower().rstrip(".") for h in hostnames):
        return True
    for ip in map(unmapped, target.addresses):  # (a target "::" is our own ::1)
        for host, lport in listeners:
            if lport != port:
                continue
            if host in ("0.0.0.0", "::", ""):
                if _is_local_ip(ip):
                    return True
            elif _same_ip(ip, host):
                return True
    return False


def drop_self(
    route: Route,
    domain: str,
    *,
    hostnames: Iterable[str],
    listeners: Sequence[Endpoint],
    port: int,
) -> Route:
    """RFC 5321 §5.1: if we are one of the MX hosts, keep only those strictly better than us.

    If that leaves nothing (we are the best MX, or the domain's only host), the answer is a
    permanent failure 5.4.6 (routing loop); but a temporary one (4.4.3) while a better host's
    addresses could not be looked up: DNS trouble of the moment must not bounce the mail
    (as Postfix defers it: "Host not found, try again"). A host named as we are counts as us
    even when its addresses could not be looked up.
    """
    if not route.ok:
        return route
    names = {h.lower().rstrip(".") for h in hostnames}
    ours = [t for t in route.targets if is_self(t, hostnames=names, listeners=listeners, port=port)]
    unreached = [(p, h.lower().rstrip(".") in names) for p, h in route.unreached]
    prefs = [t.preference for t in ours] + [p for p, is_us in unreached if is_us]
    if not prefs:
        return route
    best_self = min(prefs)
    kept = tuple(t for t in route.targets if t.preference < best_self and t not in ours)
    if kept:  # (with the better hosts not looked up yet: they may take the message later)
        better = tuple(
            (p, h)
            for (p, h), (_, is_us) in zip(route.unreached, unreached, strict=True)
            if p < best_self and not is_us
        )
        return Route(kept, unreached=better)
    if any(p < best_self and not is_us for p, is_us in unreached):
        return Route.fail("4.4.3", f"DNS failure looking up an MX host of {domain} better than us")
    return Route.fail("5.4.6", f"mail for {domain} loops back to myself")
