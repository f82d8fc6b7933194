"""The POP3 server as a sans-I/O state machine (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS,
RFC 5034 SASL AUTH, RFC 6856 UTF8, response codes of RFC 2449 §8 and RFC 3206).

Bytes go in with :meth:`Pop3Engine.receive_data`; :meth:`next_event` yields typed events;
responses accumulate in an output buffer (:meth:`data_to_send`; the buffers are
``wire/buffers.py``'s). The engine checks syntax and state itself (wrong state, bad arguments,
unknown commands: ``-ERR``, the session goes on); what needs the mailbox or the account store
becomes an event the glue answers with :meth:`ok`, :meth:`err`, :meth:`multiline`,
:meth:`login_ok` and friends. Answering what was not asked, or asking for the next event
before answering, raises ``EngineMisuse``.

States and transitions: :data:`TRANSITIONS` is the one table and every state change goes
through it. This diagram is checked against the table by a test::

    AUTHORIZATION|SASL --LOGIN_OK--> TRANSACTION
    AUTHORIZATION|SASL --LOGIN_FAILED--> AUTHORIZATION
    AUTHORIZATION --AUTH--> SASL
    SASL --CHALLENGE--> SASL
    SASL --AUTH_END--> AUTHORIZATION
    AUTHORIZATION --STLS--> TLS
    TLS --TLS_STARTED--> AUTHORIZATION
    AUTHORIZATION --QUIT--> CLOSED
    TRANSACTION --QUIT--> UPDATE
    UPDATE --BYE--> CLOSED
    AUTHORIZATION|SASL|TRANSACTION|UPDATE|TLS --CLOSE--> CLOSED

LOGIN_OK/LOGIN_FAILED answer USER+PASS or a SASL exchange; AUTH_END is a SASL exchange given up
(``*``, bad base64, a line too long); UPDATE is RFC 1939 §6's, where the glue applies the
deletions before :meth:`bye`; CLOSE is a final ``-ERR`` from our side (too many errors or
commands, time-out, shutdown).

Security: lines are split by :mod:`postroom.wire.framing` (the one splitter); bytes pipelined
after STLS are discarded (RFC 2595 §4, CVE-2011-0411 class); APOP is not offered, because it
needs a plaintext-equivalent secret on the server (see docs/pop3.md).
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass, field
from typing import Final

from postroom.errors import EngineMisuse
from postroom.wire.buffers import Buffers
from postroom.wire.events import (
    FLUSH,
    NEED_DATA,
    AuthResponse,
    AuthStart,
    Closing,
    Flush,
    NeedData,
    StartTLS,
)
from postroom.wire.framing import TOO_LONG, LineReader
from postroom.wire.replies import printable

MAX_COMMAND = 255  # RFC 2449 §4: command lines are at most 255 octets including CRLF
MAX_SASL_LINE = 12288


def _reply(status: str, text: str) -> bytes:
    """A status line; its text printable US-ASCII whatever it was made from (RFC 1939 §3)."""
    return f"{status}{printable(text)}\r\n".encode("ascii")


def _ok(text: str) -> bytes:
    return _reply("+OK ", text) if text else b"+OK\r\n"


class Pop3State(enum.StrEnum):
    AUTHORIZATION = "AUTHORIZATION"
    SASL = "SASL"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    TLS = "TLS"
    CLOSED = "CLOSED"


class Pop3Trigger(enum.StrEnum):
    LOGIN_OK = "LOGIN_OK"
    LOGIN_FAILED = "LOGIN_FAILED"
    AUTH = "AUTH"
    CHALLENGE = "CHALLENGE"
    AUTH_END = "AUTH_END"
    STLS = "STLS"
    TLS_STARTED = "TLS_STARTED"
    QUIT = "QUIT"
    BYE = "BYE"
    CLOSE = "CLOSE"


_S, _T = Pop3State, Pop3Trigger
TRANSITIONS: Final[dict[Pop3State, dict[Pop3Trigger, Pop3State]]] = {
    _S.AUTHORIZATION: {
        _T.LOGIN_OK: _S.TRANSACTION,
        _T.LOGIN_FAILED: _S.AUTHORIZATION,
        _T.AUTH: _S.SASL,
        _T.STLS: _S.TLS,
        _T.QUIT: _S.CLOSED,
        _T.CLOSE: _S.CLOSED,
    },
    _S.SASL: {
        _T.LOGIN_OK: _S.TRANSACTION,
        _T.LOGIN_FAILED: _S.AUTHORIZATION,
        _T.CHALLENGE: _S.SASL,
        _T.AUTH_END: _S.AUTHORIZATION,
        _T.CLOSE: _S.CLOSED,
    },
    _S.TRANSACTION: {_T.QUIT: _S.UPDATE, _T.CLOSE: _S.CLOSED},
    _S.UPDATE: {_T.BYE: _S.CLOSED, _T.CLOSE: _S.CLOSED},
    _S.TLS: {_T.TLS_STARTED: _S.AUTHORIZATION, _T.CLOSE: _S.CLOSED},
    _S.CLOSED: {},
}


@dataclass
class Pop3Features:
    """What the session offers right now."""

    starttls: bool = False
    login_allowed: bool = True  # TLS is active, or plaintext logins are allowed
    sasl: tuple[str, ...] = ("PLAIN", "LOGIN", "SCRAM-SHA-256")
    max_errors: int = 20  # protocol errors and failed logins before we hang up
    max_commands: int = 100_000  # per session ([limits] max_commands)


# -- events --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserPass:
    """USER + PASS. Answer with :meth:`Pop3Engine.login_ok` or :meth:`login_failed`."""

    user: str
    password: str


@dataclass(frozen=True, slots=True)
class Command:
    """A TRANSACTION command with checked arguments: STAT LIST RETR DELE RSET TOP UIDL NOOP."""

    verb: str
    msg: int | None = None  # message number (1-based) where the command takes one
    lines: int | None = None  # TOP's line count


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT in TRANSACTION: apply the deletions now (RFC 1939 §6), then :meth:`bye`."""


Event = UserPass | AuthStart | AuthResponse | Command | Quit | StartTLS | Closing
_NEEDS_ANSWER = (UserPass, AuthStart, AuthResponse, Command, Quit)

_TRANSACTION_VERBS = {"STAT", "LIST", "RETR", "DELE", "RSET", "TOP", "UIDL", "NOOP"}
# Commands with a required message number, and those where it is optional.
_NEEDS_MSG = {"RETR", "DELE", "TOP"}
_OPTIONAL_MSG = {"LIST", "UIDL"}


def _number(text: str) -> int | None:
    if not text.isdigit() or len(text) > 9 or not text.isascii():
        return None
    return int(text)


@dataclass
class Pop3Engine(Buffers):
    """One POP3 session's protocol state."""

    features: Pop3Features
    state: Pop3State = Pop3State.AUTHORIZATION
    tls_active: bool = False
    utf8: bool = False
    errors: int = 0
    commands: int = 0
    _reader: LineReader = field(default_factory=lambda: LineReader(MAX_SASL_LINE))
    _out: list[bytes] = field(default_factory=list)
    _flush_asked: bool = False
    _user: str | None = None
    _awaiting: type | None = None

    # -- the table -----------------------------------------------------------------------------

    def _go(self, trigger: Pop3Trigger) -> None:
        """Move along the table; a move it does not have is a bug in the caller."""
        try:
            self.state = TRANSITIONS[self.state][trigger]
        except KeyError:
            raise EngineMisuse(f"{trigger} in state {self.state}") from None

    @property
    def closed(self) -> bool:
        return self.state is Pop3State.CLOSED

    # -- bytes in and out ----------------------------------------------------------------------

    # pending_input, data_to_send, parts_to_send: Buffers (wire/buffers.py).

    def receive_data(self, data: bytes) -> None:
        # Closed, or plaintext after STLS before the handshake: never executed.
        if self.state is not Pop3State.CLOSED and self.state is not Pop3State.TLS:
            self._reader.feed(data)

    def send_raw(self, data: bytes) -> None:
        """Queue already-formatted octets (the pieces of a streamed multi-line body)."""
        self._out.append(data)

    # -- answers -------------------------------------------------------------------------------

    def _answered(self, *kinds: type) -> None:
        if self._awaiting is None or self._awaiting not in kinds:
            raise EngineMisuse(f"no {'/'.join(k.__name__ for k in kinds)} is waiting for an answer")
        self._awaiting = None

    def ok(self, text: str = "") -> None:
        self._answered(Command)
        self._out.append(_ok(text))

    def err(self, text: str, code: str | None = None) -> None:
        self._answered(Command)
        self._err(text, code)

    def multiline(self, first: str, body: bytes, end: bytes = b"") -> None:
        """``+OK first``, then ``body`` and ``end`` (dot-stuffed: together they end with
        ``.\\r\\n``; see ``framing.dot_stuff_parts``)."""
        self._answered(Command)
        self._out.append(_ok(first))
        self._out.append(body)
        if end:
            self._out.append(end)

    def begin_multiline(self, first: str) -> None:
        """For streamed bodies: the caller then sends the stuffed body with :meth:`send_raw`."""
        self._answered(Command)
        self._out.append(_ok(first))

    def login_ok(self, text: str = "Logged in") -> None:
        self._answered(UserPass, AuthStart, AuthResponse)
        self._out.append(_ok(text))
        self._go(Pop3Trigger.LOGIN_OK)

    def login_failed(self, text: str, code: str | None = "AUTH") -> None:
        """RFC 2449 §8.1.2 / RFC 3206: ``[AUTH]`` bad credentials, ``[IN-USE]`` mailbox locked,
        ``[SYS/TEMP]`` try later. A failed login counts as an error (see ``max_errors``)."""
        self._answered(UserPass, AuthStart, AuthResponse)
        self._go(Pop3Trigger.LOGIN_FAILED)
        self._user = None
        self._error(text, code)

    def auth_challenge(self, challenge: bytes) -> None:
        """RFC 5034 §4: ``+ <base64>`` and wait for the client's line."""
        self._answered(AuthStart, AuthResponse)
        self._out.append(b"+ " + base64.b64encode(challenge) + b"\r\n")
        self._go(Pop3Trigger.CHALLENGE)

    def bye(self, ok: bool = True, text: str = "Bye") -> None:
        """The answer to QUIT once the UPDATE state has run (RFC 1939 §6)."""
        self._answered(Quit)
        self._out.append(_ok(text) if ok else _reply("-ERR ", text))
        self._go(Pop3Trigger.BYE)

    def tls_started(self, features: Pop3Features) -> None:
        if self._reader.pending():
            raise EngineMisuse("input left in the buffer at the TLS switch")
        self._go(Pop3Trigger.TLS_STARTED)
        # RFC 2595 §4: after the handshake nothing said before it counts; start afresh.
        self.features = features
        self.tls_active = True
        self.utf8 = False
        self._user = None

    def close(self, text: str, code: str | None = None) -> None:
        """A final -ERR (time-out, shutdown) and the end of the session."""
        if self.state is Pop3State.CLOSED:
            return
        self._awaiting = None
        self._err(text, code)
        self._go(Pop3Trigger.CLOSE)

    # -- events --------------------------------------------------------------------------------

    def next_event(self) -> Event | NeedData | Flush:
        if self._awaiting is not None:
            raise EngineMisuse(f"{self._awaiting.__name__} has not been answered")
        state = self.state
        while (
            state is Pop3State.AUTHORIZATION
            or state is Pop3State.TRANSACTION
            or (state is Pop3State.SASL)
        ):
            if self.outbox_full():
                return FLUSH
            line = self._reader.read_line()
            if line is None:
                return NEED_DATA
            if line is TOO_LONG:
                if state is Pop3State.SASL:
                    # RFC 5034 §4: the -ERR ends AUTH; the next line is a command again.
                    self._go(Pop3Trigger.AUTH_END)
                event = self._error("Line too long")
            else:
                assert isinstance(line, bytes)
                event = self._sasl_line(line) if state is Pop3State.SASL else self._line(line)
            if event is not None:
                if isinstance(event, _NEEDS_ANSWER):
                    self._awaiting = type(event)
                return event
            state = self.state
        return NEED_DATA

    def _err(self, text: str, code: str | None) -> None:
        prefix = f"[{code}] " if code else ""
        self._out.append(_reply("-ERR ", prefix + text))

    def _error(self, text: str, code: str | None = None) -> Event | None:
        self.errors += 1
        if self.errors >= self.features.max_errors:
            # One response per command (RFC 1939 §3): the last one also says goodbye.
            self.close(f"{text}; too many errors, closing", code)
            return Closing()
        self._err(text, code)
        return None

    def capabilities(self) -> list[str]:
        """RFC 2449 §6: what works now, and after the login what worked before it."""
        f = self.features
        caps = [
            "TOP",
            "UIDL",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "PIPELINING",
            "IMPLEMENTATION postroom",
        ]
        # RFC 2449 §5: what was announced before the login is announced after it too (a
        # session is in TRANSACTION only by a login, so login was allowed); STLS aside, which
        # works in AUTHORIZATION only (RFC 2595 §4).
        if f.login_allowed or self.state is not Pop3State.AUTHORIZATION:
            # RFC 6856 §2: "UTF8 USER" = UTF-8 user names and passwords work with USER/PASS.
            caps += ["UTF8 USER", "USER"]
            if f.sasl:
                caps.append("SASL " + " ".join(f.sasl))
        else:
            caps.append("UTF8")
        if f.starttls and not self.tls_active and self.state is Pop3State.AUTHORIZATION:
            caps.append("STLS")
        return caps

    def _line(self, line: bytes) -> Event | None:
        if len(line) + 2 > MAX_COMMAND and not line[:5].upper().startswith(b"AUTH "):
            return self._error("Line too long")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._error("Invalid UTF-8 in command")
        verb, _, rest = text.partition(" ")
        # RFC 1939 §3: keywords are ASCII; str.upper() would make "u\u017fer" (long s) USER.
        verb = verb.upper() if verb.isascii() else "?"
        args = rest.split()
        self.commands += 1
        if self.commands > self.features.max_commands:
            self.close("Too many commands in one session", "SYS/TEMP")
            return Closing()
        # RFC 1939 §7: PASS "may only be given ... immediately after a successful USER command".
        named_user, self._user = self._user, None
        if verb == "CAPA":
            body = "".join(f"{c}\r\n" for c in self.capabilities())
            self._out.append(f"+OK Capability list follows\r\n{body}.\r\n".encode())
            return None
        if verb == "QUIT":
            if self.state is Pop3State.TRANSACTION:
                self._go(Pop3Trigger.QUIT)
                return Quit()
            self._out.append(b"+OK Bye\r\n")
            self._go(Pop3Trigger.QUIT)
            return Closing(clean=True)
        if self.state is Pop3State.AUTHORIZATION:
            return self._authorization(verb, rest, args, named_user)
        return self._transaction(verb, args)

    def _authorization(
        self, verb: str, rest: str, args: list[str], named_user: str | None
    ) -> Event | None:
        """``named_user``: the name a USER just before this command gave (for PASS)."""
        if verb == "STLS":
            if not self.features.starttls or self.tls_active:
                return self._error("STLS not available here")
            if rest:
                return self._error("STLS takes no argument")  # RFC 2595 §4
            self._out.append(b"+OK Begin TLS negotiation\r\n")
            discarded = self._reader.discard()  # RFC 2595 §4: nothing pipelined survives
            self._go(Pop3Trigger.STLS)
            return StartTLS(discarded)
        if verb == "UTF8":
            # RFC 6856 §2: UTF-8 user names, passwords and mailbox content are accepted.
            self.utf8 = True
            self._out.append(b"+OK UTF8 enabled\r\n")
            return None
        if verb == "APOP":  # not offered (no greeting timestamp): no STLS makes it work
            return self._error("APOP is not supported")
        if verb in ("USER", "PASS", "AUTH") and not self.features.login_allowed:
            # RFC 2595 §2.1 / RFC 8314: no credentials in the clear.
            return self._error("Plaintext login disallowed, use STLS first", "AUTH")
        if verb == "USER":
            # (White space around the name is no part of it: no login name has any, and
            # PASS would fail, counting towards the failed logins.)
            name = rest.strip()
            if not name:
                return self._error("USER needs a name")
            self._user = name
            self._out.append(b"+OK Send your password\r\n")
            return None
        if verb == "PASS":
            if named_user is None:
                return self._error("USER first")
            return UserPass(named_user, rest)
        if verb == "AUTH":
            if not args or not args[0]:
                # RFC 5034 §4 / RFC 1734: bare AUTH lists the mechanisms.
                body = "".join(f"{m}\r\n" for m in self.features.sasl)
                self._out.append(f"+OK\r\n{body}.\r\n".encode())
                return None
            mech = args[0].upper()
            if mech not in self.features.sasl:
                return self._error("Unsupported authentication mechanism")
            if len(args) > 2:  # RFC 5034 §4: AUTH mechanism [initial-response]
                return self._error("Syntax: AUTH mechanism [initial-response]")
            initial: bytes | None = None
            if len(args) == 2:
                if args[1] == "=":
                    initial = b""
                else:
                    try:
                        initial = base64.b64decode(args[1], validate=True)
                    except ValueError:
                        return self._error("Invalid base64")
            self._go(Pop3Trigger.AUTH)
            return AuthStart(mech, initial)
        if verb in _TRANSACTION_VERBS:
            return self._error("Not logged in")
        return self._error("Unknown command")

    def _sasl_line(self, line: bytes) -> Event | None:
        if line.strip() == b"*":
            self._go(Pop3Trigger.AUTH_END)
            return self._error("Authentication cancelled")
        try:
            data = base64.b64decode(line.strip(), validate=True)
        except ValueError:
            self._go(Pop3Trigger.AUTH_END)
            return self._error("Invalid base64")
        return AuthResponse(data)

    def _transaction(self, verb: str, args: list[str]) -> Event | None:
        if verb not in _TRANSACTION_VERBS:
            if verb in ("USER", "PASS", "AUTH", "APOP", "STLS", "UTF8"):
                return self._error("Already logged in")
            return self._error("Unknown command")
        if verb in _NEEDS_MSG:
            want = 2 if verb == "TOP" else 1
            if len(args) != want:
                return self._error(f"{verb} needs {want} argument{'s' if want > 1 else ''}")
            msg = _number(args[0])
            if msg is None or msg == 0:
                return self._error("Invalid message number")
            lines = None
            if verb == "TOP":
                count = args[1]
                if not (count.isascii() and count.isdigit()):
                    return self._error("Invalid line count")
                # RFC 1939 §7: any count; beyond what a message has it is the whole body (and
                # int() of thousands of digits is refused or slow: cap the text first).
                lines = int(count) if len(count) <= 20 else 10**20
            return Command(verb, msg, lines)
        if verb in _OPTIONAL_MSG:
            if len(args) > 1:
                return self._error("Too many arguments")
            if args:
                msg = _number(args[0])
                if msg is None or msg == 0:
                    return self._error("Invalid message number")
                return Command(verb, msg)
            return Command(verb)
        if args:
            return self._error(f"{verb} takes no arguments")
        return Command(verb)
