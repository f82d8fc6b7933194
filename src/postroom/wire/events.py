"""The events the sans-I/O engines share, where they mean the same in SMTP and POP3.

An engine's ``next_event()`` returns :data:`NEED_DATA` when it has consumed all it can; the
other classes here are events of both server engines (``smtp/server_engine.py``,
``pop3/engine.py``), and :class:`StartTLS` of the SMTP client engine too. Engine-specific events
live in their engine's module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


class NeedData:
    """The engine needs more input (or is waiting for TLS, or closed)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class Flush:
    """The engine's outbox is large (a client pipelining many commands, or a long listing):
    send it, and take more input only while the client reads (a server engine's
    ``next_event()`` asks once per outbox, then goes on if called again)."""

    def __repr__(self) -> str:
        return "FLUSH"


FLUSH: Final = Flush()


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The TLS switch was agreed (the server's ``220``/``+OK`` is queued): send what is queued,
    do the handshake, then call the engine's ``tls_started``. ``discarded`` counts the octets
    pipelined after the command, which were dropped unread (RFC 3207 §4.2, RFC 2595 §4)."""

    discarded: int = 0


@dataclass(frozen=True, slots=True)
class AuthStart:
    """A SASL exchange begins (RFC 4954, RFC 5034). ``initial`` is the decoded initial
    response, or None if the client sent none. Needs a challenge or an end from the caller."""

    mechanism: str
    initial: bytes | None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """The client's decoded answer to a challenge; needs a challenge or an end."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Closing:
    """The engine ended the session (QUIT, too many errors or commands) and queued its last
    words: flush them, then close. ``clean`` is True after QUIT; otherwise the peer may still
    be sending, and the glue lets it read the last reply before the connection goes."""

    clean: bool = False
