"""MX routing against a real DNS server (dnslib) on 127.0.0.1, plus the fake and the loop rules."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dns.resolver
import pytest
from dnslib import AAAA, MX, QTYPE, RCODE, RR, SOA, A, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from postroom.config import DNSConfig, Duration
from postroom.resolver import (
    DnsResolver,
    Route,
    RouteFailure,
    StaticResolver,
    Target,
    drop_self,
    is_self,
    order_mx,
)

ZONE: dict[str, list[tuple[str, Any]]] = {
    "ordered.test": [("MX", MX("mx20.ordered.test", 20)), ("MX", MX("mx10.ordered.test", 10))],
    "mx10.ordered.test": [("A", A("127.0.0.10")), ("AAAA", AAAA("::1"))],
    "mx20.ordered.test": [("A", A("127.0.0.20"))],
    "equal.test": [("MX", MX("one.equal.test", 10)), ("MX", MX("two.equal.test", 10))],
    "one.equal.test": [("A", A("127.0.1.1"))],
    "two.equal.test": [("A", A("127.0.1.2"))],
    "plain.test": [("A", A("127.0.2.1")), ("AAAA", AAAA("::1"))],
    "nullmx.test": [("MX", MX(".", 0))],
    "empty.test": [("TXT", None)],
    "dangling.test": [("MX", MX("nowhere.dangling.test", 10))],
    "partial.test": [("MX", MX("gone.partial.test", 5)), ("MX", MX("mx.partial.test", 10))],
    "mx.partial.test": [("A", A("127.0.3.1"))],
    "broken-mx.test": [("MX", MX("fail.test", 10))],
}
SERVFAIL = {"fail.test"}
SILENT = {"slow.test"}
WITH_SOA = {"later-soa.test"}  # negative answers for these come with an SOA (RFC 2308 §3)
FOR_EVER = {"forever.test", "mx.forever.test"}  # answered with the largest TTL there is
ZONE["forever.test"] = [("MX", MX("mx.forever.test", 10))]
ZONE["mx.forever.test"] = [("A", A("127.0.6.1"))]
# MX hosts a hostile zone names: "any" (this host's own services), multicast, broadcast.
ZONE["nowhere.test"] = [("MX", MX("any.nowhere.test", 10)), ("MX", MX("some.nowhere.test", 20))]
ZONE["any.nowhere.test"] = [("A", A("0.0.0.0")), ("A", A("224.0.0.1")), ("AAAA", AAAA("::"))]
ZONE["some.nowhere.test"] = [
    ("A", A("255.255.255.255")),
    ("A", A("127.0.6.2")),
    ("AAAA", AAAA("::ffff:0:0")),  # (::ffff:0.0.0.0)
    ("AAAA", AAAA("ff02::1")),
]


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if qname in SILENT:
            raise DNSError("no answer: simulated time-out")  # dnslib then sends nothing
        if qname in SERVFAIL:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if qname not in ZONE:
            reply.header.rcode = RCODE.NXDOMAIN
            if qname in WITH_SOA:
                soa = SOA("ns.test", "admin.test", (1, 60, 60, 60, 604800))  # a week
                reply.add_auth(RR("test", QTYPE.SOA, rdata=soa, ttl=604800))
            return reply
        for rtype, rdata in ZONE[qname]:
            if rtype == qtype and rdata is not None:
                ttl = 2**31 - 1 if qname in FOR_EVER else 60
                reply.add_answer(RR(qname, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
        return reply


@pytest.fixture(scope="module")
def dns_port() -> Iterator[int]:
    server = DNSServer(
        ZoneResolver(), port=0, address="127.0.0.1", logger=DNSLogger(logf=lambda _msg: None)
    )
    server.start_thread()
    try:
        yield int(server.server.server_address[1])
    finally:
        server.stop()
        server.server.server_close()


def route(port: int, domain: str, seed: int = 1, timeout: float = 2.0) -> Route:
    cfg = DNSConfig(nameservers=(("127.0.0.1", port),), timeout=Duration(timeout))
    return asyncio.run(DnsResolver(cfg, rng=random.Random(seed)).route(domain))


def test_mx_preference_order_with_a_and_aaaa(dns_port: int) -> None:
    r = route(dns_port, "ordered.test")
    assert r.ok
    assert [t.host for t in r.targets] == ["mx10.ordered.test", "mx20.ordered.test"]
    assert r.targets[0].addresses == ("127.0.0.10", "::1")  # A first, then AAAA
    assert [t.preference for t in r.targets] == [10, 20]


def test_equal_preference_is_random_but_seeded(dns_port: int) -> None:
    orders = {
        tuple(t.host for t in route(dns_port, "equal.test", seed).targets) for seed in range(20)
    }
    assert orders == {("one.equal.test", "two.equal.test"), ("two.equal.test", "one.equal.test")}
    assert route(dns_port, "equal.test", 7) == route(dns_port, "equal.test", 7)


def test_no_mx_uses_the_domain_itself(dns_port: int) -> None:
    r = route(dns_port, "PLAIN.test.")
    assert r.targets == (Target("plain.test", ("127.0.2.1", "::1"), 0, implicit=True),)


def test_a_domain_missing_without_an_soa_is_asked_for_again(dns_port: int) -> None:
    """RFC 2308 §5: a negative answer without an SOA SHOULD NOT be cached; dnspython kept it
    300 s, and a domain added to DNS after a bounce went on bouncing (accounts probe). One
    with an SOA is kept for its minimum."""

    kept: list[float] = []  # how long the negative answers are kept, in seconds

    async def twice(domain: str) -> tuple[Route, Route]:
        cfg = DNSConfig(nameservers=(("127.0.0.1", dns_port),), timeout=Duration(2))
        resolver = DnsResolver(cfg, rng=random.Random(1))
        first = await resolver.route(domain)
        cache = resolver._res.cache
        assert isinstance(cache, dns.resolver.LRUCache)
        kept.extend(node.value.expiration - time.time() for node in cache.data.values())
        ZONE[domain] = [("A", A("127.0.9.9"))]
        try:
            return first, await resolver.route(domain)
        finally:
            del ZONE[domain]

    first, then = asyncio.run(twice("later.test"))
    assert first.failure is not None and first.failure.status == "5.1.2"
    assert then.ok and then.targets[0].addresses == ("127.0.9.9",)
    assert kept == []
    first, then = asyncio.run(twice("later-soa.test"))
    assert first.failure is not None and then.failure is not None  # kept, for an hour at most
    assert kept and all(3500 < seconds <= 3600 for seconds in kept), kept


def test_no_answer_is_kept_longer_than_a_day(dns_port: int) -> None:
    """A zone's TTL of 68 years kept its MX host's old address that long (dnshostile probe)."""

    async def kept() -> list[float]:
        cfg = DNSConfig(nameservers=(("127.0.0.1", dns_port),), timeout=Duration(2))
        resolver = DnsResolver(cfg, rng=random.Random(1))
        assert (await resolver.route("forever.test")).ok
        cache = resolver._res.cache
        assert isinstance(cache, dns.resolver.LRUCache)
        answers = [node.value.expiration for node in cache.data.values()]
        return [t - time.time() for t in (*answers, resolver._routes["forever.test"].until)]

    *answers, route_kept = asyncio.run(kept())
    assert len(answers) == 2 and all(86000 < s <= 86400 for s in answers), answers  # MX, A
    assert route_kept <= 86400  # (300 s here: the AAAA's "none", which has no SOA)


def test_an_address_that_is_no_host_to_dial_is_left_out(dns_port: int) -> None:
    """0.0.0.0 and :: reach this host's own services; multicast and broadcast no MX host."""
    r = route(dns_port, "nowhere.test")
    assert [(t.host, t.addresses) for t in r.targets] == [("some.nowhere.test", ("127.0.6.2",))]


def test_null_mx(dns_port: int) -> None:
    r = route(dns_port, "nullmx.test")
    assert r.failure is not None
    assert r.failure.status == "5.1.10"
    assert r.failure.permanent


def test_nxdomain(dns_port: int) -> None:
    r = route(dns_port, "nope.test")
    assert r.failure is not None
    assert r.failure.status == "5.1.2"
    assert r.failure.reply.code == 550


def test_servfail_is_temporary(dns_port: int) -> None:
    r = route(dns_port, "fail.test")
    assert r.failure is not None
    assert r.failure.status == "4.4.3"
    assert not r.failure.permanent
    assert r.failure.reply.is_transient


def test_timeout_is_temporary(dns_port: int) -> None:
    r = route(dns_port, "slow.test", timeout=0.3)
    assert r.failure is not None
    assert r.failure.status == "4.4.3"


def test_exists_without_mx_or_address(dns_port: int) -> None:
    r = route(dns_port, "empty.test")
    assert r.failure is not None
    assert r.failure.status == "5.4.4"


def test_mx_without_address(dns_port: int) -> None:
    r = route(dns_port, "dangling.test")
    assert r.failure is not None
    assert r.failure.status == "5.4.4"


def test_unresolvable_mx_is_skipped(dns_port: int) -> None:
    r = route(dns_port, "partial.test")
    assert [t.host for t in r.targets] == ["mx.partial.test"]


def test_mx_host_servfail_is_temporary(dns_port: int) -> None:
    r = route(dns_port, "broken-mx.test")
    assert r.failure is not None
    assert r.failure.status == "4.4.3"


def test_address_literals() -> None:
    cfg = DNSConfig(nameservers=(("127.0.0.1", 9),))
    res = DnsResolver(cfg)
    r = asyncio.run(res.route("[127.0.0.5]"))
    assert r.targets == (Target("[127.0.0.5]", ("127.0.0.5",)),)
    r = asyncio.run(res.route("[IPv6:::1]"))
    assert r.targets[0].addresses == ("::1",)
    bad = asyncio.run(res.route("[999.1.1.1]"))
    assert bad.failure is not None
    assert bad.failure.permanent
    # No host to dial, as an MX host's address would not be (recheck3 probe: dialled).
    for literal in (
        "[0.0.0.0]",
        "[IPv6:::]",
        "[IPv6:::ffff:0.0.0.0]",
        "[224.0.0.1]",
        "[IPv6:ff02::1]",
        "[255.255.255.255]",
    ):
        nowhere = asyncio.run(res.route(literal))
        assert nowhere.failure is not None and nowhere.failure.status == "5.1.2", literal


def test_order_mx_is_stable_by_preference() -> None:
    got = order_mx([(20, "c"), (10, "a"), (10, "b"), (0, "z")], random.Random(3))
    assert [p for p, _ in got] == [0, 10, 10, 20]


def test_static_resolver() -> None:
    t = Target("mx.b.test", ("127.0.0.2",))
    res = StaticResolver({"b.test": Route((t,)), "gone.test": RouteFailure("4.4.3", "dns down")})
    assert asyncio.run(res.route("B.test")).targets == (t,)
    gone = asyncio.run(res.route("gone.test"))
    assert gone.failure == RouteFailure("4.4.3", "dns down")
    unknown = asyncio.run(res.route("x.test"))
    assert unknown.failure is not None
    assert unknown.failure.status == "5.1.2"
    assert res.queries == ["B.test", "gone.test", "x.test"]


def test_is_self_by_name_and_by_listener() -> None:
    t = Target("MX.A.test.", ("127.0.0.9",))
    assert is_self(t, hostnames=["mx.a.test"], listeners=[], port=25)
    other = Target("mx.b.test", ("127.0.0.2",))
    assert is_self(other, hostnames=["mx.a.test"], listeners=[("127.0.0.2", 25)], port=25)
    # Same address, different port: another instance, not us.
    assert not is_self(other, hostnames=["mx.a.test"], listeners=[("127.0.0.2", 2525)], port=25)
    assert is_self(other, hostnames=[], listeners=[("0.0.0.0", 25)], port=25)
    assert not is_self(
        Target("x", ("192.0.2.77",)), hostnames=[], listeners=[("0.0.0.0", 25)], port=25
    )
    # An MX at "::" or "0.0.0.0" is this host's loopback, where a connection to it goes: it
    # was dialled, and our own listener's "Relay access denied" bounced the mail (ipv6 probe).
    for ip, listener in (("::", "::1"), ("0.0.0.0", "127.0.0.1"), ("::ffff:0.0.0.0", "127.0.0.1")):
        assert is_self(Target("x", (ip,)), hostnames=[], listeners=[(listener, 25)], port=25)
    assert is_self(
        Target("x", ("::ffff:127.0.0.2",)), hostnames=[], listeners=[("127.0.0.2", 25)], port=25
    )


def seen_from_a_test(route: Route, domain: str) -> Route:
    """``route`` as seen from the host named mx.a.test (drop_self)."""
    return drop_self(route, domain, hostnames=["mx.a.test"], listeners=[], port=25)


def test_drop_self_keeps_better_mx_only() -> None:
    better = Target("mx1.b.test", ("127.0.0.2",), 10)
    us = Target("mx.a.test", ("127.0.0.1",), 20)
    worse = Target("mx3.b.test", ("127.0.0.3",), 30)
    r = seen_from_a_test(Route((better, us, worse)), "b.test")
    assert r.targets == (better,)
    loop = seen_from_a_test(Route((us, worse)), "b.test")
    assert loop.failure is not None
    assert loop.failure.status == "5.4.6"
    assert loop.failure.permanent
    assert "mail for b.test loops back to myself" in loop.failure.text
    untouched = Route((better,))
    assert seen_from_a_test(untouched, "b.test") is untouched
    # The better hosts not looked up for now stay known (the worse ones and we do not): a
    # 5xx greeting from the better host that answered bounced while they might take it
    # (recheck probe).
    dead = ((5, "dead1.b.test"), (15, "dead2.b.test"), (25, "dead3.b.test"), (20, "mx.a.test"))
    r = seen_from_a_test(Route((better, us, worse), unreached=dead), "b.test")
    assert r.targets == (better,) and r.unreached == ((5, "dead1.b.test"), (15, "dead2.b.test"))


def test_a_better_mx_host_not_looked_up_for_now_defers_instead_of_a_loop(dns_port: int) -> None:
    # We are the backup MX and the primary's address lookup failed for now: try again later,
    # never bounce as a routing loop (5.4.6).
    ZONE["backup.test"] = [("MX", MX("fail.test", 10)), ("MX", MX("mx.partial.test", 20))]
    try:
        got = route(dns_port, "backup.test")
    finally:
        del ZONE["backup.test"]
    assert [t.host for t in got.targets] == ["mx.partial.test"]
    assert got.unreached == ((10, "fail.test"),)
    deferred = drop_self(got, "backup.test", hostnames=["mx.partial.test"], listeners=[], port=25)
    assert deferred.failure is not None
    assert deferred.failure.status == "4.4.3"
    assert not deferred.failure.permanent
    # A host no better than us that could not be looked up changes nothing: still a loop.
    worse = Route(got.targets, unreached=((30, "mx.other.test"),))
    loop = drop_self(worse, "backup.test", hostnames=["mx.partial.test"], listeners=[], port=25)
    assert loop.failure is not None
    assert loop.failure.status == "5.4.6"
    assert loop.failure.text == "mail for backup.test loops back to myself"


def test_our_own_mx_host_not_looked_up_still_counts_as_us() -> None:
    # MX 20 is us by name but its addresses could not be looked up: the worse MX 30 must not
    # get the mail (it would send it back to us, RFC 5321 §5.1).
    worse = Target("mx30.b.test", ("127.0.0.3",), 30)
    alone = Route((worse,), unreached=((20, "mx.a.test"),))
    loop = seen_from_a_test(alone, "b.test")
    assert loop.failure is not None and loop.failure.status == "5.4.6"
    primary_too = Route((worse,), unreached=((10, "mx10.b.test"), (20, "MX.A.test")))
    deferred = seen_from_a_test(primary_too, "b.test")
    assert deferred.failure is not None and deferred.failure.status == "4.4.3"
    assert "b.test" in deferred.failure.text


def test_answers_are_kept_for_their_ttl() -> None:
    """A second route to the same domain asks DNS nothing while the answers live (TTL 1 s
    here), and asks again once they expired."""
    import time

    from tests.dnszone import LoopbackDNS

    dns_server = LoopbackDNS()
    try:
        dns_server.mx("cached.test", 10, "mx.cached.test")
        dns_server.a("mx.cached.test", "192.0.2.7")
        cfg = DNSConfig(nameservers=((dns_server.address, dns_server.port),), timeout=Duration(2))
        resolver = DnsResolver(cfg, rng=random.Random(1))

        async def twice() -> tuple[Route, Route]:
            first = await resolver.route("cached.test")
            dns_server.remove("mx.cached.test", "A")
            dns_server.a("mx.cached.test", "192.0.2.8")
            return first, await resolver.route("cached.test")

        first, second = asyncio.run(twice())
        assert first.targets[0].addresses == ("192.0.2.7",) == second.targets[0].addresses
        time.sleep(1.1)
        assert asyncio.run(resolver.route("cached.test")).targets[0].addresses == ("192.0.2.8",)
    finally:
        dns_server.stop()


def test_a_kept_route_shuffles_equal_preferences_anew(dns_port: int) -> None:
    # Kept routes are not frozen in the order of the first message: equal-preference MX
    # hosts share the load (RFC 5321 §5.1) whether the route came from DNS or was kept.
    cfg = DNSConfig(nameservers=(("127.0.0.1", dns_port),), timeout=Duration(2))
    resolver = DnsResolver(cfg, rng=random.Random(5))

    async def firsts() -> set[str]:
        return {(await resolver.route("equal.test")).targets[0].host for _ in range(40)}

    assert asyncio.run(firsts()) == {"one.equal.test", "two.equal.test"}
    assert list(resolver._routes) == ["equal.test"]


def test_a_route_with_dns_trouble_is_not_kept(dns_port: int) -> None:
    # An MX host whose lookup failed for now is left out of this route only: the next
    # message asks DNS again rather than skip that host for the answers' whole TTL.
    cfg = DNSConfig(nameservers=(("127.0.0.1", dns_port),), timeout=Duration(2))
    resolver = DnsResolver(cfg)
    ZONE["flaky.test"] = [("MX", MX("fail.test", 5)), ("MX", MX("mx.partial.test", 10))]
    try:
        got = asyncio.run(resolver.route("flaky.test"))
    finally:
        del ZONE["flaky.test"]
    assert [t.host for t in got.targets] == ["mx.partial.test"]
    assert resolver._routes == {}


def test_a_dead_first_nameserver_leaves_time_for_the_next(dns_port: int) -> None:
    """Each server gets its share of the time: the first one's single try used all of it,
    and one dead resolver stopped all outbound mail and all sender checks."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.1", 0))  # takes the queries, answers none
        cfg = DNSConfig(
            nameservers=(("127.0.0.1", dead.getsockname()[1]), ("127.0.0.1", dns_port)),
            timeout=Duration(2.0),
        )
        r = asyncio.run(DnsResolver(cfg, rng=random.Random(1)).route("ordered.test"))
    assert r.failure is None and r.targets[0].host == "mx10.ordered.test"


def test_a_cache_of_size_0_keeps_no_route_and_still_routes(dns_port: int) -> None:
    # The config takes cache_size = 0: every route then evicted "the oldest" of an empty
    # dict, and each remote delivery died of StopIteration until its message expired.
    cfg = DNSConfig(nameservers=(("127.0.0.1", dns_port),), timeout=Duration(2), cache_size=0)
    resolver = DnsResolver(cfg, rng=random.Random(1))
    got = asyncio.run(resolver.route("ordered.test"))
    assert got.ok and resolver._routes == {}


def test_a_cname_given_without_its_target_is_followed() -> None:
    """A server that answers with the CNAME alone (authoritative-only, a forwarder, dnslib's
    zone server) is asked again for its target (RFC 1034 §5.3.3), for the route and for the
    checks' lookups alike: the domain bounced "has no MX and no A/AAAA records" (5.4.4), a
    DKIM key behind a CNAME was a permerror (dnswire probe). A chain that does not end is a
    temporary failure."""
    from postroom.auth.lookup import DnsCache
    from tests.dnszone import LoopbackDNS

    dns_server = LoopbackDNS()
    try:
        dns_server.chase_cnames = False
        dns_server.cname("alias.test", "real.test")
        dns_server.mx("real.test", 10, "mx.alias.test")
        dns_server.cname("mx.alias.test", "host.real.test")
        dns_server.a("host.real.test", "192.0.2.9")
        dns_server.cname("k._domainkey.alias.test", "k.keys.test")
        dns_server.cname("k.keys.test", "k2.keys.test")
        dns_server.txt("k2.keys.test", "v=DKIM1; p=")
        dns_server.cname("loop1.test", "loop2.test")
        dns_server.cname("loop2.test", "loop1.test")
        cfg = DNSConfig(nameservers=((dns_server.address, dns_server.port),), timeout=Duration(2))
        found = asyncio.run(DnsResolver(cfg, rng=random.Random(1)).route("alias.test"))
        assert [(t.host, t.addresses) for t in found.targets] == [("mx.alias.test", ("192.0.2.9",))]
        loop = asyncio.run(DnsResolver(cfg).route("loop1.test"))
        assert loop.failure is not None and not loop.failure.permanent

        async def ask(name: str, rdtype: str) -> Any:
            return await DnsCache(cfg).query(name, rdtype)

        key = asyncio.run(ask("k._domainkey.alias.test", "TXT"))
        assert key.status == "ok" and key.txt() == [b"v=DKIM1; p="]
        assert asyncio.run(ask("loop1.test", "TXT")).status == "error"
    finally:
        dns_server.stop()


def test_a_dead_first_nameserver_is_asked_last_once_another_answered() -> None:
    """dnspython asks the servers in the listed order every time: a first one that is down
    cost its share of the time-out on every lookup (dnswire probe: an SPF policy of six
    lookups in a row ran out of check_timeout). The one that answered now goes first."""
    import socket
    import time

    from postroom.auth.lookup import DnsCache
    from tests.dnszone import LoopbackDNS

    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    dead.bind(("127.0.0.1", 0))
    dns_server = LoopbackDNS()
    try:
        dns_server.mx("first.test", 10, "mx.first.test")
        dns_server.a("mx.first.test", "192.0.2.1")
        dns_server.txt("first.test", "v=spf1 -all")
        dns_server.txt("second.test", "v=spf1 -all")
        servers = (("127.0.0.1", dead.getsockname()[1]), (dns_server.address, dns_server.port))
        cfg = DNSConfig(nameservers=servers, timeout=Duration(1))

        async def timed(lookup: Any) -> float:
            start = time.monotonic()
            await lookup
            return time.monotonic() - start

        async def lookups() -> list[float]:
            cache = DnsCache(cfg)
            router = DnsResolver(cfg)
            return [
                await timed(cache.query("first.test", "TXT")),
                await timed(cache.query("second.test", "TXT")),
                await timed(router.route("first.test")),
            ]

        first, second, route = asyncio.run(lookups())
        assert first >= 0.4 and second < 0.3, (first, second)
        assert route < 0.8  # its MX lookup waited once; its address lookups did not
    finally:
        dns_server.stop()
        dead.close()


def test_an_answer_from_the_cache_does_not_put_its_server_first_again() -> None:
    """dnspython's cache hands the same answer again: one kept from a server that has died
    since put that server back in front, and each lookup waited for it again (recheck2
    probe: 10 re-routes took 20 s)."""
    from postroom.resolver import async_resolver, resolve
    from tests.dnszone import LoopbackDNS

    first, second = LoopbackDNS(), LoopbackDNS()
    try:
        for server in (first, second):
            server.txt("kept.test", "v=spf1 -all")
            server.ttl("kept.test", "TXT", 60)
            server.txt("other.test", "v=spf1 -all")
        cfg = DNSConfig(
            nameservers=((first.address, first.port), (second.address, second.port)),
            timeout=Duration(1),
        )
        res = async_resolver(cfg)
        res.cache = dns.resolver.LRUCache(100)

        async def lookups() -> None:
            await resolve(res, "kept.test", "TXT")  # from the first, kept
            first.timeout("other.test", "TXT")  # (the first stops answering)
            await resolve(res, "other.test", "TXT")  # from the second: it goes first
            await resolve(res, "kept.test", "TXT")  # from the cache

        asyncio.run(lookups())
        assert res.nameservers[0].answer_port() == second.port  # type: ignore[union-attr]
    finally:
        first.stop()
        second.stop()


@contextlib.contextmanager
def udp_dns(answer: Callable[[DNSRecord], bytes]) -> Iterator[DNSConfig]:
    """A UDP-only DNS server on 127.0.0.1 (no TCP beside it) whose replies ``answer`` makes
    from each query; the config that points at it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            sock.sendto(answer(DNSRecord.parse(data)), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield DNSConfig(nameservers=(("127.0.0.1", sock.getsockname()[1]),), timeout=Duration(2))
    finally:
        stop.set()
        thread.join()
        sock.close()


def _offered(request: DNSRecord) -> int | None:
    """The UDP payload size a query offers with EDNS0, None without."""
    sizes = [rr.rclass for rr in request.ar if rr.rtype == QTYPE.OPT]
    return sizes[0] if sizes else None


def test_queries_offer_edns0_so_a_long_txt_comes_over_udp() -> None:
    """A 2,048-bit DKIM key or a long SPF record is more than 512 octets: a client without
    EDNS0 (RFC 6891) gets it truncated and must ask again over TCP, which some servers and
    firewalls do not take. The server here answers only over UDP, and only a query that
    offers a payload size of at least the answer's."""
    from dnslib import EDNS0, TXT

    from postroom.auth.lookup import DnsCache

    value = b"v=DKIM1; k=rsa; p=" + b"A" * 900
    sizes: list[int] = []

    def answer(request: DNSRecord) -> bytes:
        offered = _offered(request)
        sizes.append(offered or 512)
        reply = request.reply()
        strings = [value[i : i + 255] for i in range(0, len(value), 255)]
        reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(strings), ttl=60))
        if offered:
            reply.add_ar(EDNS0(udp_len=offered))
        packed: bytes = reply.pack()
        if len(packed) > sizes[-1]:
            reply = request.reply()
            reply.header.tc = 1
            packed = reply.pack()
        return packed

    with udp_dns(answer) as cfg:
        found = asyncio.run(DnsCache(cfg).query("k._domainkey.long.test", "TXT"))
    assert found.status == "ok" and found.txt() == [value]
    assert sizes[0] == 1232


def test_a_server_without_edns_is_asked_again_without_it() -> None:
    """An old server answers FORMERR to a query with an OPT record (RFC 6891 §7): every
    lookup through it failed (spf, dkim, dmarc temperror; recheck probe). The query goes
    again without EDNS, and the resolver asks without it from then on."""
    from dnslib import TXT

    from postroom.auth.lookup import DnsCache

    seen: list[bool] = []

    def answer(request: DNSRecord) -> bytes:
        with_edns = _offered(request) is not None
        seen.append(with_edns)
        reply = request.reply()
        if with_edns:
            reply.header.rcode = RCODE.FORMERR
        else:
            reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT("v=spf1 -all"), ttl=60))
        packed: bytes = reply.pack()
        return packed

    with udp_dns(answer) as cfg:
        cache = DnsCache(cfg)

        async def two() -> list[Any]:
            return [await cache.query(name, "TXT") for name in ("one.test", "two.test")]

        first, second = asyncio.run(two())
        assert first.status == second.status == "ok"
        assert first.txt() == second.txt() == [b"v=spf1 -all"]
        assert seen == [True, False, False]
        # Side by side: the second query's FORMERR came after the first had turned EDNS off;
        # it was not asked again, and failed (recheck2 probe).
        seen.clear()
        fresh = DnsCache(cfg)

        async def together() -> list[Any]:
            names = ("three.test", "four.test", "five.test")
            return list(await asyncio.gather(*(fresh.query(n, "TXT") for n in names)))

        assert [a.status for a in asyncio.run(together())] == ["ok"] * 3
        assert seen.count(True) == 3 and seen.count(False) == 3
