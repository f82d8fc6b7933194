"""A tiny HTTP/1.1 server for ``[listen] http``: ``GET /metrics`` and ``GET /healthz``, no more.

Written by hand because it answers two fixed paths and closes the connection after each
answer: reading one request head (RFC 9112 §2.1: a request line, header fields, an empty line)
and writing one response is less code than driving a general HTTP library, and prometheus-client's
own server runs in threads beside the event loop. :func:`parse_head` is pure (bytes in, a
:class:`Request` or an error status out); :class:`HttpConnection` is the asyncio glue.

Security notes: the head is bounded (:data:`MAX_HEAD` octets, else 431) and must arrive within
:data:`READ_TIMEOUT` seconds (else the connection is closed); at most :data:`MAX_CONNECTIONS`
are open per worker, and none within the descriptor reserve that the mail sessions keep
(beyond either: 503 at once, so idle scrapers cannot starve mail); a body is never read; every
answer carries ``Connection: close``; only GET (and HEAD, RFC 9110 §9.3.2) on the two paths
(else 404, or 405 with ``Allow``). The listener is meant for a loopback or management address:
it has no authentication, and what it shows (counts, no addresses) is meant to be scraped.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

from postroom.services import descriptors_short

MAX_HEAD = 8192
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 32  # per worker: a scraper or two and health checks need a handful
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# RFC 9112 §3.2: origin-form, or absolute-form (which a server MUST accept).
_REQUEST_LINE = re.compile(
    rb"([A-Z]{1,16}) (?:[Hh][Tt][Tt][Pp][Ss]?://[^/?#\s]*)?(/[\x21-\x7e]{0,2048}) HTTP/1\.[01]"
)
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query


def parse_head(data: bytes) -> Request | int | None:
    """The request in ``data`` once its head is complete; an error status (400, 431) if it is
    malformed or too long; None while more is needed."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")  # RFC 9112 §2.2: a bare LF may end a line
    if end < 0:
        return 431 if len(data) > MAX_HEAD else None
    if end > MAX_HEAD:
        return 431
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        return 400
    target = match.group(2).decode("ascii")
    return Request(match.group(1).decode("ascii"), target.split("?", 1)[0])


def response(status: int, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.endpoints.open += 1
        sock = transport.get_extra_info("socket")
        if self.endpoints.open > MAX_CONNECTIONS or (
            sock is not None and descriptors_short(sock.fileno())
        ):
            self._answer(response(503, b"busy\n", "text/plain"))
            return
        self._timer = asyncio.get_running_loop().call_later(READ_TIMEOUT, self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._data += data
        request = parse_head(self._data)
        if request is None:
            return
        delay = self.endpoints.delay()
        if isinstance(request, Request) and request.path == "/metrics" and delay > 0:
            self.transport.pause_reading()
            if self._timer is not None:
                self._timer.cancel()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(delay, self._answer_later, request)
            return
        self._answer(self.endpoints.answer(request))

    def _answer_later(self, request: Request) -> None:
        self._timer = None
        self._answer(self.endpoints.answer(request))

    def eof_received(self) -> bool | None:
        return None  # closes

    def _timeout(self) -> None:
        self._answer(response(408, b"", "text/plain"))

    def _answer(self, out: bytes) -> None:
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
