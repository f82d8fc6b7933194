"""An in-process authoritative DNS server (dnslib) for the loopback relay case.

Answers MX and A for the bench zones (e.g. ``relay.test MX 10 mx.relay.test``, ``mx.relay.test
A 127.0.0.14``) and NXDOMAIN for everything else; UDP and TCP on one loopback address.
"""

from __future__ import annotations

from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer

from benchlib.proc import Cleanup


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    """A fixed table of (name, type) -> records."""

    def __init__(self, mx: dict[str, str], a: dict[str, str]) -> None:
        self.mx = {k.rstrip(".").lower(): v for k, v in mx.items()}
        self.a = {k.rstrip(".").lower(): v for k, v in a.items()}

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = request.q.qname
        name = str(qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if qtype == "MX" and name in self.mx:
            reply.add_answer(*RR.fromZone(f"{name}. 60 MX 10 {self.mx[name]}."))
        elif qtype == "A" and name in self.a:
            reply.add_answer(RR(qname, QTYPE.A, rdata=A(self.a[name]), ttl=60))
        elif name not in self.mx and name not in self.a:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


def start_dns(
    host: str, port: int, mx: dict[str, str], a: dict[str, str], cleanup: Cleanup
) -> None:
    """Serve the zone on ``host:port`` (UDP and TCP) in daemon threads until cleanup."""
    resolver = ZoneResolver(mx, a)
    for tcp in (False, True):
        server = DNSServer(resolver, address=host, port=port, tcp=tcp, logger=_QuietLogger())
        server.start_thread()
        cleanup.push(f"dns {'tcp' if tcp else 'udp'}", server.stop)


class _QuietLogger:
    """dnslib logs every query by default; the bench keeps stdout for results."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
