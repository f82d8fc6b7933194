"""A server that answered ``DATA`` with ``250`` instead of ``354`` had the message counted as
delivered: the client never sent a byte of it, logged ``status=sent`` and dropped it from the
queue, so the mail was lost without a bounce. RFC 5321 §4.3.2 allows only 354 (go ahead) or a
failure there; the message goes out only after the server's 354 and counts as delivered only
after the reply to its final dot. A positive reply to DATA is a protocol error now: the session
ends and the recipients are tried again later (another MX first)."""

from __future__ import annotations

import pytest

from postroom.smtp.client_engine import (
    ClientEngine,
    Closed,
    Event,
    MessageDone,
    Outcome,
    OutgoingMessage,
    TLSPolicy,
)
from postroom.smtp.client_engine import ForwardPath as Recipient

DATA = b"From: a@a.test\r\nSubject: hi\r\n\r\nhello\r\n"


def events(engine: ClientEngine) -> list[Event]:
    out = []
    while (ev := engine.next_event()) is not None:
        out.append(ev)
    return out


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize("reply", [b"250 2.0.0 ok", b"251 fine", b"334 what"])
def test_a_positive_reply_to_data_is_not_a_delivery(pipelining: bool, reply: bytes) -> None:
    engine = ClientEngine("mx.a.test", tls=TLSPolicy.NONE)
    ext = b"250-PIPELINING\r\n" if pipelining else b""
    engine.receive_data(b"220 mx.b.test ESMTP\r\n250-mx.b.test\r\n" + ext + b"250 SIZE\r\n")
    events(engine)
    engine.send_message(OutgoingMessage("alice@a.test", (Recipient("bob@b.test"),)), DATA)
    engine.receive_data(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n" + reply + b"\r\n")
    sent = engine.data_to_send()
    assert b"Subject: hi" not in sent  # the message was never sent ...
    done, closed = events(engine)
    assert isinstance(done, MessageDone)
    (result,) = done.results
    assert result.outcome is Outcome.TEMPORARY  # ... so it is not delivered: tried again
    assert result.reply.local and result.reply.status == "4.5.0"
    assert isinstance(closed, Closed)
