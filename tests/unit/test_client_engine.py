"""The sans-I/O SMTP client engine alone: scripted server replies, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.errors import EngineMisuse
from postroom.smtp.client_engine import (
    BDAT_MAX,
    MAX_REPLY_KEPT,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    ClientEngine,
    Closed,
    EndOfData,
    Event,
    MessageDone,
    Outcome,
    OutgoingMessage,
    Ready,
    TLSPolicy,
)
from postroom.smtp.client_engine import ClientState as State
from postroom.smtp.client_engine import ForwardPath as Recipient
from postroom.wire.events import StartTLS
from postroom.wire.framing import DotReader
from postroom.wire.replies import Reply

EHLO_FULL = (
    b"250-mx.b.test Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
)
EHLO_PLAIN = b"250-mx.b.test Hello\r\n250-SIZE\r\n250 ENHANCEDSTATUSCODES\r\n"
DATA = b"From: a@a.test\r\nSubject: hi\r\n\r\nhello\r\n.dot line\r\n"


def events(engine: ClientEngine) -> list[Event]:
    out = []
    while (ev := engine.next_event()) is not None:
        out.append(ev)
    return out


def sent_lines(engine: ClientEngine) -> list[bytes]:
    return engine.data_to_send().split(b"\r\n")[:-1]


def ready_engine(ehlo: bytes = EHLO_PLAIN, tls: TLSPolicy = TLSPolicy.NONE) -> ClientEngine:
    engine = ClientEngine("mx.a.test", tls=tls)
    engine.receive_data(b"220 mx.b.test ESMTP\r\n")
    assert sent_lines(engine) == [b"EHLO mx.a.test"]
    engine.receive_data(ehlo)
    assert events(engine) == [Ready()]
    return engine


def msg(*rcpts: str, sender: str = "alice@a.test", **kw: object) -> OutgoingMessage:
    return OutgoingMessage(sender, tuple(Recipient(r) for r in rcpts), **kw)  # type: ignore[arg-type]


def test_lockstep_transaction_and_quit() -> None:
    engine = ready_engine()
    engine.send_message(msg("bob@b.test", "carol@b.test"), DATA)
    assert sent_lines(engine) == [f"MAIL FROM:<alice@a.test> SIZE={len(DATA)}".encode()]
    engine.receive_data(b"250 2.1.0 ok\r\n")
    assert sent_lines(engine) == [b"RCPT TO:<bob@b.test>"]
    engine.receive_data(b"250 2.1.5 ok\r\n")
    assert sent_lines(engine) == [b"RCPT TO:<carol@b.test>"]
    engine.receive_data(b"550 5.1.1 no such user\r\n")
    assert sent_lines(engine) == [b"DATA"]
    engine.receive_data(b"354 go ahead\r\n")
    body = engine.data_to_send()
    assert body.endswith(b"\r\n.\r\n")
    assert b"\r\n..dot line\r\n" in body
    # The stuffed body reads back as the original through the server's reader.
    reader = DotReader()
    buf = bytearray(body)
    chunk = reader.read(buf)
    assert chunk is not None
    assert chunk.data == DATA
    assert reader.done
    assert engine.next_event() is None
    engine.receive_data(b"250 2.0.0 queued as X\r\n")
    (done, ready) = events(engine)
    assert isinstance(done, MessageDone)
    assert ready == Ready()
    bob, carol = done.results
    assert bob.outcome is Outcome.DELIVERED
    assert bob.reply.status == "2.0.0"
    assert carol.outcome is Outcome.PERMANENT
    assert carol.reply.status == "5.1.1"
    assert carol.reply.text == "no such user"
    assert engine.data_to_send() == b""  # no RSET needed after a completed transaction
    engine.quit()
    assert sent_lines(engine) == [b"QUIT"]
    engine.receive_data(b"221 2.0.0 bye\r\n")
    (closed,) = events(engine)
    assert isinstance(closed, Closed)
    assert closed.clean


def test_pipelining_sends_mail_rcpt_data_in_one_write() -> None:
    engine = ready_engine(EHLO_FULL)
    engine.send_message(msg("bob@b.test", "carol@b.test"), DATA)
    assert sent_lines(engine) == [
        f"MAIL FROM:<alice@a.test> SIZE={len(DATA)}".encode(),
        b"RCPT TO:<bob@b.test>",
        b"RCPT TO:<carol@b.test>",
        b"DATA",
    ]
    engine.receive_data(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n450 4.2.1 try later\r\n354 go\r\n")
    assert engine.data_to_send().endswith(b"\r\n.\r\n")
    engine.receive_data(b"250 2.0.0 ok\r\n")
    done, ready = events(engine)
    assert isinstance(done, MessageDone)
    assert ready == Ready()
    assert [r.outcome for r in done.results] == [Outcome.DELIVERED, Outcome.TEMPORARY]
    assert done.dsn


EHLO_CHUNKING = EHLO_FULL.replace(b"250-DSN", b"250-CHUNKING\r\n250-DSN")


def test_chunking_sends_the_message_as_one_bdat_in_the_same_write() -> None:
    engine = ready_engine(EHLO_CHUNKING)
    engine.send_message(msg("bob@b.test", "carol@b.test"), DATA.replace(b"\r\n", b"\n"))
    head = (
        f"MAIL FROM:<alice@a.test> SIZE={len(DATA)}\r\n"
        "RCPT TO:<bob@b.test>\r\nRCPT TO:<carol@b.test>\r\n"
        f"BDAT {len(DATA)} LAST\r\n"
    ).encode()
    # CRLF line ends, counted and not dot-stuffed: ".dot line" goes as it is.
    assert engine.data_to_send() == head + DATA
    engine.receive_data(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n450 4.2.1 try later\r\n")
    assert events(engine) == []  # the BDAT reply is still to come
    engine.receive_data(b"250 2.0.0 queued\r\n")
    done, ready = events(engine)
    assert isinstance(done, MessageDone)
    assert ready == Ready()
    assert [r.outcome for r in done.results] == [Outcome.DELIVERED, Outcome.TEMPORARY]
    assert done.results[0].reply.text == "queued"
    assert engine.data_to_send() == b""  # the transaction is over: no RSET


def test_chunking_refused_chunk_fails_the_accepted_and_resets() -> None:
    engine = ready_engine(EHLO_CHUNKING)
    engine.send_message(msg("bob@b.test", "carol@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n554 5.7.1 spam\r\n")
    assert sent_lines(engine) == [b"RSET"]
    (done,) = events(engine)
    assert isinstance(done, MessageDone)
    assert [r.reply.status for r in done.results] == ["5.7.1", "5.1.1"]
    assert all(r.outcome is Outcome.PERMANENT for r in done.results)
    engine.receive_data(b"250 2.0.0 reset\r\n")
    assert events(engine) == [Ready()]


def test_chunking_with_every_recipient_refused_keeps_their_replies() -> None:
    engine = ready_engine(EHLO_CHUNKING)
    engine.send_message(msg("bob@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
    assert sent_lines(engine) == [b"RSET"]
    (done,) = events(engine)
    assert isinstance(done, MessageDone)
    assert done.results[0].reply.status == "5.1.1"


def test_chunking_354_to_bdat_is_a_protocol_error_not_a_delivery() -> None:
    engine = ready_engine(EHLO_CHUNKING)
    engine.send_message(msg("bob@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
    evs = events(engine)
    done = next(e for e in evs if isinstance(e, MessageDone))
    assert done.results[0].outcome is Outcome.TEMPORARY
    assert isinstance(evs[-1], Closed)


def test_chunking_without_pipelining_sends_bdat_after_the_rcpt_reply() -> None:
    engine = ready_engine(EHLO_CHUNKING.replace(b"250-PIPELINING\r\n", b""))
    engine.send_message(msg("bob@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n")
    assert sent_lines(engine) == [b"RCPT TO:<bob@b.test>"]
    engine.receive_data(b"250 ok\r\n")
    assert engine.data_to_send() == f"BDAT {len(DATA)} LAST\r\n".encode() + DATA
    engine.receive_data(b"250 2.0.0 queued\r\n")
    done, ready = events(engine)
    assert isinstance(done, MessageDone) and ready == Ready()
    assert done.results[0].outcome is Outcome.DELIVERED


@pytest.mark.parametrize("case", ["large", "held"])
def test_large_or_held_messages_go_with_data_though_chunking_is_offered(case: str) -> None:
    ehlo, data = EHLO_CHUNKING, DATA
    if case == "large":  # a refused recipient must not cost the whole body's transfer
        ehlo = ehlo.replace(b"250-SIZE 1000", b"250-SIZE")
        data = b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * (BDAT_MAX // 78 + 1)
    engine = ready_engine(ehlo)
    engine.send_message(msg("bob@b.test"), data, hold_end=case == "held")
    assert sent_lines(engine)[-1] == b"DATA"


def test_pipelining_all_recipients_refused_then_354_sends_empty_body_then_reset() -> None:
    engine = ready_engine(EHLO_FULL)
    engine.send_message(msg("bob@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n")
    assert engine.data_to_send() == b".\r\n"  # RFC 2920 §3.1
    engine.receive_data(b"554 5.5.1 no valid recipients\r\n")
    (done, _ready) = events(engine)
    assert isinstance(done, MessageDone)
    assert done.results[0].outcome is Outcome.PERMANENT
    assert done.results[0].reply.status == "5.1.1"


def test_pipelined_mail_refused_gives_mail_reply_to_everyone() -> None:
    engine = ready_engine(EHLO_FULL)
    engine.send_message(msg("bob@b.test", "carol@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(
        b"452 4.3.1 full\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n503 5.5.1 no\r\n"
    )
    (done, ready) = events(engine)
    assert isinstance(done, MessageDone)
    assert ready == Ready()
    assert {r.reply.status for r in done.results} == {"4.3.1"}
    assert all(r.outcome is Outcome.TEMPORARY for r in done.results)
    assert engine.data_to_send() == b""  # no transaction open, no RSET


def test_all_rcpt_refused_lockstep_sends_rset() -> None:
    engine = ready_engine()
    engine.send_message(msg("bob@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n")
    engine.data_to_send()
    engine.receive_data(b"550 5.1.1 unknown\r\n")
    assert sent_lines(engine) == [b"RSET"]
    (done,) = events(engine)
    assert isinstance(done, MessageDone)
    engine.receive_data(b"250 2.0.0 reset\r\n")
    assert events(engine) == [Ready()]


def test_data_refused() -> None:
    engine = ready_engine()
    engine.send_message(msg("bob@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n")
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n")
    assert sent_lines(engine) == [b"DATA"]
    engine.receive_data(b"554 5.7.1 go away\r\n")
    assert sent_lines(engine) == [b"RSET"]
    (done,) = events(engine)
    assert isinstance(done, MessageDone)
    assert done.results[0].outcome is Outcome.PERMANENT


def test_helo_fallback_when_ehlo_unknown() -> None:
    engine = ClientEngine("mx.a.test", tls=TLSPolicy.OPPORTUNISTIC)
    engine.receive_data(b"220 old.example SMTP\r\n")
    assert sent_lines(engine) == [b"EHLO mx.a.test"]
    engine.receive_data(b"502 command not implemented\r\n")
    assert sent_lines(engine) == [b"HELO mx.a.test"]
    engine.receive_data(b"250 old.example\r\n")
    assert events(engine) == [Ready()]
    assert not engine.esmtp
    assert engine.extensions == {}
    engine.send_message(msg("bob@b.test"), DATA)
    assert sent_lines(engine) == [b"MAIL FROM:<alice@a.test>"]  # no SIZE, no BODY=8BITMIME


def test_8bit_left_after_conversion_is_refused_without_8bitmime() -> None:
    # RFC 6152 §3: what the caller could not make 7-bit (header fields) is not sent raw.
    engine = ready_engine()  # no 8BITMIME
    engine.send_message(msg("bob@b.test"), "Subject: é\r\n\r\nbody\r\n".encode())
    assert engine.data_to_send() == b""
    done = events(engine)[0]
    assert isinstance(done, MessageDone)
    assert done.results[0].outcome is Outcome.PERMANENT
    assert done.results[0].reply.status == "5.6.3"
    assert done.results[0].missing == "8BITMIME"  # another MX host may offer it
    engine = ready_engine(EHLO_PLAIN.replace(b"250-SIZE", b"250-8BITMIME"))
    engine.send_message(msg("bob@b.test"), "Subject: é\r\n\r\nbody\r\n".encode())
    assert engine.data_to_send() == b"MAIL FROM:<alice@a.test> BODY=8BITMIME\r\n"


def test_esmtp_parameters() -> None:
    engine = ready_engine(EHLO_FULL)
    data = "Subject: é\r\n\r\nbody é\r\n".encode()
    message = OutgoingMessage(
        "alice@a.test",
        (Recipient("bob@b.test", notify=("success", "failure"), orcpt="rfc822;bob+2B1@b.test"),),
        smtputf8=True,
        ret="hdrs",
        envid="QQ123",
    )
    engine.send_message(message, data)
    lines = sent_lines(engine)
    assert (
        lines[0]
        == (
            f"MAIL FROM:<alice@a.test> SIZE={len(data)} BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ123"
        ).encode()
    )
    assert lines[1] == b"RCPT TO:<bob@b.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2B1@b.test"


@pytest.mark.parametrize(
    ("smtputf8", "rcpt", "orcpt", "sent"),
    [
        (True, "ü4@xn--mller-kva.test", "ü4@müller.test", "ü4@müller.test"),  # as it is
        (True, "u4@b.test", "ü4@m+x.test", "\\x{FC}4@m\\x{2B}x.test"),  # no SMTPUTF8 needed
        (False, "u4@b.test", "ü4", "\\x{FC}4"),  # the server has no SMTPUTF8
    ],
)
def test_a_utf8_orcpt_is_passed_on(smtputf8: bool, rcpt: str, orcpt: str, sent: str) -> None:
    """An i18n probe: ``ORCPT=utf-8;ü4@müller.test`` was taken and then dropped at relay
    time. RFC 6533 §3: as it is in an SMTPUTF8 transaction, else as utf-8-addr-xtext."""
    engine = ready_engine(EHLO_FULL if smtputf8 else EHLO_FULL.replace(b"250-SMTPUTF8\r\n", b""))
    engine.send_message(
        OutgoingMessage("alice@a.test", (Recipient(rcpt, orcpt=f"utf-8;{orcpt}"),)), DATA
    )
    assert sent_lines(engine)[1].decode() == f"RCPT TO:<{rcpt}> ORCPT=utf-8;{sent}"


def test_smtputf8_refused_without_sending() -> None:
    engine = ready_engine()  # no SMTPUTF8
    engine.send_message(msg("bøb@b.test"), DATA)
    assert engine.data_to_send() == b""
    (done, ready) = events(engine)
    assert isinstance(done, MessageDone)
    assert ready == Ready()
    (res,) = done.results
    assert res.outcome is Outcome.PERMANENT
    assert res.reply.status == "5.6.7"
    assert res.missing == "SMTPUTF8"  # this server's shortcoming: another MX host may offer it


def test_smtputf8_only_the_utf8_recipient_fails() -> None:
    engine = ready_engine(EHLO_FULL.replace(b"250-SMTPUTF8\r\n", b""))
    engine.send_message(msg("bøb@b.test", "carol@b.test"), DATA)
    lines = sent_lines(engine)
    assert lines[1] == b"RCPT TO:<carol@b.test>"
    assert len(lines) == 3
    engine.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n")
    done = events(engine)[0]
    assert isinstance(done, MessageDone)
    assert [r.reply.status for r in done.results] == ["5.6.7", ""]
    assert [r.missing for r in done.results] == ["SMTPUTF8", None]
    assert done.results[1].outcome is Outcome.DELIVERED


def test_smtputf8_headers_need_it_only_when_asked() -> None:
    data = "Subject: é\r\n\r\nx\r\n".encode()
    engine = ready_engine()
    engine.send_message(msg("bob@b.test", smtputf8=True), data)
    done = events(engine)[0]
    assert isinstance(done, MessageDone)
    assert done.results[0].reply.status == "5.6.9"  # RFC 6531 §3.5: a UTF-8 header message
    assert done.results[0].missing == "SMTPUTF8"
    engine = ready_engine(EHLO_PLAIN.replace(b"250-SIZE", b"250-8BITMIME"))
    engine.send_message(msg("bob@b.test", smtputf8=False), data)
    assert engine.data_to_send().startswith(b"MAIL FROM:<alice@a.test>")


def test_a_lone_utf8_recipient_named_in_our_received_field_fails_as_an_address() -> None:
    # The message's only UTF-8 is our own Received field's "for <bøb@b.test>": the recipient
    # cannot go (5.6.7), and that, not the header field (5.6.9), is what the bounce says.
    data = "Received: from c by mx.a.test for <bøb@b.test>;\r\nSubject: x\r\n\r\nx\r\n".encode()
    engine = ready_engine(EHLO_PLAIN.replace(b"250-SIZE", b"250-8BITMIME"))
    engine.send_message(msg("bøb@b.test", smtputf8=True), data)
    assert engine.data_to_send() == b""
    done = events(engine)[0]
    assert isinstance(done, MessageDone)
    assert [r.reply.status for r in done.results] == ["5.6.7"]


def test_size_limit_refuses_before_sending() -> None:
    engine = ready_engine(EHLO_FULL)
    engine.send_message(msg("bob@b.test"), b"x" * 2000)
    assert engine.data_to_send() == b""
    done = events(engine)[0]
    assert isinstance(done, MessageDone)
    assert done.results[0].reply.status == "5.3.4"
    assert done.results[0].missing is None  # a limit, not an extension the server lacks


def test_starttls_flow_and_ehlo_again() -> None:
    engine = ClientEngine("mx.a.test", tls=TLSPolicy.OPPORTUNISTIC)
    engine.receive_data(b"220 hi\r\n")
    engine.data_to_send()
    engine.receive_data(EHLO_FULL)
    assert sent_lines(engine) == [b"STARTTLS"]
    engine.receive_data(b"220 2.0.0 go\r\n")
    assert events(engine) == [StartTLS()]
    assert engine.state is State.TLS_HANDSHAKE
    engine.tls_started()
    assert engine.secure
    assert engine.extensions == {}
    assert sent_lines(engine) == [b"EHLO mx.a.test"]
    engine.receive_data(b"250-hi\r\n250 PIPELINING\r\n")
    assert events(engine) == [Ready()]
    assert engine.extensions == {"PIPELINING": ""}


def test_starttls_injection_is_refused() -> None:
    engine = ClientEngine("mx.a.test", tls=TLSPolicy.OPPORTUNISTIC)
    engine.receive_data(b"220 hi\r\n")
    engine.receive_data(EHLO_FULL)
    engine.data_to_send()
    # A reply smuggled in the same packet as the 220 would be read as if it came over TLS.
    engine.receive_data(b"220 go\r\n250-evil\r\n250 OK\r\n")
    (closed,) = events(engine)
    assert isinstance(closed, Closed)
    assert not closed.clean
    assert closed.reply.status == "4.7.0"
    with pytest.raises(EngineMisuse):
        engine.tls_started()


def test_starttls_refused_is_plaintext_unless_required() -> None:
    engine = ClientEngine("mx.a.test", tls=TLSPolicy.OPPORTUNISTIC)
    engine.receive_data(b"220 hi\r\n" + EHLO_FULL + b"454 4.7.0 no TLS today\r\n")
    assert events(engine) == [Ready()]
    engine = ClientEngine("mx.a.test", tls=TLSPolicy.REQUIRED)
    engine.receive_data(b"220 hi\r\n" + EHLO_PLAIN)
    (closed,) = events(engine)
    assert isinstance(closed, Closed)
    assert closed.reply.status == "4.7.5"


@pytest.mark.parametrize("greeting", [b"421 4.3.2 busy\r\n", b"554 5.7.1 go away\r\n"])
def test_bad_greeting_closes(greeting: bytes) -> None:
    engine = ClientEngine("mx.a.test")
    engine.receive_data(greeting)
    (closed,) = events(engine)
    assert isinstance(closed, Closed)
    assert not closed.clean
    assert closed.reply.code == int(greeting[:3])


def test_421_mid_transaction_defers_open_recipients() -> None:
    engine = ready_engine(EHLO_FULL)
    engine.send_message(msg("bob@b.test", "carol@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n550 5.1.1 unknown\r\n421 4.3.2 shutting down\r\n")
    done, closed = events(engine)
    assert isinstance(done, MessageDone)
    assert isinstance(closed, Closed)
    assert [r.outcome for r in done.results] == [Outcome.PERMANENT, Outcome.TEMPORARY]
    assert done.results[1].reply.status == "4.3.2"


def test_connection_lost_after_data_is_temporary() -> None:
    engine = ready_engine()
    engine.send_message(msg("bob@b.test"), DATA)
    engine.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    engine.data_to_send()
    engine.connection_lost()
    done, closed = events(engine)
    assert isinstance(done, MessageDone)
    assert done.results[0].outcome is Outcome.TEMPORARY
    assert isinstance(closed, Closed)
    assert closed.reply.status == "4.4.2"


def test_multiline_reply_and_status_parsing() -> None:
    engine = ready_engine()
    engine.send_message(msg("bob@b.test"), DATA)
    engine.receive_data(b"550-5.7.1 you are\r\n550-5.7.1 not welcome\r\n550 5.7.1 here\r\n")
    done = events(engine)[0]
    assert isinstance(done, MessageDone)
    assert done.results[0].reply.lines == ("you are", "not welcome", "here")
    assert done.results[0].reply.status == "5.7.1"


def test_garbage_reply_is_a_protocol_error() -> None:
    engine = ClientEngine("mx.a.test")
    engine.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    (closed,) = events(engine)
    assert isinstance(closed, Closed)
    assert closed.reply.status == "4.5.0"


def test_a_reply_over_the_limits_is_cut_not_taken_for_an_error() -> None:
    # A 250 to the final dot of 5,000 octets (or of 250 lines) was a protocol error: the
    # message was deferred, sent again, and bounced as failed though taken both times. RFC
    # 5321 §4.5.3.1.5 allows 512 octets a line; a longer one is cut, and its code counts.
    for reply in (
        b"250 2.0.0 " + b"x" * 5000 + b"\r\n",
        b"250-2.0.0 ok\r\n" * 250 + b"250 2.0.0 queued\r\n",
    ):
        engine = ready_engine()
        engine.send_message(msg("bob@b.test"), DATA)
        for answer in (b"250 2.1.0 ok\r\n", b"250 2.1.5 ok\r\n", b"354 go ahead\r\n"):
            engine.receive_data(answer)
        engine.data_to_send()
        engine.receive_data(reply)
        done, ready = events(engine)
        assert isinstance(done, MessageDone) and ready == Ready()
        assert done.results[0].outcome is Outcome.DELIVERED
    # A line that never ends is dropped as it comes (the reply's time-out ends the wait).
    engine = ClientEngine("mx.a.test")
    for _ in range(100):
        engine.receive_data(b"x" * 100_000)
        assert engine._reader.pending() <= MAX_REPLY_LINE + 2
    assert events(engine) == []
    engine.receive_data(b"\r\n220 mx.b.test ESMTP\r\n")  # (the cut line is no reply)
    (closed,) = events(engine)
    assert isinstance(closed, Closed) and closed.reply.status == "4.5.0"


def test_a_reply_that_does_not_end_fails_the_session() -> None:
    """A peer streaming ``220-`` lines held the delivery for the reply's 5-minute time-out (a
    hostile-MX probe: 1.1 million lines in 120 s); past MAX_REPLY_LINES lines it is a
    protocol error. Memory stays bounded either way."""
    engine = ClientEngine("mx.a.test")
    engine.receive_data(b"220-mx.b.test\r\n" * (MAX_REPLY_LINES - 1) + b"220 mx.b.test\r\n")
    assert sent_lines(engine) == [b"EHLO mx.a.test"]  # (as long as it may be, it is taken)
    engine = ClientEngine("mx.a.test")
    for _ in range(20):
        engine.receive_data(b"220-mx.b.test\r\n" * 100)
    (closed,) = events(engine)
    assert isinstance(closed, Closed) and closed.reply.status == "4.5.0"
    assert "over 1000 lines" in closed.reply.text
    assert engine.state is State.CLOSED


def test_a_long_ehlo_reply_keeps_the_extensions_at_its_end() -> None:
    """An EHLO of 300 lines was cut at 200, and the SMTPUTF8 at its end lost: mail that needs
    it bounced (a recheck probe). Replies are kept up to MAX_REPLY_KEPT octets."""
    padding = b"".join(b"250-X-FILLER-%d\r\n" % i for i in range(300))
    engine = ready_engine(b"250-mx.b.test Hello\r\n" + padding + b"250 SMTPUTF8\r\n")
    assert "SMTPUTF8" in engine.extensions and "X-FILLER-299" in engine.extensions
    # Past the octets kept, lines are dropped but the last one, which ends the reply.
    engine = ClientEngine("mx.a.test")
    engine.receive_data(b"220-" + b"x" * 4000 + b"\r\n")
    engine.receive_data((b"220-" + b"y" * 4000 + b"\r\n") * 30 + b"220 last\r\n")
    assert engine.greeting is not None
    assert engine.greeting.lines[-1] == "last"
    assert sum(map(len, engine.greeting.lines)) <= MAX_REPLY_KEPT + 4096


def test_misuse_raises() -> None:
    engine = ClientEngine("mx.a.test")
    with pytest.raises(EngineMisuse):
        engine.send_message(msg("bob@b.test"), DATA)
    with pytest.raises(EngineMisuse):
        engine.quit()


@pytest.mark.parametrize("ending", ["421", "closed"])
def test_a_session_gone_before_mail_is_answered_says_unanswered(ending: str) -> None:
    # A cached connection the server dropped while idle: nothing of the message reached it.
    engine = ready_engine(EHLO_FULL)
    engine.send_message(msg("bob@b.test"), DATA)
    assert sent_lines(engine)[1:] == [b"RCPT TO:<bob@b.test>", b"DATA"]  # MAIL first
    if ending == "421":
        engine.receive_data(b"421 4.4.2 idle too long, closing\r\n")
    else:
        engine.connection_lost()
    done, closed = events(engine)
    assert isinstance(done, MessageDone) and done.unanswered
    assert done.results[0].outcome is Outcome.TEMPORARY
    assert isinstance(closed, Closed)


def test_a_session_lost_after_mail_was_answered_is_not_unanswered() -> None:
    engine = ready_engine(EHLO_FULL)
    engine.send_message(msg("bob@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n")
    engine.connection_lost()
    done, _closed = events(engine)
    assert isinstance(done, MessageDone) and not done.unanswered


def test_a_refused_transaction_is_reset_but_a_finished_one_is_not() -> None:
    engine = ready_engine(EHLO_FULL)
    engine.send_message(msg("bob@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n550 no such user\r\n554 no valid recipients\r\n")
    assert sent_lines(engine) == [b"RSET"]  # MAIL was accepted: the transaction is open
    engine.receive_data(b"250 ok\r\n")
    done, ready = events(engine)
    assert isinstance(done, MessageDone) and not done.unanswered and ready == Ready()
    engine.send_message(msg("bob@b.test"), DATA)
    engine.data_to_send()
    engine.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    engine.data_to_send()
    engine.receive_data(b"250 queued\r\n")
    assert engine.data_to_send() == b""  # the reply to the dot ended it: no RSET
    assert [type(e) for e in events(engine)] == [MessageDone, Ready]


def test_second_message_on_same_connection() -> None:
    engine = ready_engine(EHLO_FULL)
    for _ in range(2):
        engine.send_message(msg("bob@b.test"), DATA)
        engine.data_to_send()
        engine.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
        engine.data_to_send()
        engine.receive_data(b"250 ok\r\n")
        done, _ready = events(engine)
        assert isinstance(done, MessageDone)
        assert done.results[0].outcome is Outcome.DELIVERED


def _feed_chunked(engine: ClientEngine, script: bytes, cuts: list[int]) -> list[Event]:
    got: list[Event] = []
    pos = i = 0
    while pos < len(script):
        n = cuts[i % len(cuts)]
        engine.receive_data(script[pos : pos + n])
        pos, i = pos + n, i + 1
        got += events(engine)
    return got


@given(st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=20))
def test_chunking_does_not_change_the_outcome(cuts: list[int]) -> None:
    setup = b"220 hi\r\n" + EHLO_FULL.replace(b"250 STARTTLS", b"250 HELP")
    replies = b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n250 2.0.0 ok\r\n"
    engine = ClientEngine("mx.a.test", tls=TLSPolicy.NONE)
    assert _feed_chunked(engine, setup, cuts) == [Ready()]
    engine.send_message(msg("bob@b.test", "carol@b.test"), DATA)
    got = _feed_chunked(engine, replies, cuts)
    assert len(got) == 2
    assert isinstance(got[0], MessageDone)
    assert got[1] == Ready()
    assert [r.outcome for r in got[0].results] == [Outcome.DELIVERED, Outcome.PERMANENT]


@given(st.binary(max_size=300))
def test_garbage_from_the_server_gives_only_events(junk: bytes) -> None:
    engine = ClientEngine("mx.a.test", tls=TLSPolicy.OPPORTUNISTIC)
    engine.receive_data(junk)
    engine.connection_lost()
    evs = events(engine)
    assert evs
    assert isinstance(evs[-1], Closed)


def test_552_to_rcpt_is_temporary_and_552_at_end_of_data_is_not() -> None:
    # RFC 5321 §4.5.3.1.10: a 552 to RCPT means "too many recipients"; try the rest later.
    engine = ready_engine()
    engine.send_message(msg("bob@b.test", "carol@b.test"), DATA)
    engine.receive_data(b"250 2.1.0 ok\r\n")
    engine.receive_data(b"250 2.1.5 ok\r\n")
    engine.receive_data(b"552 5.5.3 Too many recipients\r\n")
    engine.receive_data(b"354 go ahead\r\n")
    engine.data_to_send()
    engine.receive_data(b"552 5.3.4 Message too big\r\n")
    done = [e for e in events(engine) if isinstance(e, MessageDone)]
    assert [r.outcome for r in done[0].results] == [Outcome.PERMANENT, Outcome.TEMPORARY]


def _held_at_the_dot() -> tuple[ClientEngine, bytes]:
    engine = ready_engine()
    engine.send_message(msg("bob@b.test"), DATA, hold_end=True)
    engine.receive_data(b"250 2.1.0 ok\r\n")
    engine.receive_data(b"250 2.1.5 ok\r\n")
    assert sent_lines(engine)[-1] == b"DATA"
    engine.receive_data(b"354 go ahead\r\n")
    body = engine.data_to_send()
    assert events(engine) == [EndOfData()]
    assert engine.timeout() is None  # no reply awaited while the caller decides
    return engine, body


def test_held_end_of_data_is_sent_only_when_asked() -> None:
    engine, body = _held_at_the_dot()
    assert b"\r\n..dot line\r\n" in body and not body.endswith(b"\r\n.\r\n")
    engine.end_data()
    assert engine.data_to_send() == b".\r\n"
    engine.receive_data(b"250 2.0.0 queued\r\n")
    (done, ready) = events(engine)
    assert isinstance(done, MessageDone) and ready == Ready()
    assert done.results[0].outcome is Outcome.DELIVERED


def test_aborted_before_the_dot_sends_nothing_more_and_fails_temporarily() -> None:
    # The caller (a cluster node whose lease is in doubt) gives up: no dot, no RSET (after
    # 354 it would be message text); the connection is closed, the host cancels it.
    engine, _body = _held_at_the_dot()
    reason = Reply(451, "4.3.0", ("lease not confirmed",), local=True)
    engine.abort(reason)
    assert engine.data_to_send() == b""
    done, closed = events(engine)
    assert isinstance(done, MessageDone) and done.results[0].outcome is Outcome.TEMPORARY
    assert done.results[0].reply == reason
    assert isinstance(closed, Closed) and engine.state is State.CLOSED
    engine.end_data()  # after a loss (or an abort) a late end_data does nothing
    assert engine.data_to_send() == b""
