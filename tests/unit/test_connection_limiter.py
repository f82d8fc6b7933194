"""ConnectionLimiter: per-IP limits, exempt networks (answered once per address), and a reload
that changes those networks taking effect for addresses already seen."""

from __future__ import annotations

import ipaddress

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
