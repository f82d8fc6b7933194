"""A small authoritative DNS server on loopback (dnslib) whose zone the tests can change.

Records are kept as ``(type name, rdata)`` per owner name; a name without records answers
NODATA, an unknown name NXDOMAIN; a CNAME comes with its target's records (one step), or
alone (``chase_cnames = False``: as dnslib's own zone server and authoritative-only servers
answer). ``timeout(name)`` (or ``timeout(name, "TXT")``) makes the
server drop those questions unanswered, as a dead server would. TXT strings longer than 255
octets are split into several strings, as a zone file would have them.
"""

from __future__ import annotations

import time
from typing import Any

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

TTL = 1
QTYPE.forward[99] = "SPF"  # dnslib has no name for RFC 4408's type 99
QTYPE.reverse["SPF"] = 99


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(
        self,
        zone: dict[str, list[tuple[str, Any]]],
        dead: set[tuple[str, str]],
        ttls: dict[tuple[str, str], int],
    ):
        self.zone = zone
        self.dead = dead
        self.ttls = ttls
        self.chase = True  # False: a CNAME comes without its target's records
        self.slow: dict[str, float] = {}  # name -> seconds its answers wait (in their thread)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        owner = request.q.qname
        # The raw labels: str() of a name escapes octets such as spaces.
        qname = ".".join(label.decode("latin-1") for label in owner.label).lower()
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        if qname in self.slow:
            time.sleep(self.slow[qname])
        records = self.zone.get(qname)
        wanted = [(t, r) for t, r in records or () if t == qtype]
        if (qname, qtype) in self.dead or ((qname, "*") in self.dead and not wanted):
            raise DNSError("timeout (simulated)")  # dnslib then sends nothing
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if not wanted and qtype != "CNAME":
            # RFC 1034 §4.3.2: a CNAME answers every type; follow it one step at a time.
            wanted = [(t, r) for t, r in records if t == "CNAME"]
            for _t, rdata in wanted if self.chase else ():
                target = str(rdata.label).rstrip(".").lower()
                for t2, r2 in self.zone.get(target, []):
                    if t2 == qtype:
                        ttl = self.ttls.get((target, t2), TTL)
                        reply.add_answer(RR(target, QTYPE.reverse[t2], rdata=r2, ttl=ttl))
        for rtype, rdata in wanted:
            ttl = self.ttls.get((qname, rtype), TTL)
            reply.add_answer(RR(owner, QTYPE.reverse[rtype], rdata=rdata, ttl=ttl))
        return reply


def _txt(strings: tuple[str | bytes, ...]) -> TXT:
    parts: list[bytes] = []
    for s in strings:
        raw = s.encode() if isinstance(s, str) else s
        parts += [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return TXT(parts or [b""])  # a TXT record has at least one string (RFC 1035 §3.3.14)


class LoopbackDNS:
    """``dns.mx("b.test", 10, "mx.b.test")``, ``dns.a("mx.b.test", "127.0.0.3")``,
    ``dns.txt("b.test", "v=spf1 -all")``; served at once, changes seen by the next query.
    UDP on ``address``, on a free port unless ``port`` is given (53 for daemons that read
    /etc/resolv.conf)."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0) -> None:
        self.zone: dict[str, list[tuple[str, Any]]] = {}
        self.dead: set[tuple[str, str]] = set()
        self.ttls: dict[tuple[str, str], int] = {}  # (name, type) -> TTL, else TTL
        self._resolver = _Resolver(self.zone, self.dead, self.ttls)
        self._server = DNSServer(
            self._resolver,
            port=port,
            address=address,
            logger=DNSLogger(logf=lambda _msg: None),
        )
        self._server.start_thread()
        self.address = address
        self.port = int(self._server.server.server_address[1])

    @property
    def slow(self) -> dict[str, float]:
        """Names whose answers come after so many seconds."""
        return self._resolver.slow

    @property
    def chase_cnames(self) -> bool:
        return self._resolver.chase

    @chase_cnames.setter
    def chase_cnames(self, value: bool) -> None:
        self._resolver.chase = value

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    def add(self, name: str, rtype: str, rdata: Any) -> None:
        self.zone.setdefault(name.rstrip(".").lower(), []).append((rtype, rdata))

    def mx(self, domain: str, preference: int, host: str) -> None:
        self.add(domain, "MX", MX(host, preference))

    def a(self, name: str, ip: str) -> None:
        self.add(name, "AAAA" if ":" in ip else "A", AAAA(ip) if ":" in ip else A(ip))

    def txt(self, name: str, *strings: str | bytes, rtype: str = "TXT") -> None:
        self.add(name, rtype, _txt(strings))

    def cname(self, name: str, target: str) -> None:
        self.add(name, "CNAME", CNAME(target))

    def ptr(self, name: str, target: str) -> None:
        self.add(name, "PTR", PTR(target))

    def exists(self, name: str) -> None:
        self.zone.setdefault(name.rstrip(".").lower(), [])

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Drop the records of ``name`` (of one type only, if given); the name stays."""
        key = name.rstrip(".").lower()
        self.zone[key] = [(t, r) for t, r in self.zone.get(key, []) if rtype not in (None, t)]

    def ttl(self, name: str, rtype: str, seconds: int) -> None:
        """Serve the records of ``name`` and ``rtype`` with this TTL (else :data:`TTL`)."""
        self.ttls[(name.rstrip(".").lower(), rtype)] = seconds

    def timeout(self, name: str, rtype: str = "*") -> None:
        self.dead.add((name.rstrip(".").lower(), rtype))

    def load_master(self, text: str) -> None:
        """Records in master-file format, as ``postroom dns`` prints them."""
        for rr in RR.fromZone(text):
            self.add(str(rr.rname), QTYPE.get(rr.rtype), rr.rdata)

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()
