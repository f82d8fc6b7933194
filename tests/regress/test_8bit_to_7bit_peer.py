"""8-bit MIME was sent raw to a server that does not offer 8BITMIME; RFC 6152 §3 wants it
converted (or bounced). postroom converts, as Postfix does: quoted-printable for text."""

from __future__ import annotations

import email
import email.policy

from postroom.delivery.remote import RemoteDelivery
from postroom.resolver import Route, StaticResolver
from postroom.smtp.client_engine import Outcome
from tests.integration.test_remote_delivery import Sink, config, free_port, message, mx, run

EIGHT_BIT = (
    b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus M\xc3\xbcnchen\r\n"
)
SEVEN_BIT_PEER = ("PIPELINING", "SIZE 100000", "ENHANCEDSTATUSCODES")


def relay(extensions: tuple[str, ...]) -> tuple[bytes, list[str]]:
    port = free_port()
    got: list[tuple[bytes, list[str]]] = []

    async def main() -> None:
        sink = await Sink("127.0.0.2", port, extensions=extensions).start()
        resolver = StaticResolver({"b.test": Route((mx("mx.b.test", "127.0.0.2", 10),))})
        remote = RemoteDelivery(config(port), resolver, reply_timeout=5)
        try:
            (result,) = await remote.deliver("b.test", message("bob@b.test"), EIGHT_BIT)
        finally:
            await remote.aclose()
            await sink.stop()
        assert result.outcome is Outcome.DELIVERED
        got.append((sink.messages[0].data, sink.commands))

    run(main)
    return got[0]


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
