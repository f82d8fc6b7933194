"""A tiny HTTP/1.1 server for ``[listen] http``: ``GET /metrics`` and ``GET /healthz``, no more.

Written by hand because it answers two fixed paths and closes the connection after each
answer: reading one request head (RFC 9112 §2.1: a request line, header fields, an empty line)
and writing one response is less code than driving a general HTTP library, and prometheus-client's
own server runs in threads beside the event loop. :func:`parse_head` is pure (bytes in, a
:class:`Request` or an error status out); :class:`HttpConnection` is the asyncio glue.

Security notes: the head is bounded (:data:`MAX_HEAD` octets, else 431; a request target of
:data:`MAX_TARGET`, else 414), must arrive within :data:`READ_TIMEOUT` seconds (else 408 and
close) and must be well formed (RFC 9112: one Host, required in HTTP/1.1; no obs-fold, no
whitespace before a colon, no bare CR; a valid Content-Length; else 400); at most
:data:`MAX_CONNECTIONS` are open per worker (beyond: the connection that has waited longest
without sending a byte, a second at least, is answered 408 and closed, or the oldest
``/metrics`` request held for the workers' counts is answered at once, so that neither idle
connections nor a flood of scrapes can starve mail or lock out a health check; 503 "busy"
only when every one is being answered, or beyond :data:`BURST_CONNECTIONS` none of which has
been idle a second), and none within the descriptor reserve that the mail sessions keep
(503 "busy" at once); a body is never read; every answer carries ``Connection: close``;
only GET (and HEAD, RFC 9110 §9.3.2) on the two paths (else 404, or 405 with ``Allow``).
The listener is meant for a loopback or management address: it has no authentication, and
what it shows (counts, no addresses) is meant to be scraped.
"""

from __future__ import annotations

import asyncio
import fcntl
import re
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate

from postroom.services import descriptors_short

MAX_HEAD = 8192
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 32  # per worker: a scraper or two and health checks need a handful
BURST_CONNECTIONS = 256  # beyond the above only while none has been idle for IDLE_GRACE
IDLE_GRACE = 1.0  # seconds a connection may send nothing before it counts as idle
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MAX_TARGET = 2048  # a request target beyond this gets 414 (RFC 9112 §3: MUST)

_HEAD_END = re.compile(rb"\r?\n\r?\n")  # RFC 9112 §2.2: a bare LF may end a line
_LINE_END = re.compile(rb"\r?\n")
_METHOD = re.compile(rb"[A-Z]{1,16} ")
_METHOD_START = re.compile(rb"[A-Z]{0,16}")  # what a line may start with before its method ends
# RFC 9112 §3.2: origin-form, or absolute-form (which a server MUST accept).
_REQUEST_LINE = re.compile(
    rb"([A-Z]{1,16}) (?:[Hh][Tt][Tt][Pp][Ss]?://[^/?#\s]*)?(/[\x21-\x7e]*) HTTP/1\.([01])"
)
# RFC 9112 §5.1, §5.2: a token, then the colon at once (no whitespace before it), then a value
# of visible octets, spaces and tabs (RFC 9110 §5.5: no CR, LF, NUL); a line that starts with
# whitespace (obs-fold) matches no token. Anything else is a 400.
_FIELD_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)")
# RFC 9110 §7.2: uri-host [ ":" port ], possibly empty (RFC 3986 §3.2.2: IP-literal or reg-name).
_HOST = re.compile(rb"(?:\[[0-9A-Za-z.:]+\]|[0-9A-Za-z._~%!$&'()*+,;=-]*)(?::[0-9]*)?")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query


def parse_head(data: bytes) -> Request | int | None:
    """The request in ``data`` once its head is complete; an error status (400, 414, 431) if
    it is malformed or too long; None while more is needed."""
    first = data.split(b"\n", 1)[0]
    method = _METHOD.match(first)
    if method is not None and len(first[method.end() :].split(b" ", 1)[0]) > MAX_TARGET:
        return 414
    end = _HEAD_END.search(data)
    if end is None:
        # RFC 9112 §3: what cannot become a request line is a 400 now, not a 408 when the
        # head's time is up (a line without a version, binary junk, a TLS hello).
        if b"\n" in data and _REQUEST_LINE.fullmatch(first.removesuffix(b"\r")) is None:
            return 400
        if method is None and not _METHOD_START.fullmatch(first[:17]):
            return 400
        return 431 if len(data) > MAX_HEAD else None
    if end.start() > MAX_HEAD:
        return 431
    line, *field_lines = _LINE_END.split(data[: end.start()])
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        return 400
    fields: dict[bytes, list[bytes]] = {}
    for field_line in field_lines:
        parsed = _FIELD_LINE.fullmatch(field_line)
        if parsed is None:
            return 400
        fields.setdefault(parsed.group(1).lower(), []).append(parsed.group(2).rstrip(b" \t"))
    hosts = fields.get(b"host", [])
    lengths = fields.get(b"content-length", [])
    # RFC 9112 §3.2: an HTTP/1.1 request without Host, more than one Host field line in any
    # request, or a Host that is not a host get 400.
    if len(hosts) > 1 or (not hosts and match.group(3) == b"1"):
        return 400
    if hosts and _HOST.fullmatch(hosts[0]) is None:
        return 400
    # RFC 9112 §6.3: an invalid Content-Length is a 400 (no body is ever read: every answer
    # closes the connection, so whatever follows the head cannot be taken for a request).
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        return 400
    # RFC 9112 §6.3: a Transfer-Encoding whose final coding is not chunked is a 400.
    codings = b",".join(fields.get(b"transfer-encoding", [])).split(b",")
    if b"transfer-encoding" in fields and codings[-1].strip().lower() != b"chunked":
        return 400
    target = match.group(2).decode("ascii")
    return Request(match.group(1).decode("ascii"), target.split("?", 1)[0])


def response(status: int, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"  # RFC 9110 §6.6.1: an origin server MUST
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Allow: GET, HEAD\r\n" if status == 405 else "")
        + "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + (b"" if head_only else body)


@dataclass
class Endpoints:
    """What the two paths show: the metrics exposition and whether the server is stopping."""

    metrics: Callable[[], bytes]
    stopping: Callable[[], bool]
    delay: Callable[[], float] = lambda: 0.0  # wait before reading the metrics (workers' batches)
    open: int = 0  # connections open now
    # those still waiting for their request head, oldest first: the first to go at the cap
    waiting: dict[HttpConnection, None] = field(default_factory=dict)
    # /metrics requests held for ``delay``, oldest first: answered at once at the cap (else a
    # few clients asking for the metrics without pause fill every place for a health check)
    held: dict[HttpConnection, Request] = field(default_factory=dict)

    def answer(self, request: Request | int) -> bytes:
        if isinstance(request, int):
            return response(request, b"", "text/plain")
        head_only = request.method == "HEAD"
        if request.path not in ("/metrics", "/healthz"):
            return response(404, b"not found\n", "text/plain", head_only)
        if request.method not in ("GET", "HEAD"):
            return response(405, b"only GET\n", "text/plain")
        if request.path == "/healthz":
            if self.stopping():
                return response(503, b"stopping\n", "text/plain", head_only)
            return response(200, b"ok\n", "text/plain", head_only)
        return response(200, self.metrics(), METRICS_TYPE, head_only)


class HttpConnection(asyncio.Protocol):
    """One connection: read a head, write one answer, close."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self.transport: asyncio.Transport | None = None
        self._data = b""
        self._timer: asyncio.TimerHandle | None = None
        self._since = 0.0  # when it connected (the loop's clock)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.endpoints.open += 1
        waiting = self.endpoints.waiting
        sock = transport.get_extra_info("socket")
        held = self.endpoints.held
        if sock is not None and descriptors_short(sock.fileno()):
            self._answer(response(503, b"busy\n", "text/plain"))
            return
        if self.endpoints.open > MAX_CONNECTIONS:
            # The connection that has waited longest without sending a byte, for a second at
            # least, makes room (its 408 comes early): idle connections cannot lock out a
            # probe that asks at once. Else the oldest held /metrics request is answered now,
            # without its wait. Else each is new or has its request in hand, unread yet (a
            # burst of scrapes, each connected a moment before it asks): this one comes in
            # too, up to BURST_CONNECTIONS.
            now = asyncio.get_running_loop().time()
            idle = next((c for c in waiting if c._idle_since(now)), None)
            if idle is not None:
                idle._timeout()
            elif held:
                oldest, request = next(iter(held.items()))
                oldest._answer_later(request)
            elif self.endpoints.open > BURST_CONNECTIONS or not waiting:
                self._answer(response(503, b"busy\n", "text/plain"))
                return
        waiting[self] = None
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        self._timer = loop.call_later(READ_TIMEOUT, self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._data += data
        request = parse_head(self._data)
        if request is None:
            return
        self.endpoints.waiting.pop(self, None)
        delay = self.endpoints.delay()
        if isinstance(request, Request) and request.path == "/metrics" and delay > 0:
            self.transport.pause_reading()
            if self._timer is not None:
                self._timer.cancel()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(delay, self._answer_later, request)
            self.endpoints.held[self] = request
            return
        self._answer(self.endpoints.answer(request))

    def _answer_later(self, request: Request) -> None:
        if self._timer is not None:  # (answered before its wait ran out: at the cap)
            self._timer.cancel()
            self._timer = None
        self._answer(self.endpoints.answer(request))

    def eof_received(self) -> bool | None:
        return None  # closes

    def _idle_since(self, now: float) -> bool:
        """Whether the client has sent nothing for :data:`IDLE_GRACE` since it connected."""
        return now - self._since >= IDLE_GRACE and not self._unread()

    def _unread(self) -> bool:
        """Whether the client has sent something this process has not read yet."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            pending = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return int.from_bytes(pending, sys.byteorder) > 0

    def _timeout(self) -> None:
        self._answer(response(408, b"", "text/plain"))

    def _answer(self, out: bytes) -> None:
        self.endpoints.waiting.pop(self, None)
        self.endpoints.held.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
            transport.write(out)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        self.endpoints.open -= 1
        self.endpoints.waiting.pop(self, None)
        self.endpoints.held.pop(self, None)
