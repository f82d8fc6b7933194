"""A session the client dropped (mid-DATA, between BDAT chunks, or after its login) was
logged with the same ``disconnect`` line as one it ended with QUIT: an operator could not
tell a client that died in the middle of its message from one that was done. The line now
says where it was left (``lost_after``, as Postfix's "lost connection after DATA")."""

from __future__ import annotations

import json
import poplib
import socket
import time

from tests.conftest import ServerFactory, wait_until


def test_the_disconnect_line_says_where_a_dropped_session_was(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(
        domains=("a.test",),
        services=("smtp", "pop3", "submissions"),
        extra_toml=(
            'log_format = "json"\n[auth]\nallow_plaintext = true\nchecks = false\n'
            '[limits]\ntls_handshake_timeout = "1s"'
        ),
    )
    srv.add_user("alice@a.test", "pw")
    with socket.create_connection((srv.host, srv.ports["smtp"]), 10) as s:
        s.sendall(b"EHLO c\r\nMAIL FROM:<c@c.test>\r\nRCPT TO:<alice@a.test>\r\nDATA\r\n")
        wait_until(lambda: b"354" in s.recv(4096), what="354")
    with socket.create_connection((srv.host, srv.ports["smtp"]), 10) as s:
        s.sendall(b"QUIT\r\n")
        wait_until(lambda: b"221" in s.recv(4096), what="221")
    pop = poplib.POP3(srv.host, srv.ports["pop3"], timeout=10)
    pop.user("alice@a.test")
    pop.pass_("pw")
    pop.file.close()
    pop.sock.close()
    # A handshake the client gave up, and one the server gave up on (recheck probe: it read
    # lost_after=CONNECTED, as if the client had left).
    with socket.create_connection((srv.host, srv.ports["submissions"]), 10) as s:
        s.sendall(b"\x16\x03\x01")
    with socket.create_connection((srv.host, srv.ports["submissions"]), 10) as s:
        s.sendall(b"\x16\x03\x01")
        wait_until(lambda: s.recv(100) == b"", 10, "the server to give up the handshake")

    def ends() -> list[dict[str, object]]:
        lines = [json.loads(x) for x in srv.log.read_text().splitlines() if x.startswith("{")]
        # (those of the start's port probes, which said nothing, are left out)
        return [x for x in lines if x.get("event") == "disconnect" and x["bytes_in"]]

    wait_until(lambda: len(ends()) == 5, 10, "five disconnect lines")
    time.sleep(0.1)
    assert [e.get("lost_after") for e in ends()] == ["DATA", None, "TRANSACTION", "TLS", None]
