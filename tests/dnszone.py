"""A small authoritative DNS server on loopback (dnslib) whose zone the tests can change."""

from __future__ import annotations

from typing import Any

from dnslib import AAAA, MX, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: dict[str, list[Any]]) -> None:
        self.zone = zone

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        records = self.zone.get(qname)
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rdata in records:
            rtype = type(rdata).__name__
            if rtype == qtype:
                reply.add_answer(RR(qname, getattr(QTYPE, rtype), rdata=rdata, ttl=1))
        return reply


class LoopbackDNS:
    """``dns.mx("b.test", 10, "mx.b.test")``, ``dns.a("mx.b.test", "127.0.0.3")``; then serve."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.zone: dict[str, list[Any]] = {}
        self._server = DNSServer(
            _Resolver(self.zone), port=0, address=address, logger=DNSLogger(logf=lambda _msg: None)
        )
        self._server.start_thread()
        self.address = address
        self.port = int(self._server.server.server_address[1])

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    def mx(self, domain: str, preference: int, host: str) -> None:
        self.zone.setdefault(domain, []).append(MX(host, preference))

    def a(self, name: str, ip: str) -> None:
        self.zone.setdefault(name, []).append(AAAA(ip) if ":" in ip else A(ip))

    def exists(self, name: str) -> None:
        self.zone.setdefault(name, [])

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()
