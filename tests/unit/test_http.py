"""http/server.py: the request head parser (pure) and the answers of the two endpoints."""

from __future__ import annotations

import asyncio
import re
import socket
import time

from hypothesis import given
from hypothesis import strategies as st

from postroom.http.server import (
    IDLE_GRACE,
    MAX_CONNECTIONS,
    MAX_HEAD,
    MAX_TARGET,
    Endpoints,
    HttpConnection,
    Request,
    parse_head,
)


def test_parse_head() -> None:
    assert parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == Request("GET", "/metrics")
    assert parse_head(b"GET /healthz?x=1 HTTP/1.0\n\n") == Request("GET", "/healthz")
    assert parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n") is None  # not complete yet
    assert parse_head(b"GET metrics HTTP/1.1\r\nHost: x\r\n\r\n") == 400
    assert parse_head(b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n") == 400
    assert parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n") == 400  # TLS hello
    assert parse_head(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD) == 431
    # What cannot become a request line is answered at once, not when the head's time is up.
    assert parse_head(b"GET /metrics\r\n") == 400  # no version (HTTP/0.9)
    assert parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc") == 400  # a TLS hello
    assert parse_head(b"GARBAGE-WITHOUT-A-SPACE-AND-MORE") == 400
    for partial in (b"GE", b"GET", b"GET /metr", b"GET /metrics HTTP/1.1\r", b"POSTXXXXXXXXXXXX"):
        assert parse_head(partial) is None
    assert parse_head(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n") == 431


def test_host_rules() -> None:
    """RFC 9112 §3.2: 400 for an HTTP/1.1 request without Host, for more than one Host field
    line in any request, and for a Host that is not a host (all were taken)."""
    ok = Request("GET", "/healthz")
    for host in (b"mx.a.test", b"127.0.0.1:2080", b"[::1]:2080", b"localhost:", b""):
        assert parse_head(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n") == ok, host
    assert parse_head(b"GET /healthz HTTP/1.1\r\nhOST:x \r\n\r\n") == ok
    assert parse_head(b"GET /healthz HTTP/1.0\r\n\r\n") == ok  # 1.0 needs no Host
    assert parse_head(b"GET /healthz HTTP/1.1\r\n\r\n") == 400
    assert parse_head(b"GET /healthz HTTP/1.1\r\nAccept: */*\r\n\r\n") == 400
    assert parse_head(b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n") == 400
    assert parse_head(b"GET /healthz HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n") == 400
    for host in (b"a b", b"a/b", b"u@a", b"a:80:80", b"a:x", b"[::1", b"a\x80"):
        assert parse_head(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n") == 400, host
    absolute = b"GET http://a/healthz HTTP/1.1\r\n\r\n"  # a client MUST send Host here too
    assert parse_head(absolute) == 400


def test_what_real_clients_send_is_taken() -> None:
    """The heads of curl, Python's urllib, Prometheus and a Kubernetes probe (as captured)."""
    for head in (
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:2080\r\nUser-Agent: curl/7.88.1\r\n"
        b"Accept: */*\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nAccept-Encoding: identity\r\nHost: 127.0.0.1:2080\r\n"
        b"User-Agent: Python-urllib/3.11\r\nConnection: close\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: mx.a.test:2080\r\nUser-Agent: Prometheus/2.45.0\r\n"
        b"Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,"
        b"*/*;q=0.1\r\nAccept-Encoding: gzip\r\nX-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: 10.1.2.3:2080\r\nUser-Agent: kube-probe/1.29\r\n"
        b"Accept: */*\r\nConnection: close\r\nAccept-Encoding: gzip\r\n\r\n",
    ):
        assert parse_head(head) == Request("GET", "/metrics"), head


def test_field_lines_a_server_must_refuse() -> None:
    """RFC 9112 §5.1 (whitespace before the colon), §5.2 (obs-fold), RFC 9110 §5.5 (CR, LF,
    NUL in a value), §2.2 (bare CR) and RFC 9112 §6.3 (an invalid Content-Length) are 400s;
    they were taken, since no field line was looked at."""
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
    ok = Request("GET", "/metrics")
    assert parse_head(head + b"Content-Length: 0\r\n\r\n") == ok
    assert parse_head(head + b"X-Y: a\tb \xff\r\n\r\n") == ok  # obs-text is allowed
    assert parse_head(b"GET /metrics HTTP/1.1\nHost: x\r\n\n") == ok  # bare LFs end lines
    # no body is read and the connection closes after the answer: nothing to desync
    assert parse_head(head + b"Transfer-Encoding: chunked\r\n\r\n") == ok
    assert parse_head(head + b"Transfer-Encoding: gzip, Chunked\r\n\r\n") == ok
    for bad in (
        b"Accept : */*",  # whitespace before the colon
        b"Accept\t: */*",
        b"Accept: text/plain,\r\n text/html",  # obs-fold
        b"Accept: text/plain,\r\n\ttext/html",
        b" Host: y",  # a second Host hidden by a fold
        b"Accept */*",  # no colon
        b": x",  # no name
        b"X(1): y",  # not a token
        b"X: a\rb",  # bare CR
        b"X: a\r",
        b"X: a\x00b",  # NUL
        b"X: a\x7fb",
        b"Content-Length: x",
        b"Content-Length: -1",
        b"Content-Length: 1, 1",
        b"Content-Length: 0\r\nContent-Length: 0",
        b"Transfer-Encoding: gzip",  # §6.3: chunked not the final coding
        b"Transfer-Encoding: chunked, gzip",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip",
    ):
        assert parse_head(head + bad + b"\r\n\r\n") == 400, bad


def test_a_long_target_is_414_and_long_fields_are_431() -> None:
    """RFC 9110 §15.5.15, RFC 9112 §3: a request target too long to parse is a 414 (it was
    a 400, or a 431 once the line passed 8 KiB); 431 stays for header fields."""
    target = b"/metrics?" + b"a" * (MAX_TARGET - 9)
    head = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert parse_head(head) == Request("GET", "/metrics")
    assert parse_head(head.replace(b"?", b"?a")) == 414
    assert parse_head(b"GET /" + b"a" * MAX_TARGET) == 414  # at once, before the line ends
    assert parse_head(b"GET /" + b"a" * MAX_HEAD) == 414
    assert parse_head(b"GET http://a/" + b"a" * MAX_TARGET + b" HTTP/1.1\r\n") == 414
    fields = b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD
    assert parse_head(fields) == 431
    assert parse_head(fields + b"\r\n\r\n") == 431


@given(st.binary(max_size=300))
def test_garbage_gives_a_request_an_error_or_nothing(data: bytes) -> None:
    result = parse_head(data)
    assert result is None or result in (400, 414, 431) or isinstance(result, Request)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_endpoints() -> None:
    stopping = False
    ep = Endpoints(lambda: b"postroom_x 1\n", lambda: stopping)
    assert _status(ep.answer(Request("GET", "/healthz"))) == 200
    metrics = ep.answer(Request("GET", "/metrics"))
    assert _status(metrics) == 200 and metrics.endswith(b"postroom_x 1\n")
    assert b"text/plain; version=0.0.4" in metrics
    assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\r\n", metrics)
    head = ep.answer(Request("HEAD", "/metrics"))
    assert b"Content-Length: 13\r\n" in head and head.endswith(b"\r\n\r\n")
    assert _status(ep.answer(Request("POST", "/metrics"))) == 405
    assert b"Allow: GET, HEAD" in ep.answer(Request("PUT", "/healthz"))
    assert _status(ep.answer(Request("GET", "/"))) == 404
    assert _status(ep.answer(400)) == 400
    stopping = True
    assert _status(ep.answer(Request("GET", "/healthz"))) == 503


async def _serve(ep: Endpoints) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(
        lambda: HttpConnection(ep), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1]


async def _ask(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def test_at_the_cap_the_oldest_idle_connection_makes_room() -> None:
    """Idle connections cannot hold descriptors the mail sessions need, nor lock out a probe
    (at the cap, every new connection got 503 "busy", a health check too)."""

    async def main() -> None:
        ep = Endpoints(lambda: b"", lambda: False)
        server, port = await _serve(ep)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        await asyncio.sleep(IDLE_GRACE + 0.1)  # (one younger may yet be a scrape about to ask)
        assert ep.open == MAX_CONNECTIONS
        answer = await _ask(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok\n")
        oldest = idle[0][0]
        assert (await asyncio.wait_for(oldest.read(), 5)).startswith(b"HTTP/1.1 408 ")
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.1)
        assert ep.open == 0 and not ep.waiting
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_at_the_cap_a_held_scrape_makes_room_for_a_health_check() -> None:
    """With several workers each /metrics answer waits for their counts (``delay``): clients
    scraping without pause held every place, and a health check got 503 "busy" (a load
    balancer or liveness probe took the node out; obs probe). The oldest held scrape is
    answered at once instead."""

    async def main() -> None:
        ep = Endpoints(lambda: b"", lambda: False, delay=lambda: 1.0)
        server, port = await _serve(ep)
        scrapes = [
            asyncio.create_task(_ask(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
            for _ in range(MAX_CONNECTIONS)
        ]
        await asyncio.sleep(0.3)
        assert ep.open == MAX_CONNECTIONS and not ep.waiting and len(ep.held) == MAX_CONNECTIONS
        started = time.monotonic()
        answer = await _ask(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok\n")
        assert time.monotonic() - started < 0.5
        first = await asyncio.wait_for(scrapes[0], 0.2)  # answered without its wait
        assert first.startswith(b"HTTP/1.1 200 ")
        for scrape in scrapes:
            assert (await scrape).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.1)
        assert ep.open == 0 and not ep.held
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_burst_of_scrapes_each_with_its_request_is_answered() -> None:
    """Scrapes that came together (all accepted before any was read, each with its whole
    request sent) got 408 or a reset beyond the cap, as if they had sent nothing, with
    several workers (``delay``: the scrapes are held). Each gets its counts now (obs probe)."""

    async def main() -> None:
        ep = Endpoints(lambda: b"counts\n", lambda: False, delay=lambda: 0.2)
        server, port = await _serve(ep)
        clients = []
        for _ in range(3 * MAX_CONNECTIONS):  # (no turn of the loop: the server reads none)
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.setblocking(False)
            clients.append(sock)
        loop = asyncio.get_running_loop()

        async def answer(sock: socket.socket) -> bytes:
            out = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 4096), 5):
                out += chunk
            sock.close()
            return out

        answers = await asyncio.gather(*(answer(sock) for sock in clients))
        assert all(a.startswith(b"HTTP/1.1 200 ") and a.endswith(b"counts\n") for a in answers)
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_burst_of_scrapes_that_connect_first_then_ask_is_answered() -> None:
    """Clients that all connect, then each send its request a moment later, were taken for
    idle at the cap (nothing unread yet) and answered 408 (recheck probe: 140 of 300). A
    connection younger than IDLE_GRACE is never the one that makes room."""

    async def main() -> None:
        ep = Endpoints(lambda: b"counts\n", lambda: False, delay=lambda: 0.2)
        server, port = await _serve(ep)
        conns = [
            await asyncio.open_connection("127.0.0.1", port) for _ in range(3 * MAX_CONNECTIONS)
        ]
        for _, w in conns:
            w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in conns))
        for _, w in conns:
            w.close()
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_an_absolute_form_target_is_taken() -> None:
    """RFC 9112 §3.2.2: a server MUST accept the absolute form (it was a 400)."""
    head = b"GET http://mx.a.test:9100/metrics?x HTTP/1.1\r\nHost: mx.a.test\r\n\r\n"
    assert parse_head(head) == Request("GET", "/metrics")
    assert parse_head(b"GET ftp://x/metrics HTTP/1.1\r\nHost: x\r\n\r\n") == 400
