"""Lines over 998 octets were relayed unchanged: a 5,000-octet line reached the next hop (RFC 5321
§4.5.3.1.6 allows 998 plus CRLF). The affected part is re-encoded; a reader decodes the same."""

from __future__ import annotations

import email
import email.policy

from postroom.smtp.client_engine import Outcome
from tests.integration.test_remote_delivery import deliver_once

LINE = b"".join(b"%05d " % i for i in range(834))  # 5,004 octets, spaces in it
PLAIN = b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: long\r\n\r\n" + LINE + b"\r\nbye\r\n"
MULTI = (
    b"From: alice@a.test\r\nTo: bob@b.test\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain\r\n\r\nshort\r\n"
    b"--b1\r\nContent-Type: text/html\r\n\r\n<p>" + b"x" * 5000 + b"</p>\r\n"
    b"--b1--\r\n"
)


def relay(data: bytes) -> bytes:
    result, sink = deliver_once(data)
    assert result.outcome is Outcome.DELIVERED
    return sink.messages[0].data


def texts(raw: bytes) -> list[bytes]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [p.get_payload(decode=True) for p in msg.walk() if not p.is_multipart()]


def test_no_line_over_998_octets_reaches_the_next_hop() -> None:
    for data in (PLAIN, MULTI):
        sent = relay(data)
        assert max(len(line) for line in sent.split(b"\r\n")) <= 998
        assert texts(sent) == texts(data)


def test_only_the_long_part_changes() -> None:
    sent = relay(MULTI)
    assert sent.startswith(MULTI[: MULTI.index(b"--b1\r\nContent-Type: text/html")])
    assert b"Content-Transfer-Encoding: quoted-printable" in sent
