"""SMTP smuggling (2023, CVE-2023-51764/51765/51766 class): a bare CR or LF around a dot must
never end the message or start a second one. postroom rejects the message (550 5.5.2), and one
with a NUL octet (554 5.6.0): a next hop that drops NULs would read ``CRLF NUL "." CRLF`` as the
end of the message. The end-of-data sequences are those of the published smuggling scanners
(SEC Consult's list and its variants with NUL, as smtp_smuggling_checker tries them)."""

from __future__ import annotations

import pytest

from tests.conftest import Server, converse

VARIANTS = [b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r\n", b"\r\n.\n", b"\n.\r", b"\r.\r\n", b"\r\n.\r"]
VARIANTS += [b"\n\n.\r\n", b"\r\n\r.\r\n", b"\n\n.\n"]
# With NUL (rejected as 554 5.6.0; SEC Consult's "\r\n\x00.\r\n" and relatives).
NUL_VARIANTS = [
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n\x00.\r",
    b"\r\n\x00.\n",
    b"\r\n\x00\r\n.\r",
    b"\r\x00\n.\r\x00\n",
    b"\r\n\x00.\x00\r\n",
]


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
    run_cli(
        "user", "add", "alice@a.test", "--password-stdin", "--allow-short", config=cfg, stdin="pw\n"
    )
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


def smuggle(srv: Server, sep: bytes) -> list[bytes]:
    """Send a message that hides a second one behind ``sep``; the final replies."""
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
    # One DATA only: exactly one 354, whatever followed it.
    assert sum(r.startswith(b"354") for r in replies) == 1, out
    return replies


def still_serves(srv: Server, before: int) -> None:
    ok = converse(
        srv,
        b"EHLO good\r\nMAIL FROM:<g@good.test>\r\nRCPT TO:<alice@a.test>\r\n"
        b"DATA\r\nSubject: fine\r\n\r\nfine\r\n.\r\nQUIT\r\n",
    )
    assert b"250 2.0.0 OK: queued as" in ok
    assert len(srv.wait_messages("alice@a.test", before + 1)) == before + 1


@pytest.mark.parametrize("sep", VARIANTS, ids=[repr(v) for v in VARIANTS])
def test_smuggled_message_is_not_delivered(srv: Server, sep: bytes) -> None:
    before = len(srv.messages("alice@a.test"))
    replies = smuggle(srv, sep)
    # The DATA's final reply is the bare-LF rejection.
    assert replies[4].startswith(b"550 5.5.2"), replies
    msgs = srv.wait_messages("alice@a.test", before + 1, timeout=1)
    assert len(msgs) == before
    assert not any(b"smuggled" in m for m in msgs)
    still_serves(srv, before)


@pytest.mark.parametrize("sep", NUL_VARIANTS, ids=[repr(v) for v in NUL_VARIANTS])
def test_nul_smuggling_is_refused(srv: Server, sep: bytes) -> None:
    before = len(srv.messages("alice@a.test"))
    replies = smuggle(srv, sep)
    assert replies[4][:1] == b"5", replies
    assert replies[4].startswith((b"554 5.6.0", b"550 5.5.2")), replies
    msgs = srv.wait_messages("alice@a.test", before + 1, timeout=1)
    assert len(msgs) == before
    assert not any(b"\0" in m for m in srv.messages("alice@a.test"))
    still_serves(srv, before)


def test_nul_in_bdat_is_refused(srv: Server) -> None:
    before = len(srv.messages("alice@a.test"))
    body = b"Subject: s\r\n\r\nouter\r\n\x00.\r\nMAIL FROM:<admin@a.test>\r\n"
    out = converse(
        srv,
        b"EHLO evil\r\nMAIL FROM:<a@evil.test>\r\nRCPT TO:<alice@a.test>\r\n"
        + b"BDAT %d LAST\r\n" % len(body)
        + body
        + b"QUIT\r\n",
    )
    assert b"554 5.6.0" in out, out
    assert len(srv.wait_messages("alice@a.test", before + 1, timeout=1)) == before
