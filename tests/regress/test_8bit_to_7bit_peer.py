"""8-bit MIME was sent raw to a server that does not offer 8BITMIME; RFC 6152 §3 wants it
converted (or bounced). postroom converts, as Postfix does: quoted-printable for text."""

from __future__ import annotations

import email
import email.policy

from postroom.smtp.client_engine import Outcome
from tests.integration.test_remote_delivery import deliver_once

EIGHT_BIT = (
    b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus M\xc3\xbcnchen\r\n"
)
SEVEN_BIT_PEER = ("PIPELINING", "SIZE 100000", "ENHANCEDSTATUSCODES")


def relay(extensions: tuple[str, ...]) -> tuple[bytes, list[str]]:
    result, sink = deliver_once(EIGHT_BIT, extensions=extensions)
    assert result.outcome is Outcome.DELIVERED
    return sink.messages[0].data, sink.commands


def test_8bit_mime_is_converted_for_a_peer_without_8bitmime() -> None:
    sent, commands = relay(SEVEN_BIT_PEER)
    assert sent.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in sent
    assert b"Content-Transfer-Encoding: 8bit" not in sent
    assert not any("BODY=" in c for c in commands)
    msg = email.message_from_bytes(sent, policy=email.policy.compat32)
    assert msg.get_payload(decode=True) == "Grüße aus München\r\n".encode()


def test_8bit_goes_unchanged_to_a_peer_with_8bitmime() -> None:
    sent, commands = relay((*SEVEN_BIT_PEER, "8BITMIME"))
    assert sent == EIGHT_BIT
    assert any(c.startswith("MAIL FROM:") and "BODY=8BITMIME" in c for c in commands)
