"""A message that needs SMTPUTF8 (here: a non-ASCII recipient) and a domain whose best MX host
does not offer it. That host's missing SMTPUTF8 bounced the message at once (5.6.7), though the
next MX host offers it: a capability one host lacks is that host's shortcoming, not the
domain's, and the next host is tried (RFC 5321 §5.1; RFC 6531 §3.2). Only when no host offers
SMTPUTF8 does the recipient bounce. Through the real server, a loopback DNS and two loopback
sinks, mx1.b.test (preference 10) and mx2.b.test (preference 20)."""

from __future__ import annotations

import email
import email.policy
import smtplib
from email.message import EmailMessage

from tests.conftest import Server, ServerFactory, wait_until
from tests.smtpsink import relay_to_sinks

TARGET = "bøb@b.test"
MESSAGE = b"From: alice@a.test\r\nTo: fwd@a.test\r\nSubject: hi\r\n\r\nhello\r\n"
UTF8 = ("8BITMIME", "SMTPUTF8")
NO_UTF8 = ("8BITMIME",)


def send(srv: Server) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.sendmail("alice@a.test", ["fwd@a.test"], MESSAGE)


def test_the_message_goes_to_the_next_mx_host_that_offers_smtputf8(
    server_factory: ServerFactory,
) -> None:
    with relay_to_sinks(server_factory, NO_UTF8, UTF8, target=TARGET) as (srv, (mx1, mx2)):
        send(srv)
        wait_until(lambda: mx2.received, 20, "the message at mx2.b.test")
        assert mx1.mails == [] and mx1.received == []
        (mail,) = mx2.mails
        assert mail.startswith("MAIL FROM:<alice@a.test>") and "SMTPUTF8" in mail
        assert mx2.received[0].endswith(MESSAGE)
        wait_until(srv.queue_empty, 20, "the queue to empty")
        assert srv.messages("alice@a.test") == []  # no bounce


def test_without_smtputf8_at_every_mx_host_the_recipient_bounces(
    server_factory: ServerFactory,
) -> None:
    with relay_to_sinks(server_factory, NO_UTF8, NO_UTF8, target=TARGET) as (srv, sinks):
        send(srv)
        (raw,) = srv.wait_messages("alice@a.test", 1, timeout=20)
        report = email.message_from_bytes(raw, EmailMessage, policy=email.policy.SMTPUTF8)
        assert report.get_content_type() == "multipart/report"
        # RFC 6533 §3: a UTF-8 recipient, so message/global-delivery-status, which the email
        # package does not parse: its per-recipient block is the last one.
        _human, status, *_original = report.iter_parts()
        assert status.get_content_type() == "message/global-delivery-status"
        text = status.get_content().decode()
        block = email.message_from_string(text.strip().split("\r\n\r\n")[-1])
        assert block["Final-Recipient"] == f"utf-8; {TARGET}"
        assert block["Status"] == "5.6.7"
        diagnostic = " ".join(block["Diagnostic-Code"].split())
        # Postroom's own finding, naming the last host tried (not "the host said").
        assert diagnostic.startswith("X-Postroom; mx2.b.test[127.0.0.2]: the server does not")
        assert "SMTPUTF8" in diagnostic
        assert all(sink.mails == [] for sink in sinks)
