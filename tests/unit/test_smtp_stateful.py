"""A hypothesis state machine: the SMTP engine against a small model of RFC 5321 sequencing.

The model knows only: has the client said HELO/EHLO, is a transaction open, how many
recipients were accepted. Each rule sends one command (in random chunks) and checks the reply
code the model predicts; message data always comes back exactly as sent.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from postroom.smtp.server_engine import DataChunk, MailFrom, MessageEnd, RcptTo, ServerEngine
from postroom.smtp.server_engine import ServerFeatures as Features
from postroom.smtp.server_engine import ServerState as State
from postroom.wire import replies
from postroom.wire.events import NEED_DATA
from postroom.wire.framing import dot_stuff

MAX_RCPT = 3


class SmtpModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.proto = ServerEngine(
            Features(
                hostname="mx.test", size_limit=10_000, max_recipients=MAX_RCPT, max_errors=1000
            )
        )
        self.greeted = False
        self.in_mail = False
        self.rcpts = 0
        self.data: list[bytes] = []
        self.messages: list[bytes] = []

    def send(self, data: bytes, chunk: int) -> list[int]:
        out = b""
        for i in range(0, len(data), chunk):
            self.proto.receive_data(data[i : i + chunk])
            while (ev := self.proto.next_event()) is not NEED_DATA:
                if isinstance(ev, MailFrom | RcptTo):
                    self.proto.reply(replies.OK)
                elif isinstance(ev, DataChunk):
                    self.data.append(ev.data)
                elif isinstance(ev, MessageEnd):
                    self.messages.append(b"".join(self.data))
                    self.data = []
                    self.proto.reply(replies.OK)
            out += self.proto.data_to_send()
        return [int(line[:3]) for line in out.split(b"\r\n") if line[3:4] == b" "]

    @rule(extended=st.booleans(), chunk=st.integers(1, 20))
    def hello(self, extended: bool, chunk: int) -> None:
        verb = b"EHLO" if extended else b"HELO"
        assert self.send(verb + b" client.test\r\n", chunk) == [250]
        self.greeted, self.in_mail, self.rcpts = True, False, 0

    @rule(chunk=st.integers(1, 20))
    def mail(self, chunk: int) -> None:
        codes = self.send(b"MAIL FROM:<a@b.test>\r\n", chunk)
        if self.greeted and not self.in_mail:
            assert codes == [250]
            self.in_mail, self.rcpts = True, 0
        else:
            assert codes == [503]

    @rule(chunk=st.integers(1, 20))
    def rcpt(self, chunk: int) -> None:
        codes = self.send(b"RCPT TO:<c@d.test>\r\n", chunk)
        if not self.in_mail:
            assert codes == [503]
        elif self.rcpts >= MAX_RCPT:
            assert codes == [452]
        else:
            assert codes == [250]
            self.rcpts += 1

    @rule(
        body=st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")),
        chunk=st.integers(1, 40),
    )
    def data(self, body: bytes, chunk: int) -> None:
        if not self.in_mail or self.rcpts == 0:
            assert self.send(b"DATA\r\n", chunk) == ([554] if self.in_mail else [503])
            return
        before = len(self.messages)
        assert self.send(b"DATA\r\n" + dot_stuff(body), chunk) == [354, 250]
        expected = body if body == b"" or body.endswith(b"\r\n") else body + b"\r\n"
        assert self.messages[before:] == [expected]
        self.in_mail, self.rcpts = False, 0

    @rule(chunk=st.integers(1, 20))
    def rset(self, chunk: int) -> None:
        assert self.send(b"RSET\r\n", chunk) == [250]
        self.in_mail, self.rcpts = False, 0

    @rule(
        cmd=st.sampled_from(
            [b"NOOP", b"HELP", b"VRFY x", b"EXPN x", b"BOGUS", b"MAIL", b"RCPT TO:", b"x" * 700]
        )
    )
    def other(self, cmd: bytes) -> None:
        codes = self.send(cmd + b"\r\n", 7)
        assert len(codes) == 1
        assert codes[0] in (250, 214, 252, 502, 500, 501, 503)

    @precondition(lambda self: self.greeted)
    @rule()
    def quit(self) -> None:
        assert self.send(b"QUIT\r\n", 3) == [221]
        assert self.proto.state is State.CLOSED
        self.proto = ServerEngine(self.proto.features)
        self.greeted = self.in_mail = False
        self.rcpts = 0

    @invariant()
    def engine_state_matches(self) -> None:
        if self.proto.state is State.CLOSED:
            return
        if self.in_mail:
            expected = State.RCPT if self.rcpts else State.MAIL
        else:
            expected = State.READY if self.greeted else State.CONNECTED
        assert self.proto.state is expected


SmtpModel.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestSmtpModel = SmtpModel.TestCase
