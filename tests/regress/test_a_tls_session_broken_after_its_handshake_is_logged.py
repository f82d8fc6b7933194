"""A TLS session that broke after its handshake (a forged record, a renegotiation refused)
was logged as ``postroom[PID]: POP3 TLS with 127.0.0.1 failed: ...``: without the service's
name, the address in brackets or an event that operations.md lists. It is now the
``tls_broken`` event under the port's own name (``tls_failed`` stays the handshake's)."""

from __future__ import annotations

import json
import socket

from tests.conftest import ServerFactory, tls_by_hand, wait_until


def test_a_forged_record_after_the_handshake_is_a_tls_broken_event(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(extra_toml='log_format = "json"\n')
    sock = socket.create_connection((srv.host, srv.ports["pop3s"]), timeout=20)
    try:
        _tls, _incoming, outgoing = tls_by_hand(sock)
        sock.sendall(outgoing.read())
        sock.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data, bad MAC
        while sock.recv(65536):  # the server sends its alert and closes
            pass
    finally:
        sock.close()

    def events() -> list[dict[str, object]]:
        lines = srv.log.read_text().splitlines()
        return [json.loads(ln) for ln in lines if ln.startswith("{")]

    def broken() -> list[dict[str, object]]:
        return [e for e in events() if e.get("event") == "tls_broken"]

    wait_until(lambda: bool(broken()), 5)
    (event,) = broken()
    assert event["service"] == "pop3s" and event["client"] == "127.0.0.1"
    assert "bad record mac" in str(event["error"]).lower()
