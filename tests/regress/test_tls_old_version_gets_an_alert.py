"""A TLS 1.0/1.1 client gets a ``protocol_version`` alert, not a bare close.

The handshake failure used to abort the transport before OpenSSL's alert was sent, so an old
client saw the connection drop and could not tell why. The connection glue now does TLS over
memory buffers and sends what OpenSSL queued (the alert) before it closes: on implicit TLS and
after STARTTLS/STLS alike.
"""

from __future__ import annotations

import socket
import ssl
import warnings

import pytest

from tests.conftest import Server, ServerFactory


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    return server_factory(services=("smtp", "submissions", "pop3", "pop3s"))


def tls11() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # on purpose: an old client
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot speak TLS 1.1 at all")
    return ctx


def handshake_error(sock: socket.socket) -> str:
    with pytest.raises(ssl.SSLError) as exc:
        tls11().wrap_socket(sock).do_handshake()
    return str(exc.value)


@pytest.mark.parametrize("service", ["submissions", "pop3s"])
def test_implicit_tls(srv: Server, service: str) -> None:
    with socket.create_connection((srv.host, srv.ports[service]), timeout=10) as sock:
        assert "PROTOCOL_VERSION" in handshake_error(sock).upper()


@pytest.mark.parametrize(("service", "command"), [("smtp", b"STARTTLS"), ("pop3", b"STLS")])
def test_after_starttls(srv: Server, service: str, command: bytes) -> None:
    with socket.create_connection((srv.host, srv.ports[service]), timeout=10) as sock:
        sock.recv(4096)
        if service == "smtp":
            sock.sendall(b"EHLO c.test\r\n")
            while not sock.recv(4096).endswith(b"HELP\r\n"):
                pass
        sock.sendall(command + b"\r\n")
        assert sock.recv(4096)[:1] in (b"2", b"+")
        assert "PROTOCOL_VERSION" in handshake_error(sock).upper()
