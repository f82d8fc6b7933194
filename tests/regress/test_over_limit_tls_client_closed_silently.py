"""A client over the connection limits on an implicit-TLS port (465, 995) was closed without a
word, before its TLS handshake: its logs said "connection reset" or "EOF in violation of
protocol", never why. Now the handshake is finished (within a short time-out, a bounded number
at once) and the client reads the same refusal as on a plaintext port: ``421 4.7.0`` (SMTP),
``-ERR [SYS/TEMP]`` (POP3)."""

from __future__ import annotations

import contextlib
import poplib
import smtplib
import socket
import ssl
import time
import urllib.request

import pytest

from postroom.connection import REFUSAL_TLS_MAX, REFUSAL_TLS_TIMEOUT
from postroom.metrics import parse
from tests.conftest import Server, ServerFactory, insecure, wait_until


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    return server_factory(
        domains=("a.test",),
        services=("submissions", "pop3s", "http"),
        extra_toml="[limits]\nmax_connections_per_ip = 1\nper_ip_exempt = []",
    )


def smtps_session(srv: Server) -> smtplib.SMTP_SSL:
    """The one session this client IP may have (once the server has seen the end of the
    connection that waited for its port at start)."""

    def connect() -> smtplib.SMTP_SSL | None:
        with contextlib.suppress(smtplib.SMTPConnectError):
            port = srv.ports["submissions"]
            return smtplib.SMTP_SSL(srv.host, port, context=insecure(), timeout=10)
        return None

    return wait_until(connect, 10, "a session below the limit")


def handshakes(srv: Server, outcome: str) -> float:
    """postroom_tls_handshakes_total of the submissions service with this outcome."""
    url = f"http://{srv.host}:{srv.ports['http']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        samples = parse(reply.read().decode())
    return sum(
        count
        for (name, labels), count in samples.items()
        if name == "postroom_tls_handshakes_total"
        and ("service", "submissions") in labels
        and ("outcome", outcome) in labels
    )


def test_smtp_client_over_the_limit_reads_421_over_tls(srv: Server) -> None:
    port = srv.ports["submissions"]
    with smtps_session(srv) as first:
        assert first.noop()[0] == 250
        ok = handshakes(srv, "ok")
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP_SSL(srv.host, port, context=insecure(), timeout=10)
        assert refused.value.smtp_code == 421
        assert refused.value.smtp_error.startswith(b"4.7.0 ")
        # The refused client's handshake is a handshake like any other in the metrics.
        assert handshakes(srv, "ok") == ok + 1


class Pop3s(poplib.POP3_SSL):
    """poplib's client, which also closes its socket when the greeting is ``-ERR``."""

    def __init__(self, host: str, port: int) -> None:
        try:
            super().__init__(host, port, context=insecure(), timeout=10)
        except poplib.error_proto:
            self.close()
            raise


def test_pop3_client_over_the_limit_reads_sys_temp_over_tls(srv: Server) -> None:
    port = srv.ports["pop3s"]

    def connect() -> Pop3s | None:
        with contextlib.suppress(poplib.error_proto):
            return Pop3s(srv.host, port)
        return None

    first = wait_until(connect, 10, "a session below the limit")
    try:
        with pytest.raises(poplib.error_proto) as refused:
            Pop3s(srv.host, port)
        assert refused.value.args[0].startswith(b"-ERR [SYS/TEMP] ")
    finally:
        first.quit()


def _tls_greeting(srv: Server) -> bytes:
    """What a TLS client over the limit reads: the refusal, or b"" (closed without a word)."""
    raw = socket.create_connection((srv.host, srv.ports["submissions"]), timeout=10)
    try:
        with insecure().wrap_socket(raw, server_hostname="a.test") as tls:
            return tls.recv(200)
    except (ssl.SSLError, OSError):
        return b""


def test_silent_handshakes_are_bounded_and_time_out(srv: Server) -> None:
    # Over-limit clients that never send a ClientHello hold the handshake slots for
    # REFUSAL_TLS_TIMEOUT at most; meanwhile one more is closed without a word (what a flood
    # of them costs is bounded), and after it a client is answered again.
    port = srv.ports["submissions"]
    with smtps_session(srv):
        silent = [socket.create_connection((srv.host, port)) for _ in range(REFUSAL_TLS_MAX)]
        try:
            started = time.monotonic()
            assert _tls_greeting(srv) == b""
            for s in silent:
                s.settimeout(REFUSAL_TLS_TIMEOUT + 10)
                assert s.recv(100) == b""  # closed by the server at its time-out
            assert time.monotonic() - started >= REFUSAL_TLS_TIMEOUT - 1
        finally:
            for s in silent:
                s.close()
        wait_until(lambda: _tls_greeting(srv).startswith(b"421 4.7.0 "), 10, "a refusal")
