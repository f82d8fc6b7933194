"""http/server.py: the request head parser (pure) and the answers of the two endpoints."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from postroom.http.server import (
    MAX_CONNECTIONS,
    MAX_HEAD,
    Endpoints,
    HttpConnection,
    Request,
    parse_head,
)


def test_parse_head() -> None:
    assert parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == Request("GET", "/metrics")
    assert parse_head(b"GET /healthz?x=1 HTTP/1.0\n\n") == Request("GET", "/healthz")
    assert parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n") is None  # not complete yet
    assert parse_head(b"GET metrics HTTP/1.1\r\n\r\n") == 400
    assert parse_head(b"GET /a b HTTP/1.1\r\n\r\n") == 400
    assert parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n") == 400  # TLS hello
    assert parse_head(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD) == 431
    assert parse_head(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n") == 431


@given(st.binary(max_size=300))
def test_garbage_gives_a_request_an_error_or_nothing(data: bytes) -> None:
    result = parse_head(data)
    assert result is None or result in (400, 431) or isinstance(result, Request)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_endpoints() -> None:
    stopping = False
    ep = Endpoints(lambda: b"postroom_x 1\n", lambda: stopping)
    assert _status(ep.answer(Request("GET", "/healthz"))) == 200
    metrics = ep.answer(Request("GET", "/metrics"))
    assert _status(metrics) == 200 and metrics.endswith(b"postroom_x 1\n")
    assert b"text/plain; version=0.0.4" in metrics
    head = ep.answer(Request("HEAD", "/metrics"))
    assert b"Content-Length: 13\r\n" in head and head.endswith(b"\r\n\r\n")
    assert _status(ep.answer(Request("POST", "/metrics"))) == 405
    assert b"Allow: GET, HEAD" in ep.answer(Request("PUT", "/healthz"))
    assert _status(ep.answer(Request("GET", "/"))) == 404
    assert _status(ep.answer(400)) == 400
    stopping = True
    assert _status(ep.answer(Request("GET", "/healthz"))) == 503


def test_idle_connections_beyond_the_cap_get_503_at_once() -> None:
    """Idle scrapers cannot hold descriptors the mail sessions need."""

    async def main() -> None:
        ep = Endpoints(lambda: b"", lambda: False)
        server = await asyncio.get_running_loop().create_server(
            lambda: HttpConnection(ep), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        await asyncio.sleep(0.1)
        assert ep.open == MAX_CONNECTIONS
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 5)  # without sending a thing
        assert answer.startswith(b"HTTP/1.1 503 ")
        writer.close()
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.1)
        assert ep.open == 0
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_an_absolute_form_target_is_taken() -> None:
    """RFC 9112 §3.2.2: a server MUST accept the absolute form (it was a 400)."""
    head = b"GET http://mx.a.test:9100/metrics?x HTTP/1.1\r\nHost: mx.a.test\r\n\r\n"
    assert parse_head(head) == Request("GET", "/metrics")
    assert parse_head(b"GET ftp://x/metrics HTTP/1.1\r\nHost: x\r\n\r\n") == 400
