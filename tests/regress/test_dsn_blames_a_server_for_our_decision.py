"""A failure postroom decided itself (5.6.9: the next hop has no SMTPUTF8; a message larger
than its SIZE) was reported as "host mx... said" with ``Diagnostic-Code: smtp;`` and a
``Remote-MTA``, as if that server had refused it. It is now told in postroom's own words
(``Diagnostic-Code: X-Postroom;``, no Remote-MTA); a server's real reply keeps ``smtp;``. The
reports parse with flufl.bounce (GNU Mailman's bounce detector)."""

from __future__ import annotations

import email
import time
from email.message import Message as EmailMessage

from flufl.bounce import all_failures

from postroom.delivery.dsn import build_dsn
from postroom.delivery.remote import DeliveryResult, RemoteDelivery
from postroom.queue.envelope import Recipient as QueuedRecipient
from postroom.queue.runner import _dsn_recipient
from postroom.resolver import Route, StaticResolver
from postroom.smtp.client_engine import ForwardPath as Recipient
from postroom.smtp.client_engine import Outcome
from postroom.smtp.client_engine import OutgoingMessage as Message
from tests.integration.test_remote_delivery import config, deliver_once, free_port, mx, run

UTF8_HEADERS = "From: alice@a.test\r\nSubject: Grüße\r\n\r\nhi\r\n".encode()
NO_UTF8 = ("PIPELINING", "SIZE 100000", "8BITMIME", "ENHANCEDSTATUSCODES")


def deliver(message: Message, data: bytes, **sink: object) -> DeliveryResult:
    return deliver_once(data, message, **sink)[0]


def bounce_for(result: DeliveryResult) -> bytes:
    """The report the queue runner makes from what it stores for the recipient."""
    queued = QueuedRecipient(
        result.recipient.address,
        status="bounced",
        last_error=str(result.reply),
        remote_mta=result.remote_mta,
    )
    return build_dsn(
        hostname="mx.a.test",
        sender="alice@a.test",
        recipients=[_dsn_recipient(queued, "failed", time.time())],
        original=UTF8_HEADERS,
        arrival=time.time(),
        now=time.time(),
    )


def status_block(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw)
    _per_message, block = msg.get_payload()[1].get_payload()
    return block  # type: ignore[no-any-return]


def test_smtputf8_refusal_is_ours_not_the_servers() -> None:
    message = Message("alice@a.test", (Recipient("bob@b.test"),), smtputf8=True)
    result = deliver(message, UTF8_HEADERS, extensions=NO_UTF8)
    assert result.outcome is Outcome.PERMANENT
    assert result.remote_mta is None
    raw = bounce_for(result)
    block = status_block(raw)
    assert block["Remote-MTA"] is None
    assert block["Status"] == "5.6.9"
    diagnostic = " ".join(block["Diagnostic-Code"].split())
    assert diagnostic.startswith("X-Postroom; mx.b.test[127.0.0.2]: the message has UTF-8 header")
    assert "SMTPUTF8" in diagnostic
    assert b" said:" not in raw
    assert all_failures(email.message_from_bytes(raw)) == (frozenset(), {b"bob@b.test"})


def test_too_big_for_the_peer_is_ours_too() -> None:
    message = Message("alice@a.test", (Recipient("bob@b.test"),))
    result = deliver(message, b"Subject: big\r\n\r\n" + b"x" * 900 * 200 + b"\r\n")
    assert result.outcome is Outcome.PERMANENT
    assert result.remote_mta is None
    block = status_block(bounce_for(result))
    assert block["Remote-MTA"] is None
    assert block["Diagnostic-Code"].startswith("X-Postroom; mx.b.test[127.0.0.2]: the message")


def test_a_servers_refusal_still_names_the_server() -> None:
    message = Message("alice@a.test", (Recipient("nobody@b.test"),))
    result = deliver(message, b"Subject: hi\r\n\r\nhi\r\n", reject={"nobody@b.test"})
    assert result.remote_mta == "mx.b.test"
    raw = bounce_for(result)
    block = status_block(raw)
    assert block["Remote-MTA"] == "dns; mx.b.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert b"host mx.b.test said: 550 5.1.1 no such user" in raw
    assert all_failures(email.message_from_bytes(raw)) == (frozenset(), {b"nobody@b.test"})


def test_a_refusing_greeting_is_quoted_word_for_word() -> None:
    """RFC 3464 §2.3.6: ``Diagnostic-Code: smtp;`` is what the server said. A greeting's 554
    (and a 421 until the message expired) was quoted in postroom's rewording ("host ...
    refused to talk to me: go away"; "host X said: ... X said: busy")."""
    message = Message("alice@a.test", (Recipient("bob@b.test"),))
    for greeting, outcome in (
        (b"554 5.7.1 go away", Outcome.PERMANENT),
        (b"421 4.3.2 busy, go away", Outcome.TEMPORARY),
    ):
        result = deliver(message, b"Subject: hi\r\n\r\nhi\r\n", greeting=greeting)
        assert result.outcome is outcome
        assert result.remote_mta == "mx.b.test"
        raw = bounce_for(result)
        block = status_block(raw)
        assert block["Diagnostic-Code"] == f"smtp; {greeting.decode()}"
        assert raw.count(b" said:") == 1


def test_no_connection_names_no_remote_mta() -> None:
    port = free_port()  # nothing listens there
    out: list[DeliveryResult] = []

    async def main() -> None:
        resolver = StaticResolver({"b.test": Route((mx("mx.b.test", "127.0.0.2", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        message = Message("alice@a.test", (Recipient("bob@b.test"),))
        out.extend(await remote.deliver("b.test", message, b"Subject: x\r\n\r\nx\r\n"))

    run(main)
    (result,) = out
    assert result.outcome is Outcome.TEMPORARY
    assert result.remote_mta is None
    assert "connect to mx.b.test[127.0.0.2]" in result.reply.text
