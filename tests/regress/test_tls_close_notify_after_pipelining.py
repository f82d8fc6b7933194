"""A client that pipelines its commands and then sends TLS close_notify gets every answer.

It used to lose them: asyncio's TLS transport shut the connection down as soon as the
close_notify was read, so whatever the server answered after a wait (a login's password check,
the durable write at the end of a message) was dropped. The connection glue now does TLS
itself and answers all it read before it closes. A client-closed TLS connection also no longer
logs asyncio's "returning true from eof_received() has no effect when using ssl".
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl

import pytest

from tests.conftest import Server, ServerFactory, insecure, tls_by_hand


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    s = server_factory(domains=("a.test",))
    s.add_user("alice@a.test", "alice-pw")
    return s


def pipelined_then_close_notify(
    host: str, port: int, payload: bytes, starttls: bytes = b""
) -> bytes:
    """Plaintext the server sent after the handshake, with ``payload`` and a close_notify sent
    in one go; read until the server closes."""
    sock = socket.create_connection((host, port), timeout=20)
    try:
        if starttls:
            sock.recv(4096)  # greeting
            sock.sendall(starttls)
            assert sock.recv(4096)[:1] in (b"2", b"+")
        tls, incoming, outgoing = tls_by_hand(sock)
        tls.write(payload)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()  # our close_notify; the server's comes later
        sock.sendall(outgoing.read())
        got = b""
        while data := sock.recv(65536):
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    got += chunk
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
        return got
    finally:
        sock.close()


def test_smtp_submissions_answers_all_after_close_notify(srv: Server) -> None:
    auth = base64.b64encode(b"\0alice@a.test\0alice-pw")
    payload = (
        b"EHLO c.test\r\nAUTH PLAIN " + auth + b"\r\nMAIL FROM:<alice@a.test>\r\n"
        b"RCPT TO:<alice@a.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    got = pipelined_then_close_notify(srv.host, srv.ports["submissions"], payload)
    codes = [line[:3] for line in got.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220", b"250", b"235", b"250", b"250", b"354", b"250", b"221"], got
    assert len(srv.wait_messages("alice@a.test", 1)) == 1


def test_pop3s_answers_the_login_after_close_notify(srv: Server) -> None:
    payload = b"USER alice@a.test\r\nPASS alice-pw\r\nSTAT\r\nQUIT\r\n"
    got = pipelined_then_close_notify(srv.host, srv.ports["pop3s"], payload)
    assert [line[:3] for line in got.split(b"\r\n") if line] == [b"+OK"] * 5, got


def test_stls_then_pipelining_then_close_notify(srv: Server) -> None:
    payload = b"USER alice@a.test\r\nPASS alice-pw\r\nQUIT\r\n"
    got = pipelined_then_close_notify(srv.host, srv.ports["pop3"], payload, starttls=b"STLS\r\n")
    assert [line[:3] for line in got.split(b"\r\n") if line] == [b"+OK"] * 3, got


def test_client_closed_tls_connections_log_no_asyncio_warning(srv: Server) -> None:
    for port in (srv.ports["submissions"], srv.ports["pop3s"]):
        for _ in range(3):
            pipelined_then_close_notify(srv.host, port, b"QUIT\r\n")
            with (
                socket.create_connection((srv.host, port), timeout=10) as raw,
                insecure().wrap_socket(raw) as tls,
            ):
                tls.recv(4096)  # greeting, then the client just goes
    srv.stop()
    assert "eof_received" not in srv.log.read_text()
