"""Raw 8-bit octets in the header section of a relayed message, to a next hop that does not
offer SMTPUTF8 (RFC 6531 §3.4; RFC 6532). Before, a message given to us with SMTPUTF8 was
bounced with 5.6.7 ("non-ASCII addresses not permitted") although its addresses were ASCII,
and 8-bit header fields went raw to a server without 8BITMIME, a 7-bit channel (RFC 6152 §3).
Now: a UTF-8 header message given with SMTPUTF8 bounces with 5.6.9 and says why; one given
without SMTPUTF8 goes unchanged to a server with 8BITMIME (legacy mail, as other MTAs relay
it), and bounces with 5.6.3 at a server without 8BITMIME. Through the real server, a loopback
DNS and a loopback sink that does not offer SMTPUTF8."""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Server, ServerFactory, wait_until
from tests.smtpsink import relay_to_sink

MESSAGE = "From: alice@a.test\r\nTo: fwd@a.test\r\nSubject: Grüße aus München\r\n\r\nhi\r\n"


@pytest.fixture(params=[("8BITMIME",), ()], ids=["8bitmime", "7bit"])
def relay(
    request: pytest.FixtureRequest, server_factory: ServerFactory
) -> Iterator[tuple[Server, Any]]:
    """A sink without SMTPUTF8 (with or without 8BITMIME) behind fwd@a.test."""
    with relay_to_sink(server_factory, request.param) as pair:
        yield pair


def send(srv: Server, smtputf8: bool) -> None:
    options = ["SMTPUTF8"] if smtputf8 else []
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.sendmail("alice@a.test", ["fwd@a.test"], MESSAGE.encode(), mail_options=options)


def bounce(srv: Server) -> tuple[str, str]:
    """(Status, Diagnostic-Code) of the one bounce alice got."""
    (raw,) = srv.wait_messages("alice@a.test", 1, timeout=20)
    report = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert report.get_content_type() == "multipart/report"
    _per_message, block = report.get_payload()[1].get_payload()
    return block["Status"], " ".join(block["Diagnostic-Code"].split())


def test_utf8_header_message_bounces_with_5_6_9(relay: tuple[Server, Any]) -> None:
    srv, sink = relay
    send(srv, smtputf8=True)
    status, diagnostic = bounce(srv)
    assert status == "5.6.9"
    assert "UTF-8 header fields" in diagnostic and "SMTPUTF8" in diagnostic
    assert sink.received == []


def test_legacy_8bit_headers_go_unchanged_or_bounce_with_5_6_3(
    relay: tuple[Server, Any],
) -> None:
    srv, sink = relay
    send(srv, smtputf8=False)
    if "8BITMIME" in sink.extensions:
        wait_until(lambda: sink.received, 20, "the relayed message")
        (mail,) = sink.mails
        assert "BODY=8BITMIME" in mail and "SMTPUTF8" not in mail
        (data,) = sink.received
        assert data.endswith(MESSAGE.encode())  # after our Received and Return-Path lines
        assert srv.messages("alice@a.test") == []
    else:
        status, diagnostic = bounce(srv)
        assert status == "5.6.3"
        assert "8-bit header fields" in diagnostic and "8BITMIME" in diagnostic
        assert sink.received == []
