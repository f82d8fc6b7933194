"""The sans-I/O POP3 engine, driven in memory."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.pop3.protocol import (
    NEED_DATA,
    AuthStart,
    Closing,
    Command,
    Features,
    Login,
    Pop3Protocol,
    Quit,
    StartTLS,
    State,
)
from postroom.smtp.framing import DotReader, Stuffer, dot_stuff


def run(proto: Pop3Protocol, data: bytes, login: bool = True) -> tuple[bytes, list[object]]:
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
    p = Pop3Protocol(Features())
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
    p = Pop3Protocol(Features())
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


def test_plaintext_login_refused_without_tls() -> None:
    p = Pop3Protocol(Features(starttls=True, login_allowed=False))
    out, events = run(p, b"CAPA\r\nUSER u\r\nAUTH PLAIN\r\n")
    assert b"STLS\r\n" in out and b"USER\r\n" not in out and b"SASL" not in out
    assert out.count(b"-ERR [AUTH]") == 2 and not events


def test_stls_discards_pipelined_commands() -> None:
    p = Pop3Protocol(Features(starttls=True, login_allowed=False))
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
    p = Pop3Protocol(Features(max_errors=3))
    out, events = run(p, b"NOOP " + b"x" * 300 + b"\r\nX\r\nY\r\nZ\r\n")
    assert out.startswith(b"-ERR Line too long")
    assert isinstance(events[-1], Closing) and p.state is State.CLOSED


def test_failed_login_returns_to_authorization() -> None:
    p = Pop3Protocol(Features())
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
    whole = Pop3Protocol(Features(starttls=True))
    out1, ev1 = run(whole, stream)
    pieces = Pop3Protocol(Features(starttls=True))
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
