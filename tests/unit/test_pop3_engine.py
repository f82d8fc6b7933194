"""The sans-I/O POP3 engine driven in memory, and the maildrop on a temporary Maildir."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.errors import EngineMisuse
from postroom.pop3.engine import Command, Pop3Engine, Quit
from postroom.pop3.engine import Pop3Features as Features
from postroom.pop3.engine import Pop3State as State
from postroom.pop3.engine import UserPass as Login
from postroom.pop3.maildrop import TopFilter
from postroom.wire.events import FLUSH, NEED_DATA, AuthResponse, AuthStart, Closing, StartTLS
from postroom.wire.framing import CrlfConverter, DotReader, Stuffer, dot_stuff, to_crlf


def run(proto: Pop3Engine, data: bytes, login: bool = True) -> tuple[bytes, list[object]]:
    proto.receive_data(data)
    events: list[object] = []
    while (ev := proto.next_event()) is not NEED_DATA:
        events.append(ev)
        if isinstance(ev, Login):
            proto.login_ok() if login else proto.login_failed("no")
        elif isinstance(ev, Command):
            proto.ok(ev.verb)
        elif isinstance(ev, Quit):
            proto.bye()
        elif isinstance(ev, AuthStart):
            proto.login_ok()
    return proto.data_to_send(), events


def status(out: bytes) -> list[bytes]:
    return [ln.split(b" ")[0] for ln in out.split(b"\r\n") if ln.startswith((b"+OK", b"-ERR"))]


def test_login_and_commands() -> None:
    p = Pop3Engine(Features())
    out, events = run(
        p,
        b"USER a@b.test\r\nPASS secret word\r\nSTAT\r\nLIST\r\nLIST 2\r\n"
        b"RETR 1\r\nTOP 1 0\r\nDELE 1\r\nUIDL\r\nRSET\r\nNOOP\r\nQUIT\r\n",
    )
    assert events[0] == Login("a@b.test", "secret word")
    assert [e for e in events if isinstance(e, Command)] == [
        Command("STAT"),
        Command("LIST"),
        Command("LIST", 2),
        Command("RETR", 1),
        Command("TOP", 1, 0),
        Command("DELE", 1),
        Command("UIDL"),
        Command("RSET"),
        Command("NOOP"),
    ]
    assert isinstance(events[-1], Quit)
    assert p.state is State.CLOSED
    assert status(out) == [b"+OK"] * 12  # USER, PASS, 9 commands, QUIT


def test_wrong_state_and_bad_arguments_keep_the_session() -> None:
    p = Pop3Engine(Features())
    out, _ = run(
        p,
        b"STAT\r\nPASS x\r\nFOO\r\nUSER u\r\nPASS p\r\nRETR\r\nRETR x\r\nRETR 0\r\n"
        b"TOP 1\r\nDELE 1 2\r\nUSER again\r\nSTAT\r\n",
    )
    assert status(out) == [
        b"-ERR",
        b"-ERR",
        b"-ERR",
        b"+OK",
        b"+OK",
        b"-ERR",
        b"-ERR",
        b"-ERR",
        b"-ERR",
        b"-ERR",
        b"-ERR",
        b"+OK",
    ]
    assert p.state is State.TRANSACTION


def test_pass_only_immediately_after_user() -> None:
    """RFC 1939 §7: a command between USER and PASS cancels the USER."""
    p = Pop3Engine(Features())
    out, events = run(
        p,
        b"USER u\r\nSTAT\r\nPASS p\r\nUSER u\r\nCAPA\r\nPASS p\r\nUSER u\r\nUSER v\r\nPASS p\r\n",
        login=False,
    )
    assert status(out) == [
        b"+OK",
        b"-ERR",
        b"-ERR",
        b"+OK",
        b"+OK",
        b"-ERR",
        b"+OK",
        b"+OK",
        b"-ERR",
    ]
    assert [(e.user, e.password) for e in events if isinstance(e, Login)] == [("v", "p")]


def test_keywords_are_ascii() -> None:
    """RFC 1939 §3: "u\\u017fer" (a long s) is no USER, though str.upper() makes it one."""
    p = Pop3Engine(Features())
    out, events = run(p, "u\u017fer u\r\nUSER u\r\npa\u017f\u017f p\r\nqu\u0131t\r\n".encode())
    assert status(out) == [b"-ERR", b"+OK", b"-ERR", b"-ERR"] and not events
    assert p.state is State.AUTHORIZATION


def test_plaintext_login_refused_without_tls() -> None:
    p = Pop3Engine(Features(starttls=True, login_allowed=False))
    out, events = run(p, b"CAPA\r\nUSER u\r\nAUTH PLAIN\r\n")
    assert b"STLS\r\n" in out and b"USER\r\n" not in out and b"SASL" not in out
    assert out.count(b"-ERR [AUTH]") == 2 and not events


def test_stls_discards_pipelined_commands() -> None:
    p = Pop3Engine(Features(starttls=True, login_allowed=False))
    p.receive_data(b"STLS\r\nUSER evil\r\n")
    ev = p.next_event()
    assert isinstance(ev, StartTLS) and ev.discarded == len(b"USER evil\r\n")
    p.receive_data(b"PASS plaintext\r\n")
    assert p.next_event() is NEED_DATA
    assert p.data_to_send() == b"+OK Begin TLS negotiation\r\n"
    p.tls_started(Features(login_allowed=True))
    out, _ = run(p, b"CAPA\r\n")
    assert b"USER\r\n" in out and b"STLS" not in out


def test_line_too_long_and_error_limit() -> None:
    p = Pop3Engine(Features(max_errors=3))
    out, events = run(p, b"NOOP " + b"x" * 300 + b"\r\nX\r\nY\r\nZ\r\n")
    assert out.startswith(b"-ERR Line too long")
    assert isinstance(events[-1], Closing) and p.state is State.CLOSED


def test_failed_login_returns_to_authorization() -> None:
    p = Pop3Engine(Features())
    out, _ = run(p, b"USER u\r\nPASS p\r\nSTAT\r\n", login=False)
    assert status(out) == [b"+OK", b"-ERR", b"-ERR"]
    assert p.state is State.AUTHORIZATION


COMMANDS = st.sampled_from(
    [
        b"USER a",
        b"PASS b",
        b"STAT",
        b"LIST",
        b"LIST 1",
        b"RETR 1",
        b"DELE 1",
        b"TOP 1 2",
        b"UIDL",
        b"RSET",
        b"NOOP",
        b"CAPA",
        b"QUIT",
        b"AUTH PLAIN",
        b"STLS",
        b"APOP x y",
        b"UTF8",
        b"*",
        b"",
    ]
)


@settings(max_examples=200)
@given(st.lists(st.one_of(COMMANDS, st.binary(max_size=40)), max_size=30), st.integers(1, 9))
def test_parser_never_raises_and_chunking_does_not_matter(lines: list[bytes], size: int) -> None:
    stream = b"\r\n".join(lines) + b"\r\n"
    whole = Pop3Engine(Features(starttls=True))
    out1, ev1 = run(whole, stream)
    pieces = Pop3Engine(Features(starttls=True))
    out2 = b""
    ev2: list[object] = []
    for i in range(0, len(stream), size):
        o, e = run(pieces, stream[i : i + size])
        out2 += o
        ev2 += e

    def same(events: list[object]) -> list[object]:
        # How much plaintext STLS discards depends on how it arrived; nothing else may.
        return [StartTLS(0) if isinstance(e, StartTLS) else e for e in events]

    assert out1 == out2 and same(ev1) == same(ev2)


@given(st.binary(max_size=2000), st.lists(st.integers(1, 300), min_size=1, max_size=8))
def test_streamed_stuffing_equals_whole_and_round_trips(data: bytes, sizes: list[int]) -> None:
    s = Stuffer()
    out = b""
    pos = i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out += s.feed(data[pos : pos + n])
        pos += n
        i += 1
    out += s.finish()
    assert out == dot_stuff(data)
    buf = bytearray(out)
    reader = DotReader()
    got = b""
    while not reader.done:
        chunk = reader.read(buf)
        assert chunk is not None
        got += chunk.data
    assert got == (data if data == b"" or data.endswith(b"\r\n") else data + b"\r\n")


# -- the engine: SASL, CAPA, limits, misuse --------------------------------------------------


def test_capa_lists_exactly_what_works() -> None:
    plain = Pop3Engine(Features(starttls=True, login_allowed=False))
    out, _ = run(plain, b"CAPA\r\n")
    assert out.split(b"\r\n")[1:-2] == [
        b"TOP",
        b"UIDL",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
        b"PIPELINING",
        b"IMPLEMENTATION postroom",
        b"UTF8",
        b"STLS",
    ]
    tls = Pop3Engine(Features(login_allowed=True), tls_active=True)
    out, _ = run(tls, b"CAPA\r\n")
    caps = out.split(b"\r\n")[1:-2]
    assert b"STLS" not in caps and b"USER" in caps and b"UTF8 USER" in caps
    assert b"SASL PLAIN LOGIN SCRAM-SHA-256" in caps
    # STLS is gone once TLS is active, and RFC 2595 §4: STLS then gets -ERR.
    out, _ = run(tls, b"STLS\r\n")
    assert out.startswith(b"-ERR")
    out, _ = run(tls, b"USER u@a.test\r\nPASS pw\r\nCAPA\r\n")
    caps = out.split(b"+OK Capability list follows\r\n")[1].split(b"\r\n")[:-2]
    # RFC 2449 §5: what the AUTHORIZATION state announced, the TRANSACTION state announces too.
    assert b"USER" in caps and b"UTF8 USER" in caps
    assert b"SASL PLAIN LOGIN SCRAM-SHA-256" in caps


def test_sasl_exchange_in_the_engine() -> None:
    p = Pop3Engine(Features())
    cred = base64.b64encode(b"\0u@a.test\0pw")
    p.receive_data(b"AUTH PLAIN " + cred + b"\r\n")
    ev = p.next_event()
    assert ev == AuthStart("PLAIN", b"\0u@a.test\0pw")
    p.login_failed("no")
    p.receive_data(b"AUTH PLAIN\r\n")
    assert p.next_event() == AuthStart("PLAIN", None)
    p.auth_challenge(b"")
    p.receive_data(cred + b"\r\n")
    assert p.next_event() == AuthResponse(b"\0u@a.test\0pw")
    p.login_ok()
    assert p.state is State.TRANSACTION
    assert p.data_to_send() == b"-ERR [AUTH] no\r\n+ \r\n+OK Logged in\r\n"


def test_sasl_cancel_bad_base64_and_unknown_mechanism() -> None:
    p = Pop3Engine(Features())
    for line in (b"*", b"!!notbase64", b"A" * 20_000):  # RFC 5034 §4: each ends AUTH
        p.receive_data(b"AUTH LOGIN\r\n")
        assert p.next_event() == AuthStart("LOGIN", None)
        p.auth_challenge(b"Username:")
        p.receive_data(line + b"\r\n")
        assert p.next_event() is NEED_DATA and p.state is State.AUTHORIZATION
    out = p.data_to_send()
    assert out.count(b"+ VXNlcm5hbWU6\r\n") == 3
    assert b"-ERR Authentication cancelled" in out and b"-ERR Invalid base64" in out
    assert b"-ERR Line too long" in out
    out, events = run(p, b"AUTH CRAM-MD5\r\nAUTH PLAIN a b\r\nAUTH PLAIN @@\r\nAUTH\r\n")
    assert not events and out.count(b"-ERR") == 3
    # A supported mechanism with one argument too many is a syntax error, not an unknown one.
    assert b"-ERR Unsupported authentication mechanism\r\n-ERR Syntax: AUTH mechanism" in out
    assert out.endswith(b"+OK\r\nPLAIN\r\nLOGIN\r\nSCRAM-SHA-256\r\n.\r\n")
    assert p.state is State.AUTHORIZATION


def test_top_takes_any_line_count() -> None:
    # "TOP 1 1000000000" got "-ERR Invalid message number".
    p = Pop3Engine(Features(), tls_active=True)
    out, _ = run(p, b"USER u@a.test\r\nPASS pw\r\n")
    out, events = run(p, b"TOP 1 1000000000\r\nTOP 1 " + b"9" * 200 + b"\r\nTOP 1 x\r\n")
    assert events == [Command("TOP", 1, 1000000000), Command("TOP", 1, 10**20)]
    assert out.endswith(b"-ERR Invalid line count\r\n")


def test_apop_is_not_offered() -> None:
    p = Pop3Engine(Features())
    out, events = run(p, b"APOP u 0123456789abcdef0123456789abcdef\r\n")
    assert out.startswith(b"-ERR") and not events
    # Before STLS the answer must not suggest that STLS would make APOP work.
    plain = Pop3Engine(Features(starttls=True, login_allowed=False))
    out, events = run(plain, b"APOP u 0123456789abcdef0123456789abcdef\r\n", login=False)
    assert out.endswith(b"-ERR APOP is not supported\r\n") and not events


def test_failed_logins_count_as_errors() -> None:
    p = Pop3Engine(Features(max_errors=3))
    out, _ = run(
        p, b"USER u\r\nPASS a\r\nUSER u\r\nPASS b\r\nUSER u\r\nPASS c\r\nUSER u\r\n", login=False
    )
    assert p.state is State.CLOSED and out.endswith(b"; too many errors, closing\r\n")
    assert out.count(b"+OK") == 3  # the fourth USER is never read
    assert out.count(b"-ERR") == 3  # one response per command (RFC 1939 §3)


def test_command_limit() -> None:
    p = Pop3Engine(Features(max_commands=3))
    out, events = run(p, b"NOOP\r\nCAPA\r\nNOOP\r\nNOOP\r\n")
    assert isinstance(events[-1], Closing) and out.endswith(b"Too many commands in one session\r\n")


def test_lenient_spacing_and_case() -> None:
    p = Pop3Engine(Features())
    _, events = run(p, b"user u\r\npass p\r\nretr 1 \r\nlist   2\r\ntop 1  0\r\n")
    assert [e for e in events if isinstance(e, Command)] == [
        Command("RETR", 1),
        Command("LIST", 2),
        Command("TOP", 1, 0),
    ]


def test_password_with_spaces_and_utf8() -> None:
    p = Pop3Engine(Features())
    _, events = run(p, "UTF8\r\nUSER j\u00f6rg@a.test\r\nPASS  two  words \r\n".encode())
    assert events == [Login("j\u00f6rg@a.test", " two  words ")]
    assert p.utf8


def test_white_space_around_a_user_name_is_no_part_of_it() -> None:
    """``USER name `` (a trailing space) got +OK, then the login failed, counting towards
    the failed logins (pop3 probe); the password keeps its spaces."""
    p = Pop3Engine(Features())
    _, events = run(p, b"USER  u@a.test \r\nPASS  p \r\n")
    assert events == [Login("u@a.test", " p ")]
    out, _ = run(Pop3Engine(Features()), b"USER  \r\n", login=False)
    assert status(out) == [b"-ERR"]


def test_quit_before_login_and_misuse() -> None:
    p = Pop3Engine(Features())
    out, events = run(p, b"QUIT\r\nNOOP\r\n")
    assert out == b"+OK Bye\r\n" and events == [Closing(clean=True)] and p.state is State.CLOSED
    q = Pop3Engine(Features())
    with pytest.raises(EngineMisuse):
        q.ok()  # nothing to answer: a bug in the caller, not the peer's fault
    with pytest.raises(EngineMisuse):
        q.tls_started(Features())
    q.receive_data(b"USER u\r\nPASS p\r\n")
    assert isinstance(q.next_event(), Login)
    with pytest.raises(EngineMisuse):
        q.next_event()  # the Login has not been answered


def test_transaction_refuses_authorization_commands() -> None:
    p = Pop3Engine(Features(starttls=True))
    out, _ = run(p, b"USER u\r\nPASS p\r\nSTLS\r\nUSER x\r\nAUTH PLAIN\r\nCAPA\r\n")
    assert status(out)[2:5] == [b"-ERR", b"-ERR", b"-ERR"]
    assert b"STLS\r\n" not in out.split(b"Capability list follows")[1]


def test_close_after_time_out() -> None:
    p = Pop3Engine(Features())
    p.close("Autologout: idle for too long")
    assert p.data_to_send() == b"-ERR Autologout: idle for too long\r\n"
    p.receive_data(b"NOOP\r\n")
    assert p.next_event() is NEED_DATA and p.data_to_send() == b""


# -- streaming pieces: CRLF conversion, TOP ---------------------------------------------------

TEXT = st.lists(
    st.sampled_from([b"a", b"b", b".", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"x" * 7]), max_size=60
).map(b"".join)


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos : pos + n])
        pos += n
        i += 1
    return out


def top_reference(data: bytes, lines: int) -> bytes:
    """TOP written the obvious way, on the whole message (RFC 1939 §7)."""
    whole = b"\r\n" + data
    end = whole.find(b"\r\n\r\n")
    if end < 0:
        return data
    head, body = whole[2 : end + 4], whole[end + 4 :]
    parts = body.split(b"\r\n")
    if parts[-1] == b"":
        parts.pop()  # the last line ended with CRLF; otherwise it is a (partial) line too
    if len(parts) <= lines:
        return data
    return head + b"".join(p + b"\r\n" for p in parts[:lines])


@given(TEXT, st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_crlf_conversion_in_pieces_equals_whole(data: bytes, sizes: list[int]) -> None:
    conv = CrlfConverter()
    out = b"".join(conv.feed(p) for p in cut(data, sizes)) + conv.finish()
    assert out == to_crlf(data)


@given(TEXT, st.integers(0, 5), st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_top_in_pieces_equals_reference(data: bytes, lines: int, sizes: list[int]) -> None:
    data = to_crlf(data)
    top = TopFilter(lines)
    out = b""
    for piece in cut(data, sizes):
        out += top.feed(piece)
        if top.done:
            break
    assert out == top_reference(data, lines)


@given(TEXT, st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_streamed_retr_equals_whole_and_unstuffs(data: bytes, sizes: list[int]) -> None:
    """File pieces -> CRLF -> dot-stuffing, as RETR streams it, equals the one-shot path."""
    conv, stuffer = CrlfConverter(), Stuffer()
    out = b"".join(stuffer.feed(conv.feed(p)) for p in cut(data, sizes))
    out += stuffer.feed(conv.finish()) + stuffer.finish()
    assert out == dot_stuff(to_crlf(data))


def test_a_long_pipeline_asks_for_its_replies_to_be_sent() -> None:
    """CAPA x 5000 before a login: the replies are handed out in batches (FLUSH), so that the
    glue stops reading while the client does not read them (it held them all: 4 MB)."""
    p = Pop3Engine(Features())
    p.receive_data(b"CAPA\r\n" * 5000)
    assert p.next_event() is FLUSH
    first = p.data_to_send()
    assert 0 < first.count(b"+OK Capability") < 5000
    assert p.next_event() is FLUSH  # asked again for the next full outbox
