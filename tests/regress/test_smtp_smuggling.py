"""SMTP smuggling (2023, CVE-2023-51764/51765/51766 class): a bare CR or LF around a dot must
never end the message or start a second one. postroom rejects the message (550 5.5.2)."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import Server

VARIANTS = [b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r\n", b"\r\n.\n", b"\n.\r", b"\r.\r\n", b"\r\n.\r"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Server:
    # One server for all variants (module scope): build it by hand rather than per test.
    from tests.conftest import free_port, run_cli

    base = tmp_path_factory.mktemp("smuggle")
    port = free_port()
    cfg = base / "p.toml"
    cfg.write_text(
        f'hostname = "mx.a.test"\ndomains = ["a.test"]\ndata_dir = "{base}/data"\n'
        f'[listen]\nsmtp = ["127.0.0.1:{port}"]\n'
    )
    server = Server(
        cfg, base / "data", "127.0.0.1", {"smtp": port}, ["a.test"], log=base / "server.log"
    )
    run_cli("user", "add", "alice@a.test", "--password-stdin", config=cfg, stdin="pw\n")
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


def converse(srv: Server, payload: bytes) -> bytes:
    with socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10) as s:
        s.recv(1000)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("sep", VARIANTS, ids=[repr(v) for v in VARIANTS])
def test_smuggled_message_is_not_delivered(srv: Server, sep: bytes) -> None:
    before = len(srv.messages("alice@a.test"))
    payload = (
        b"EHLO evil\r\nMAIL FROM:<a@evil.test>\r\nRCPT TO:<alice@a.test>\r\nDATA\r\n"
        b"Subject: outer\r\n\r\nouter body"
        + sep
        + b"MAIL FROM:<admin@a.test>\r\nRCPT TO:<alice@a.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\nQUIT\r\n"
    )
    out = converse(srv, payload)
    replies = [ln for ln in out.split(b"\r\n") if ln[3:4] == b" "]
    assert len(replies) >= 5, out
    # One DATA: exactly one final reply for it, and it is the bare-LF rejection.
    assert replies[4].startswith(b"550 5.5.2"), out
    assert sum(r.startswith(b"354") for r in replies) == 1
    msgs = srv.wait_messages("alice@a.test", before + 1, timeout=1)
    assert len(msgs) == before
    assert not any(b"smuggled" in m for m in msgs)
    # ...and the server still serves a normal client.
    ok = converse(
        srv,
        b"EHLO good\r\nMAIL FROM:<g@good.test>\r\nRCPT TO:<alice@a.test>\r\n"
        b"DATA\r\nSubject: fine\r\n\r\nfine\r\n.\r\nQUIT\r\n",
    )
    assert b"250 2.0.0 OK: queued as" in ok
    assert len(srv.wait_messages("alice@a.test", before + 1)) == before + 1
