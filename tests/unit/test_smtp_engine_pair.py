"""The SMTP client engine talking to the SMTP server engine in memory: no sockets, no sleeps.

Whatever the client is given (bodies with leading dots, bare line ends, empty lines, many
recipients, some refused), the server receives exactly what the client meant to send, and
both sides agree on every recipient's fate; STARTTLS is agreed and both restart afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.smtp.client_engine import (
    ClientEngine,
    ClientState,
    Closed,
    ForwardPath,
    MessageDone,
    Outcome,
    OutgoingMessage,
    Ready,
    TLSPolicy,
)
from postroom.smtp.server_engine import (
    DataChunk,
    MailFrom,
    MessageEnd,
    RcptTo,
    ServerEngine,
    ServerFeatures,
    ServerState,
)
from postroom.wire import replies
from postroom.wire.events import NEED_DATA, Closing, StartTLS
from postroom.wire.framing import to_crlf
from postroom.wire.replies import Reply

GREETING = b"220 mx.test ESMTP\r\n"


@dataclass
class Pair:
    """A client and a server engine joined by two in-memory pipes, with a fake policy that
    refuses recipients whose local part starts with "no"."""

    client: ClientEngine
    server: ServerEngine
    received: list[bytes] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    client_events: list[object] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)  # every octet the client sent
    _body: list[bytes] = field(default_factory=list)
    tls_switches: int = 0

    def pump(self, limit: int = 10_000) -> None:
        """Move bytes both ways until neither side has anything to say."""
        for _ in range(limit):
            moved = False
            out = self.client.data_to_send()
            if out:
                self.sent += out
                self.server.receive_data(out)
                moved = True
            self._serve()
            back = self.server.data_to_send()
            if back:
                self.client.receive_data(back)
                moved = True
            while (event := self.client.next_event()) is not None:
                self.client_events.append(event)
                moved = True
                if isinstance(event, StartTLS):
                    # Both sides "handshake": the server first, as its glue would.
                    self.server.tls_started(self.server.features)
                    self.client.tls_started()
                    self.tls_switches += 1
            if not moved:
                return
        raise AssertionError("the engines did not settle")

    def _serve(self) -> None:
        server = self.server
        while (event := server.next_event()) is not NEED_DATA:
            if isinstance(event, MailFrom):
                server.reply(replies.SENDER_OK)
            elif isinstance(event, RcptTo):
                local = event.command.recipient.local
                if local.startswith("no"):
                    server.reply(replies.USER_UNKNOWN)
                else:
                    self.rcpts.append(str(event.command.recipient))
                    server.reply(replies.RECIPIENT_OK)
            elif isinstance(event, DataChunk):
                self._body.append(event.data)
            elif isinstance(event, MessageEnd):
                self.received.append(b"".join(self._body))
                self._body.clear()
                server.reply(Reply(250, "2.0.0", ("queued",)))
            elif isinstance(event, Closing):
                return


def make_pair(tls: bool = False, size_limit: int = 1_000_000) -> Pair:
    features = ServerFeatures("mx.test", size_limit, starttls=tls)
    policy = TLSPolicy.OPPORTUNISTIC if tls else TLSPolicy.NONE
    pair = Pair(ClientEngine("client.test", tls=policy), ServerEngine(features))
    pair.client.receive_data(GREETING)
    pair.pump()
    return pair


LINES = st.lists(
    st.sampled_from([b"", b".", b"..", b".x", b"text", b"a.b", b" .", b"\xc3\xa9t\xc3\xa9"]),
    max_size=20,
)
ENDINGS = st.sampled_from([b"\r\n", b"\n"])


@settings(max_examples=100, deadline=None)
@given(LINES, ENDINGS, st.lists(st.booleans(), min_size=1, max_size=6), st.booleans())
def test_what_the_client_sends_is_what_the_server_gets(
    lines: list[bytes], ending: bytes, accepted: list[bool], tls: bool
) -> None:
    body = b"Subject: t\r\n\r\n" + ending.join(lines) + ending
    recipients = tuple(
        ForwardPath(f"{'yes' if ok else 'no'}{i}@b.test") for i, ok in enumerate(accepted)
    )
    pair = make_pair(tls)
    assert pair.client.state is ClientState.READY and pair.tls_switches == int(tls)
    assert pair.server.tls_active is tls
    pair.client.send_message(OutgoingMessage("a@a.test", recipients), body)
    pair.pump()
    done = [e for e in pair.client_events if isinstance(e, MessageDone)]
    assert len(done) == 1
    outcomes = [r.outcome for r in done[0].results]
    assert outcomes == [Outcome.DELIVERED if ok else Outcome.PERMANENT for ok in accepted]
    if any(accepted):
        assert pair.received == [to_crlf(body)]
        assert pair.rcpts == [r.address for r, ok in zip(recipients, accepted, strict=True) if ok]
    else:
        assert pair.received == []
    assert pair.client.state is ClientState.READY and pair.server.state is ServerState.READY
    pair.client.quit()
    pair.pump()
    assert isinstance(pair.client_events[-1], Closed) and pair.client_events[-1].clean
    assert pair.server.state is ServerState.CLOSED


def test_several_messages_on_one_session_without_rset() -> None:
    # The reply to each final dot ends its transaction (RFC 5321 §4.1.1.4): no RSET between.
    pair = make_pair()
    for n in range(3):
        pair.client.send_message(
            OutgoingMessage("a@a.test", (ForwardPath("b@b.test"),)), b"n: %d\r\n\r\nx\r\n" % n
        )
        pair.pump()
    assert len(pair.received) == 3 and pair.client.state is ClientState.READY
    assert sum(isinstance(e, Ready) for e in pair.client_events) == 4  # EHLO, 3 messages
    assert b"RSET" not in pair.sent and pair.sent.count(b"MAIL FROM:") == 3


def test_a_message_over_the_servers_size_is_not_sent() -> None:
    pair = make_pair(size_limit=100)
    pair.client.send_message(OutgoingMessage("a@a.test", (ForwardPath("b@b.test"),)), b"x" * 200)
    pair.pump()
    done = [e for e in pair.client_events if isinstance(e, MessageDone)]
    assert done[0].results[0].outcome is Outcome.PERMANENT and pair.received == []
