"""STARTTLS and STLS take no argument: ``STLS foo`` got ``+OK`` and switched to TLS.

RFC 2595 §4 gives STLS no argument, RFC 3207 §4 none to STARTTLS; a command with one is an
error (``-ERR``, ``501``) and the session stays in plaintext, reading commands.
"""

from __future__ import annotations

from postroom.pop3.engine import Pop3Engine, Pop3Features, Pop3State
from postroom.smtp.server_engine import ServerEngine, ServerFeatures, ServerState
from postroom.wire.events import NEED_DATA, StartTLS


def test_stls_with_an_argument_is_refused() -> None:
    engine = Pop3Engine(Pop3Features(starttls=True, login_allowed=False))
    engine.receive_data(b"STLS foo\r\nCAPA\r\n")
    assert engine.next_event() is NEED_DATA
    out = engine.data_to_send()
    assert out.startswith(b"-ERR ") and b"+OK Capability list follows" in out
    assert engine.state is Pop3State.AUTHORIZATION and not engine.tls_active
    engine.receive_data(b"STLS\r\n")
    assert isinstance(engine.next_event(), StartTLS)


def test_starttls_with_an_argument_gets_501() -> None:
    engine = ServerEngine(ServerFeatures("mx.test", 1000, starttls=True))
    engine.receive_data(b"EHLO c.test\r\nSTARTTLS foo\r\nNOOP\r\n")
    events = []
    while (event := engine.next_event()) is not NEED_DATA:
        events.append(event)
    replies = engine.data_to_send().split(b"\r\n")
    assert any(r.startswith(b"501 ") for r in replies) and replies[-2].startswith(b"250 ")
    assert not any(isinstance(e, StartTLS) for e in events)
    assert engine.state is ServerState.READY
