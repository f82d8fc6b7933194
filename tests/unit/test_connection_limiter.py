"""ConnectionLimiter: per-IP limits, exempt networks (answered once per address), and a reload
that changes those networks taking effect for addresses already seen."""

from __future__ import annotations

import ipaddress
import logging
import resource

import pytest

from postroom.config import Config, LimitsConfig
from postroom.services import ConnectionLimiter


class Conn:
    def close(self) -> None:
        pass


def test_exempt_networks_follow_a_reload() -> None:
    limiter = ConnectionLimiter(100, 1, (ipaddress.ip_network("127.0.0.0/8"),))
    held = [Conn() for _ in range(3)]
    assert all(limiter.acquire("127.0.0.5", c) for c in held)  # exempt: no per-IP limit
    for c in held:
        limiter.release("127.0.0.5", c)
    limiter.set_exempt(())  # what a reload does
    first, second = Conn(), Conn()
    assert limiter.acquire("127.0.0.5", first)
    assert not limiter.acquire("127.0.0.5", second)  # counted now: one per IP
    assert limiter.acquire("192.0.2.1", second)


def test_a_limit_set_by_a_reload_counts_the_connections_already_open() -> None:
    """Connections let in while no per-IP limit applied (0, or an exempt address) were never
    counted: after a reload that set a limit of 2, a client holding 5 could open 2 more."""
    for limit, exempt in ((0, (ipaddress.ip_network("192.0.2.0/24"),)), (0, ()), (2, ())):
        limiter = ConnectionLimiter(100, limit, exempt)
        held = [Conn() for _ in range(5)]
        if limit:  # the exempt network is what a reload takes away
            limiter.set_exempt((ipaddress.ip_network("192.0.2.0/24"),))
        assert all(limiter.acquire("192.0.2.1", c) for c in held)
        limiter.max_per_ip = 2  # what a reload does
        limiter.set_exempt(())
        assert not limiter.acquire("192.0.2.1", Conn())
        for c in held[:4]:
            limiter.release("192.0.2.1", c)
        assert limiter.acquire("192.0.2.1", Conn())  # one held, one more
        assert not limiter.acquire("192.0.2.1", Conn())


def test_max_connections_per_ip_0_is_no_limit_per_ip() -> None:
    """0 refused every connection: it means no limit per IP (Postfix's
    smtpd_client_connection_count_limit = 0); the total still holds."""
    limiter = ConnectionLimiter(3, 0, ())
    held = [Conn() for _ in range(3)]
    assert all(limiter.acquire("192.0.2.1", c) for c in held)
    assert not limiter.acquire("192.0.2.1", Conn())  # max_connections
    limiter.release("192.0.2.1", held[0])
    assert limiter.acquire("192.0.2.2", held[0])


def test_running_out_of_descriptors_is_said_once_per_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flood refused for descriptors must not flood the log as well."""
    limiter = ConnectionLimiter(100, 100, ())
    high = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
    with caplog.at_level(logging.WARNING, logger="postroom"):
        assert not any(limiter.acquire("192.0.2.1", Conn(), high) for _ in range(50))
    assert [r.getMessage() for r in caplog.records].count(
        f"descriptors running out (fd {high}): connections refused with 421"
    ) == 1
    assert limiter.acquire("192.0.2.1", Conn(), 10)  # a descriptor low enough: let in


def test_max_connections_holds_over_all_workers() -> None:
    """Each of N workers had max_connections / N, rounded up: max_connections = 1 let in two
    with two workers, and a worker refused while the other had room. The total is counted
    in the tables the workers share now, as the per-IP counts are."""
    from postroom import config
    from postroom.sharedcounts import SharedCounts, WorkerCounts

    cfg = config.from_dict(
        {"domains": ["a.test"], "limits": {"max_connections": 3, "max_connections_per_ip": 2}}
    )
    tables = (SharedCounts(rows=64), SharedCounts(rows=64))
    w0, w1 = (ConnectionLimiter.for_config(cfg, 2, WorkerCounts(tables, i)) for i in (0, 1))
    a, b, c, d = Conn(), Conn(), Conn(), Conn()
    assert w0.acquire("192.0.2.1", a) and w0.acquire("192.0.2.2", b)
    assert w1.acquire("192.0.2.1", c)
    assert not w1.acquire("192.0.2.3", d)  # three open over both workers
    assert not w0.acquire("192.0.2.3", d)
    w0.release("192.0.2.1", a)
    assert w1.acquire("192.0.2.3", d)  # the place w0 gave back
    w1.release("192.0.2.3", d)
    assert w0.acquire("192.0.2.1", a) and not w1.acquire("192.0.2.1", d)  # two per IP
    assert tables[1].get("192.0.2.1") == 1 and not w1.acquire("192.0.2.4", d)  # and three


def test_an_exempt_host_takes_no_place_of_its_ipv6_neighbours() -> None:
    """An IPv6 client is counted by its /64: an exempt relay's connections were counted too,
    and filled the limit of every other host of its /64 (ipv6 probe). They count once a
    reload takes the exemption away."""
    relay = "2001:db8::25"
    limiter = ConnectionLimiter(100, 2, (ipaddress.ip_network(f"{relay}/128"),))
    held = [Conn() for _ in range(5)]
    assert all(limiter.acquire(relay, c) for c in held)
    neighbour = [Conn(), Conn()]
    assert all(limiter.acquire("2001:db8::99", c) for c in neighbour)
    assert not limiter.acquire("2001:db8::98", Conn())  # the /64's limit, the neighbour's
    limiter.set_exempt(())  # what a reload does
    for c in neighbour:
        limiter.release("2001:db8::99", c)
    assert not limiter.acquire("2001:db8::99", Conn())  # the relay's 5 count now
    for c in held[:4]:
        limiter.release(relay, c)
    assert limiter.acquire("2001:db8::99", Conn())


def test_an_ipv4_client_on_a_dual_stack_socket_is_exempt_as_its_ipv4_address() -> None:
    """A mapped client (``::ffff:127.0.0.5``) is counted as its IPv4 address, but was never
    matched against the IPv4 networks; an exemption written mapped exempted no one (v6intl
    probe): both name the IPv4 network now."""
    written = ("::ffff:127.0.0.0/104", "::1/128", "192.0.2.0/24")
    nets = Config(limits=LimitsConfig(per_ip_exempt=written)).per_ip_exempt_networks()
    assert nets[0] == ipaddress.ip_network("127.0.0.0/8") and nets[2].version == 4
    for exempt in (nets[:1], nets[2:]):
        limiter = ConnectionLimiter(100, 1, exempt)
        client = "::ffff:127.0.0.5" if exempt == nets[:1] else "::ffff:192.0.2.7"
        assert all(limiter.acquire(client, Conn()) for _ in range(3))
