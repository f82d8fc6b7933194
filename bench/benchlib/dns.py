"""An in-process authoritative DNS server for the bench zones, on loopback.

Answers MX, A and TXT for the bench zones (e.g. ``relay.test MX 10 mx.relay.test``,
``mx.relay.test A 127.0.0.14``, the SPF, DKIM and DMARC records of the sender-authentication
case) and NXDOMAIN, with an SOA so that resolvers may cache it (RFC 2308), for every other
name. TXT strings longer than 255 octets are split as a zone file would split them.

UDP is answered by a small loop that keeps each answer's wire form once dnslib has built it
and then only copies the query's ID, flags and question into it: the reference stack
(OpenDMARC, policyd-spf) asks for the same few records for every message, and a dnslib round
trip per query (a few hundred microseconds of Python) would be a cost of the bench, not of
the server under test. TCP (for truncated answers) is dnslib's own server.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from typing import Any

from dnslib import MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer

from benchlib.proc import Cleanup

TTL = 300
UDP_LIMIT = 512  # RFC 1035 §4.2.1, for queries without EDNS


class Zone(BaseResolver):  # type: ignore[misc]
    """Records by (name, type); changes reach the UDP answers through :meth:`changed`."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[Any]] = {}
        self.version = 0

    def changed(self) -> None:
        self.version += 1

    def mx(self, name: str, host: str, preference: int = 10) -> None:
        self._add(name, "MX", MX(host.rstrip(".") + ".", preference))

    def a(self, name: str, ip: str) -> None:
        self._add(name, "A", A(ip))

    def txt(self, name: str, text: str) -> None:
        raw = text.encode()
        self._add(name, "TXT", TXT([raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]))

    def load_master(self, text: str) -> None:
        """Records in master-file format (``postroom dns`` output)."""
        for rr in RR.fromZone(text):
            self._add(str(rr.rname), QTYPE.get(rr.rtype), rr.rdata)

    def _add(self, name: str, rtype: str, rdata: Any) -> None:
        self.records.setdefault((name.rstrip(".").lower(), rtype), []).append(rdata)
        self.changed()

    def names(self) -> set[str]:
        return {name for name, _ in self.records}

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = request.q.qname
        name = str(qname).rstrip(".").lower()
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        found = self.records.get((name, qtype))
        if found:
            for rdata in found:
                reply.add_answer(RR(qname, QTYPE.reverse[qtype], rdata=rdata, ttl=TTL))
            return reply
        if name not in self.names():
            reply.header.rcode = RCODE.NXDOMAIN
        # RFC 2308 §3: the SOA makes the negative answer cacheable.
        soa = SOA("ns.bench.test.", "hostmaster.bench.test.", (1, 3600, 600, 86400, TTL))
        reply.add_auth(RR("test.", QTYPE.SOA, rdata=soa, ttl=TTL))
        return reply


class FastUdp:
    """The UDP side: answers from wire forms kept per question (see the module docstring)."""

    def __init__(self, host: str, port: int, zone: Zone) -> None:
        self.zone = zone
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((host, port))
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"dns-{port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        kept: dict[bytes, bytes] = {}
        version = -1
        while not self._stop:
            try:
                query, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            end = query.find(b"\0", 12) + 5  # the question: the name, its type and class
            if len(query) < 17 or end < 17 or end > len(query):
                continue
            if version != self.zone.version:
                kept.clear()
                version = self.zone.version
            question = query[12:end]
            key = question.lower()
            wire = kept.get(key)
            if wire is None:
                try:
                    wire = self.zone.resolve(DNSRecord.parse(query), None).pack()
                except Exception:  # a query dnslib cannot read: no answer, as a dead server
                    continue
                kept[key] = wire
            flags = bytes([0x84 | (query[2] & 0x01), wire[3]])  # QR, AA, the query's RD
            reply = query[:2] + flags + wire[4:12] + question + wire[end:]
            if len(reply) > UDP_LIMIT and query[11] == 0:  # no EDNS: truncate (TC), go TCP
                reply = query[:2] + bytes([0x86 | (query[2] & 0x01), wire[3]])
                reply += b"\0\x01\0\0\0\0\0\0" + question
            try:
                self.sock.sendto(reply, peer)
            except OSError:
                continue

    def stop(self) -> None:
        self._stop = True
        self.sock.close()


def start_dns(
    host: str,
    ports: Iterable[int],
    cleanup: Cleanup,
    mx: dict[str, str] | None = None,
    a: dict[str, str] | None = None,
) -> Zone:
    """Serve a zone on ``host`` at each of ``ports`` (UDP and TCP) until cleanup; the zone
    can be added to later (the auth case adds its records once the servers made theirs)."""
    zone = Zone()
    for name, host_name in (mx or {}).items():
        zone.mx(name, host_name)
    for name, ip in (a or {}).items():
        zone.a(name, ip)
    for port in ports:
        udp = FastUdp(host, port, zone)
        cleanup.push(f"dns udp {port}", udp.stop)
        tcp = DNSServer(zone, address=host, port=port, tcp=True, logger=_QuietLogger())
        tcp.start_thread()
        cleanup.push(f"dns tcp {port}", tcp.stop)
    return zone


class _QuietLogger:
    """dnslib logs every query by default; the bench keeps stdout for results."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
