"""On SIGTERM a session in the middle of a DATA message was let finish it (up to the stop's
8 s), but one between two BDAT chunks (RFC 3030) got its 421 at once: the chunks it had sent
were thrown away and the client had to send the whole message again after the restart. A
message under way is now let finish however it comes; a session that gives it up (RSET)
while the stop waits gets its 421 then, not when the wait runs out."""

from __future__ import annotations

import signal
import socket
import time

from tests.conftest import Server, ServerFactory


def _start_chunks(srv: Server) -> socket.socket:
    """A session that has sent the first 10-octet chunk of a message to alice."""
    sock = socket.create_connection((srv.host, srv.ports["smtp"]), timeout=20)
    sock.sendall(
        b"EHLO c.test\r\nMAIL FROM:<c@c.test>\r\nRCPT TO:<alice@a.test>\r\nBDAT 10\r\nSubject: x"
    )
    _read_until(sock, b"10 octets received")
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    deadline = time.monotonic() + 20
    while marker not in got and time.monotonic() < deadline:
        data = sock.recv(4096)
        if not data:
            break
        got += data
    assert marker in got, got
    return got


def _server(server_factory: ServerFactory) -> Server:
    srv = server_factory(
        domains=("a.test",),
        services=("smtp",),
        extra_toml="[auth]\nchecks = false\ndkim_sign = false",
    )
    srv.add_user("alice@a.test")
    return srv


def test_a_stop_lets_the_last_chunk_come(server_factory: ServerFactory) -> None:
    srv = _server(server_factory)
    sock = _start_chunks(srv)
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    sock.sendall(b"BDAT 10 LAST\r\n\r\n\r\nbody\r\n")
    got = _read_until(sock, b"421")
    assert b"250 2.0.0" in got.split(b"421")[0], got
    sock.close()
    assert srv.stop(timeout=15) == 0
    messages = srv.messages("alice@a.test")
    assert len(messages) == 1 and messages[0].endswith(b"Subject: x\r\n\r\nbody\r\n")


def test_a_message_given_up_while_the_stop_waits_ends_the_session(
    server_factory: ServerFactory,
) -> None:
    srv = _server(server_factory)
    sock = _start_chunks(srv)
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    sock.sendall(b"RSET\r\n")
    t0 = time.monotonic()
    got = _read_until(sock, b"421")
    assert time.monotonic() - t0 < 3, "the 421 waited for the end of the stop's grace"
    assert b"250" in got.split(b"421")[0], got
    sock.close()
    assert srv.stop(timeout=15) == 0
    assert srv.messages("alice@a.test") == []
