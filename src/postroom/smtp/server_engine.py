"""The SMTP server as a sans-I/O state machine (RFC 5321, with ESMTP extensions).

Bytes go in with :meth:`ServerEngine.receive_data`; :meth:`ServerEngine.next_event` yields
typed events; replies accumulate in an output buffer read with :meth:`data_to_send` (the
buffers are ``wire/buffers.py``'s). No sockets, no asyncio, no files: the glue (``server.py``)
moves bytes, the policy (``policy.py``) decides.

The engine answers everything that needs no policy itself (syntax errors, bad sequence, NOOP,
HELP, VRFY, RSET, QUIT, EHLO with the current extension list). Events that need a decision
(:class:`MailFrom`, :class:`RcptTo`, :class:`MessageEnd`, ``AuthStart``, ``AuthResponse``) must
be answered with :meth:`ServerEngine.reply` (or :meth:`auth_challenge`/:meth:`auth_finish`)
before the next event is asked for; asking earlier is a bug and raises ``EngineMisuse``.

States and transitions: :data:`TRANSITIONS` is the one table, every state change goes through
it, and a command the table does not allow in the current state gets ``503`` (RFC 5321 §4.1.4).
This diagram is checked against the table by a test::

    CONNECTED|READY|MAIL|RCPT|BDAT --HELLO--> READY
    READY --MAIL_OK--> MAIL
    MAIL|RCPT --RCPT_OK--> RCPT
    RCPT --DATA--> DATA
    RCPT|BDAT --BDAT--> BDAT
    DATA|BDAT --MESSAGE_END--> READY
    READY --AUTH--> AUTH
    AUTH --AUTH_CHALLENGE--> AUTH
    AUTH --AUTH_END--> READY
    CONNECTED|READY --STARTTLS--> TLS
    TLS --TLS_STARTED--> CONNECTED
    CONNECTED --RSET--> CONNECTED
    READY|MAIL|RCPT|BDAT --RSET--> READY
    CONNECTED|READY|MAIL|RCPT|BDAT --QUIT--> CLOSED
    CONNECTED|READY|MAIL|RCPT|DATA|BDAT|AUTH|TLS --CLOSE--> CLOSED

HELLO is EHLO/HELO; MAIL_OK and RCPT_OK are positive replies of the policy; MESSAGE_END is the
reply to the end of the message (or the engine's refusal of it); AUTH_END is the end of a SASL
exchange, whichever way; CLOSE is a final reply from our side (too many errors or commands,
time-out, shutdown). After TLS_STARTED everything learnt before is forgotten (RFC 3207 §4.2).

Security: end-of-data is recognised only by :mod:`framing` (CRLF.CRLF); bytes pipelined after
STARTTLS are discarded, never executed (RFC 3207 §4.2, CVE-2011-0411); BDAT octets are always
consumed even when the BDAT command is refused, so they can never be read as commands.
"""

from __future__ import annotations

import base64
import enum
import re
from dataclasses import dataclass, field
from typing import Final

from postroom import sasl
from postroom.errors import EngineMisuse
from postroom.smtp import commands
from postroom.smtp.commands import Auth, Bdat, CommandError, Hello, Mail, Rcpt, Simple
from postroom.wire import replies
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
from postroom.wire.framing import TOO_LONG, CountedReader, DotReader, LineEndCheck, LineReader
from postroom.wire.replies import Reply

_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # RFC 5322 §3.2.3 atext


class ServerState(enum.StrEnum):
    CONNECTED = "CONNECTED"
    READY = "READY"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"
    AUTH = "AUTH"
    TLS = "TLS"
    CLOSED = "CLOSED"


class ServerTrigger(enum.StrEnum):
    HELLO = "HELLO"
    MAIL_OK = "MAIL_OK"
    RCPT_OK = "RCPT_OK"
    DATA = "DATA"
    BDAT = "BDAT"
    MESSAGE_END = "MESSAGE_END"
    AUTH = "AUTH"
    AUTH_CHALLENGE = "AUTH_CHALLENGE"
    AUTH_END = "AUTH_END"
    STARTTLS = "STARTTLS"
    TLS_STARTED = "TLS_STARTED"
    RSET = "RSET"
    QUIT = "QUIT"
    CLOSE = "CLOSE"


_S, _T = ServerState, ServerTrigger
RECIPIENT_OVERSHOOT = 1000  # recipients past the limit before each counts as an error
_COMMANDS = (_S.CONNECTED, _S.READY, _S.MAIL, _S.RCPT, _S.BDAT)  # where lines are commands

TRANSITIONS: Final[dict[ServerState, dict[ServerTrigger, ServerState]]] = {
    _S.CONNECTED: {
        _T.HELLO: _S.READY,
        _T.STARTTLS: _S.TLS,
        _T.RSET: _S.CONNECTED,
        _T.QUIT: _S.CLOSED,
        _T.CLOSE: _S.CLOSED,
    },
    _S.READY: {
        _T.HELLO: _S.READY,
        _T.MAIL_OK: _S.MAIL,
        _T.AUTH: _S.AUTH,
        _T.STARTTLS: _S.TLS,
        _T.RSET: _S.READY,
        _T.QUIT: _S.CLOSED,
        _T.CLOSE: _S.CLOSED,
    },
    _S.MAIL: {
        _T.HELLO: _S.READY,
        _T.RCPT_OK: _S.RCPT,
        _T.RSET: _S.READY,
        _T.QUIT: _S.CLOSED,
        _T.CLOSE: _S.CLOSED,
    },
    _S.RCPT: {
        _T.HELLO: _S.READY,
        _T.RCPT_OK: _S.RCPT,
        _T.DATA: _S.DATA,
        _T.BDAT: _S.BDAT,
        _T.RSET: _S.READY,
        _T.QUIT: _S.CLOSED,
        _T.CLOSE: _S.CLOSED,
    },
    _S.DATA: {_T.MESSAGE_END: _S.READY, _T.CLOSE: _S.CLOSED},
    _S.BDAT: {
        _T.HELLO: _S.READY,
        _T.BDAT: _S.BDAT,
        _T.MESSAGE_END: _S.READY,
        _T.RSET: _S.READY,
        _T.QUIT: _S.CLOSED,
        _T.CLOSE: _S.CLOSED,
    },
    _S.AUTH: {_T.AUTH_CHALLENGE: _S.AUTH, _T.AUTH_END: _S.READY, _T.CLOSE: _S.CLOSED},
    _S.TLS: {_T.TLS_STARTED: _S.CONNECTED, _T.CLOSE: _S.CLOSED},
    _S.CLOSED: {},
}


@dataclass
class ServerFeatures:
    """What this session offers; the policy may change it (after TLS, after AUTH)."""

    hostname: str
    size_limit: int
    max_recipients: int = 1000
    max_errors: int = 20
    max_commands: int = 10000
    starttls: bool = False
    auth_mechanisms: tuple[str, ...] = ()


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """EHLO/HELO was answered; any transaction was reset."""

    domain: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    """Needs a reply. ``command.sender`` is None for the null reverse-path."""

    command: Mail


@dataclass(frozen=True, slots=True)
class RcptTo:
    """Needs a reply."""

    command: Rcpt


@dataclass(frozen=True, slots=True)
class DataStart:
    """Message data follows (after DATA's 354, or with the first BDAT chunk)."""


@dataclass(frozen=True, slots=True)
class DataChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The complete message was received. Needs a reply (250 once it is safely stored)."""


@dataclass(frozen=True, slots=True)
class MessageAborted:
    """The engine refused the message (too big, bare CR/LF) and has replied already."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Refused:
    """The engine refused a MAIL or RCPT for a limit and has replied already: ``SIZE=`` above
    the limit (RFC 1870 §6), recipients beyond the limit (RFC 5321 §4.5.3.1.8). For the logs."""

    command: Mail | Rcpt
    reply: Reply


@dataclass(frozen=True, slots=True)
class TransactionReset:
    """RSET, or a new EHLO: forget the transaction."""


Event = (
    HelloReceived
    | MailFrom
    | RcptTo
    | DataStart
    | DataChunk
    | MessageEnd
    | MessageAborted
    | Refused
    | TransactionReset
    | StartTLS
    | AuthStart
    | AuthResponse
    | Closing
)
_NEEDS_REPLY = (MailFrom, RcptTo, MessageEnd, AuthStart, AuthResponse)


@dataclass
class _Transaction:
    mail: Mail | None = None
    rcpt_count: int = 0
    size: int = 0
    too_big: bool = False
    bare: bool = False
    nul: bool = False
    started: bool = False
    smtputf8: bool = False
    line_ends: LineEndCheck = field(default_factory=LineEndCheck)  # BDAT's bare CR/LF, NUL
    tail: bytes = b""  # BDAT: the last two octets of the message so far


@dataclass
class ServerEngine(Buffers):
    """One SMTP server session's protocol state. See the module docstring for the flow."""

    features: ServerFeatures
    state: ServerState = ServerState.CONNECTED
    tls_active: bool = False
    authenticated: bool = False
    helo: str | None = None
    errors: int = 0
    commands: int = 0
    overshoot: int = 0  # recipients refused as over max_recipients
    _reader: LineReader = field(default_factory=lambda: LineReader(commands.MAX_LINE))
    _out: list[bytes] = field(default_factory=list)
    _flush_asked: bool = False
    _txn: _Transaction = field(default_factory=_Transaction)
    _data: DotReader | CountedReader | None = None
    _bdat_last: bool = False
    _bdat_discard: Reply | None = None
    _awaiting: type | None = None
    _pending: list[Event] = field(default_factory=list)

    # -- the table -----------------------------------------------------------------------------

    def _go(self, trigger: ServerTrigger) -> None:
        """Move along the table; a move it does not have is a bug in the caller."""
        try:
            self.state = TRANSITIONS[self.state][trigger]
        except KeyError:
            raise EngineMisuse(f"{trigger} in state {self.state}") from None

    def _allows(self, trigger: ServerTrigger) -> bool:
        return trigger in TRANSITIONS[self.state]

    @property
    def closed(self) -> bool:
        return self.state is ServerState.CLOSED

    @property
    def receiving(self) -> bool:
        """A message's octets are being read: after DATA's 354, or a BDAT chunk's (not
        between two chunks, where the next command is awaited)."""
        return self._data is not None

    @property
    def in_message(self) -> bool:
        """A message is under way: its octets being read, or between two BDAT chunks."""
        return self._data is not None or self.state is ServerState.BDAT

    # -- bytes in and out ----------------------------------------------------------------------

    # pending_input, data_to_send, parts_to_send: Buffers (wire/buffers.py).

    def receive_data(self, data: bytes) -> None:
        # Closed, or plaintext after STARTTLS before the handshake: never executed.
        if self.state is not ServerState.CLOSED and self.state is not ServerState.TLS:
            self._reader.feed(data)

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.render())

    # -- events --------------------------------------------------------------------------------

    def next_event(self) -> Event | NeedData | Flush:
        if self._awaiting is not None:
            raise EngineMisuse(f"{self._awaiting.__name__} has not been answered")
        if self._pending:
            return self._emit(self._pending.pop(0))
        while True:
            if self.state is ServerState.CLOSED or self.state is ServerState.TLS:
                return NEED_DATA
            if self._data is not None:
                result = self._read_data()
                if result is NEED_DATA:
                    return NEED_DATA
                event = result
            else:
                if self.outbox_full():
                    return FLUSH
                line = self._reader.read_line()
                if line is None:
                    return NEED_DATA
                if line is TOO_LONG:
                    event = self._too_long()
                else:
                    assert isinstance(line, bytes)
                    event = self._line(line)
            if event is not None:
                assert not isinstance(event, NeedData)
                return self._emit(event)

    def _emit(self, event: Event) -> Event:
        if isinstance(event, _NEEDS_REPLY):
            self._awaiting = type(event)
        return event

    # -- replies from the policy ---------------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        """Answer the pending MailFrom, RcptTo or MessageEnd event."""
        kind = self._awaiting
        if kind is not MailFrom and kind is not RcptTo and kind is not MessageEnd:
            raise EngineMisuse("no MAIL/RCPT/end-of-data is waiting for a reply")
        self._awaiting = None
        self._send(reply)
        if kind is MailFrom:
            if reply.is_positive:
                self._go(ServerTrigger.MAIL_OK)
            else:
                self._txn = _Transaction()
                self._count_error(reply)
        elif kind is RcptTo:
            if reply.is_positive:
                self._txn.rcpt_count += 1
                self._go(ServerTrigger.RCPT_OK)
            else:
                self._count_error(reply)
        else:
            if reply.is_positive:  # errors are counted "without delivering mail", as Postfix's
                self.errors = 0  # smtpd_hard_error_limit: a sender of many messages keeps on
            self._end_transaction()

    def auth_challenge(self, challenge: bytes) -> None:
        """Send ``334 <base64>`` and wait for the client's response line (RFC 4954 §4)."""
        self._auth_answered()
        self._out.append(b"334 " + base64.b64encode(challenge) + b"\r\n")
        self._go(ServerTrigger.AUTH_CHALLENGE)

    def auth_finish(self, reply: Reply) -> None:
        """End the AUTH exchange: 235 marks the session authenticated."""
        self._auth_answered()
        self._send(reply)
        self._go(ServerTrigger.AUTH_END)
        if reply.code == 235:
            self.authenticated = True
        else:  # a 454 too (a lockout): pipelined, they were answered without end
            self._count_error(reply)

    def _auth_answered(self) -> None:
        if self._awaiting is not AuthStart and self._awaiting is not AuthResponse:
            raise EngineMisuse("no AUTH exchange in progress")
        self._awaiting = None

    def tls_started(self, features: ServerFeatures) -> None:
        """The handshake is done: start again from scratch (RFC 3207 §4.2)."""
        if self._reader.pending():
            raise EngineMisuse("input left in the buffer at the TLS switch")
        self._go(ServerTrigger.TLS_STARTED)
        self.features = features
        self.tls_active = True
        self.authenticated = False
        self.helo = None
        self._txn = _Transaction()

    def close(self, reply: Reply) -> None:
        """Queue a final reply (421 on time-out or shutdown) and close the session."""
        if self.state is ServerState.CLOSED:
            return
        self._awaiting = None
        self._pending.clear()
        self._send(reply)
        self._go(ServerTrigger.CLOSE)

    # -- internals -----------------------------------------------------------------------------

    def _count_error(self, reply: Reply) -> Event | None:
        self.errors += 1
        if self.errors >= self.features.max_errors:
            self.close(replies.TOO_MANY_ERRORS)
            return Closing()
        return None

    def _error(self, reply: Reply) -> Event | None:
        self._send(reply)
        return self._count_error(reply)

    def _refuse(self, command: Mail | Rcpt, reply: Reply) -> Event:
        """An error reply that the policy hears of (a limit): :class:`Refused`, then the
        :class:`Closing` that too many errors cause."""
        closing = self._error(reply)
        if closing is not None:
            self._pending.append(closing)
        return Refused(command, reply)

    def _end_transaction(self) -> None:
        self._txn = _Transaction()
        self._data = None
        self._bdat_discard = None
        self._go(ServerTrigger.MESSAGE_END)

    def _too_long(self) -> Event | None:
        if self.state is ServerState.AUTH:
            # RFC 4954 §4: the 5xx fails AUTH; the next line is a command again.
            self._go(ServerTrigger.AUTH_END)
            return self._error(replies.AUTH_LINE_TOO_LONG)
        head = self._reader.too_long_head
        if commands.is_bdat(head):
            self.close(replies.BDAT_UNREADABLE)  # a chunk without a size: see commands.parse
            return Closing()
        if head[:5].upper() == b"AUTH ":  # an initial response is part of the exchange
            return self._error(replies.AUTH_LINE_TOO_LONG)
        return self._error(replies.LINE_TOO_LONG)

    def _line(self, line: bytes) -> Event | None:
        if self.state is ServerState.AUTH:
            return self._auth_line(line)
        self.commands += 1
        if self.commands > self.features.max_commands:
            self.close(replies.TOO_MANY_COMMANDS)
            return Closing()
        try:
            cmd = commands.parse(line, smtputf8=self._txn.smtputf8)
        except CommandError as exc:
            if exc.fatal:
                self.close(exc.reply)
                return Closing()
            if (
                exc.reply is replies.NEED_SMTPUTF8
                and line[:4].upper() == b"RCPT"
                and not self._allows(ServerTrigger.RCPT_OK)
            ):
                return self._error(replies.BAD_SEQUENCE)  # a UTF-8 RCPT out of turn: 503
            return self._error(exc.reply)
        if isinstance(cmd, Hello):
            return self._hello(cmd)
        if isinstance(cmd, Mail):
            return self._mail(cmd)
        if isinstance(cmd, Rcpt):
            return self._rcpt(cmd)
        if isinstance(cmd, Bdat):
            return self._bdat(cmd)
        if isinstance(cmd, Auth):
            return self._auth(cmd)
        return self._simple(cmd)

    def _hello(self, cmd: Hello) -> Event:
        self._go(ServerTrigger.HELLO)
        self.helo = cmd.domain
        self._txn = _Transaction()
        self._data = None
        if cmd.extended:
            self._send(Reply(250, "", (self.features.hostname, *self._extensions())))
        else:
            self._send(Reply(250, "", (self.features.hostname,)))
        return HelloReceived(cmd.domain, cmd.extended)

    def _extensions(self) -> list[str]:
        f = self.features
        ext = [
            "PIPELINING",  # RFC 2920
            f"SIZE {f.size_limit}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "CHUNKING",  # RFC 3030
            "DSN",  # RFC 3461
        ]
        if f.starttls and not self.tls_active:
            ext.append("STARTTLS")  # RFC 3207
        if f.auth_mechanisms and not self.authenticated:
            ext.append("AUTH " + " ".join(f.auth_mechanisms))  # RFC 4954
        ext.append("HELP")
        return ext

    def _mail(self, cmd: Mail) -> Event | None:
        if not self._allows(ServerTrigger.MAIL_OK):
            return self._error(replies.BAD_SEQUENCE)
        params = cmd.params
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return self._error(replies.PARAM_SYNTAX)
                # RFC 1870 §6: refuse at MAIL a message declared larger than we accept.
                if int(value) > self.features.size_limit:
                    return self._refuse(cmd, replies.MESSAGE_TOO_BIG)
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return self._error(replies.PARAM_SYNTAX)
            elif key == "SMTPUTF8":
                if value is not None:
                    return self._error(replies.PARAM_SYNTAX)
            elif key == "RET":
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    return self._error(replies.PARAM_SYNTAX)
            elif key == "ENVID":
                if value is None or len(value) > 100 or not commands.valid_xtext(value):
                    return self._error(replies.PARAM_SYNTAX)
            elif key == "AUTH":
                # RFC 4954 §5: "AUTH=<>" or AUTH=xtext; as we do not trust other MTAs' claims,
                # it is checked for its syntax only, and ignored.
                if value is None or not commands.valid_xtext(value):  # "<>" is xtext too
                    return self._error(replies.PARAM_SYNTAX)
            else:
                return self._error(replies.PARAM_NOT_IMPLEMENTED)
        self._txn = _Transaction(mail=cmd, smtputf8=cmd.smtputf8)
        return MailFrom(cmd)

    def _rcpt(self, cmd: Rcpt) -> Event | None:
        if not self._allows(ServerTrigger.RCPT_OK):
            return self._error(replies.BAD_SEQUENCE)
        for key, value in cmd.params.items():
            if key == "NOTIFY":
                items = {v.upper() for v in (value or "").split(",")}
                if (
                    not items
                    or not items <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
                    or ("NEVER" in items and len(items) > 1)
                ):
                    return self._error(replies.PARAM_SYNTAX)
            elif key == "ORCPT":
                # RFC 3461 §4.2: addr-type ";" xtext (RFC 6533 lets a UTF-8 one through).
                atype, sep, addr = (value or "").partition(";")
                if (
                    not sep
                    or not _ATOM.fullmatch(atype)
                    or not addr
                    or len(value or "") > 500
                    or not commands.valid_orcpt_address(atype, addr)
                ):
                    return self._error(replies.PARAM_SYNTAX)
            else:
                return self._error(replies.PARAM_NOT_IMPLEMENTED)
        # RFC 5321 §4.5.3.1.8: 452 for recipients beyond our limit; the client sends them later.
        # One that goes on sending them, past RECIPIENT_OVERSHOOT in the session, makes each an
        # error (Postfix's smtpd_recipient_overshoot_limit): a reply and a log line apiece.
        if self._txn.rcpt_count >= self.features.max_recipients:
            self.overshoot += 1
            if self.overshoot > RECIPIENT_OVERSHOOT:
                return self._refuse(cmd, replies.TOO_MANY_RECIPIENTS)
            self._send(replies.TOO_MANY_RECIPIENTS)
            return Refused(cmd, replies.TOO_MANY_RECIPIENTS)
        return RcptTo(cmd)

    def _bdat(self, cmd: Bdat) -> Event | None:
        # RFC 3030 §2: the chunk's octets are read even when the command is refused.
        refusal: Reply | None = None
        if not self._allows(ServerTrigger.BDAT):
            refusal = (
                replies.NO_VALID_RECIPIENTS
                if self.state is ServerState.MAIL
                else replies.BAD_SEQUENCE
            )
        self._data = CountedReader(cmd.size)
        self._bdat_last = cmd.last
        self._bdat_discard = refusal
        if refusal is None:
            self._go(ServerTrigger.BDAT)
            if not self._txn.started:
                self._txn.started = True
                return DataStart()
        return None

    def _auth(self, cmd: Auth) -> Event | None:
        if self.authenticated or not self._allows(ServerTrigger.AUTH):
            return self._error(replies.BAD_SEQUENCE)
        if cmd.mechanism not in self.features.auth_mechanisms:
            # RFC 4954 §6: 538 for a mechanism that TLS would make available; 504 for one
            # that is never offered.
            if not self.features.auth_mechanisms and cmd.mechanism in sasl.MECHANISMS:
                return self._error(replies.ENCRYPTION_REQUIRED)
            return self._error(replies.AUTH_BAD_MECH)
        initial: bytes | None = None
        if cmd.initial is not None:
            if cmd.initial == "=":
                initial = b""  # RFC 4954 §4: "=" is an empty initial response.
            else:
                try:
                    initial = base64.b64decode(cmd.initial, validate=True)
                except ValueError:
                    return self._error(replies.AUTH_BAD_BASE64)
        self._go(ServerTrigger.AUTH)
        return AuthStart(cmd.mechanism, initial)

    def _auth_line(self, line: bytes) -> Event | None:
        if line.strip() == b"*":
            # RFC 4954 §4: the client cancels the exchange.
            self._go(ServerTrigger.AUTH_END)
            return self._error(replies.AUTH_CANCELLED)
        try:
            data = base64.b64decode(line.strip(), validate=True)
        except ValueError:
            self._go(ServerTrigger.AUTH_END)
            return self._error(replies.AUTH_BAD_BASE64)
        return AuthResponse(data)

    def _simple(self, cmd: Simple) -> Event | None:
        verb = cmd.verb
        if verb == "NOOP":
            self._send(replies.NOOP_OK)
        elif verb == "QUIT":
            reply = Reply(221, "2.0.0", (f"{self.features.hostname} closing connection",))
            self._send(reply)
            self._go(ServerTrigger.QUIT)
            return Closing(clean=True)
        elif verb == "RSET":
            self._go(ServerTrigger.RSET)
            self._txn = _Transaction()
            self._data = None
            self._send(replies.RESET_OK)
            return TransactionReset()
        elif verb == "HELP":
            self._send(replies.HELP)
        elif verb == "VRFY":
            # RFC 5321 §3.5.3: 252 rather than reveal which users exist.
            if not cmd.arg.strip():
                return self._error(replies.PARAM_SYNTAX)
            self._send(replies.VRFY_CANNOT)
        elif verb == "EXPN":
            self._send(replies.NOT_IMPLEMENTED)
        elif verb == "STARTTLS":
            return self._starttls()  # "STARTTLS foo" was refused by the parser (RFC 3207 §4)
        elif verb == "DATA":
            return self._data_command()
        return None

    def _starttls(self) -> Event | None:
        if not self.features.starttls or self.tls_active:
            return self._error(
                replies.NOT_IMPLEMENTED if not self.tls_active else replies.BAD_SEQUENCE
            )
        if not self._allows(ServerTrigger.STARTTLS):
            return self._error(replies.BAD_SEQUENCE)
        self._send(replies.READY_TLS)
        discarded = self._reader.discard()  # RFC 3207 §4.2 / CVE-2011-0411
        self._go(ServerTrigger.STARTTLS)
        return StartTLS(discarded)

    def _data_command(self) -> Event | None:
        if not self._allows(ServerTrigger.DATA):
            # RFC 5321 §3.3: no valid recipient -> 554 (or 503).
            if self.state is ServerState.MAIL:
                return self._error(replies.NO_VALID_RECIPIENTS)
            return self._error(replies.BAD_SEQUENCE)
        self._send(replies.START_DATA)
        self._go(ServerTrigger.DATA)
        self._data = DotReader()
        self._txn.started = True
        return DataStart()

    def _read_data(self) -> Event | NeedData | None:
        reader = self._data
        buf = self._reader.buf
        if isinstance(reader, DotReader):
            chunk = reader.read(buf)
            if chunk is None:
                return NEED_DATA
            txn = self._txn
            txn.bare = txn.bare or chunk.bare
            txn.nul = txn.nul or chunk.nul
            txn.size += len(chunk.data)
            if txn.size > self.features.size_limit:
                txn.too_big = True
            if not reader.done:
                return DataChunk(chunk.data) if chunk.data and not txn.too_big else None
            self._data = None
            if txn.too_big:
                return self._abort(replies.MESSAGE_TOO_BIG)
            if txn.bare or txn.nul:
                return self._abort(replies.BARE_LF_DATA if txn.bare else replies.NUL_IN_DATA)
            if chunk.data:
                self._pending.append(MessageEnd())
                return DataChunk(chunk.data)
            return MessageEnd()
        assert isinstance(reader, CountedReader)
        data = reader.read(buf)
        if data is None and not reader.done:
            return NEED_DATA
        txn = self._txn
        event: Event | None = None
        if data and self._bdat_discard is None:
            txn.size += len(data)
            txn.line_ends.feed(data)
            txn.tail = (txn.tail + data[-2:])[-2:]
            if txn.size > self.features.size_limit:
                txn.too_big = True
            elif not txn.too_big:
                event = DataChunk(data)
        if not reader.done:
            return event
        self._data = None
        end = self._bdat_end()
        if event is None:
            return end
        if end is not None:
            self._pending.insert(0, end)  # before what _bdat_end queued after it
        return event

    def _bdat_end(self) -> Event | None:
        if self._bdat_discard is not None:
            reply = self._bdat_discard
            self._bdat_discard = None
            closing = self._error(reply)
            if self.state is ServerState.MAIL:
                # RFC 3030 §2: after a refused BDAT "the transaction should be considered
                # failed": the chunks still in the pipeline get 503 (no RCPT may join it and
                # have them delivered), and the next MAIL starts afresh.
                self._go(ServerTrigger.RSET)
                self._txn = _Transaction()
                if closing is not None:
                    self._pending.append(closing)
                return TransactionReset()
            return closing
        txn = self._txn
        if not self._bdat_last:
            if txn.too_big:
                return self._abort(replies.MESSAGE_TOO_BIG)
            self._send(Reply(250, "2.0.0", (f"{txn.size} octets received",)))
            return None
        if txn.too_big:
            return self._abort(replies.MESSAGE_TOO_BIG)
        if txn.line_ends.finish():  # as DATA: RFC 5321 §2.3.8, and no smuggling onward
            return self._abort(replies.BARE_LF_DATA)
        if txn.line_ends.nul:  # RFC 5322 §2.1
            return self._abort(replies.NUL_IN_DATA)
        if txn.size and txn.tail != b"\r\n":
            # RFC 5321 §4.1.1.4: message data is lines, the last one ended by a CRLF (DATA's
            # terminator brings it); chunks need not end so (RFC 3030). The message gets it,
            # as in Postfix: else POP3 LIST counts 2 octets fewer than RETR sends (RFC 1939
            # §5), and a relay with DATA sends another message than the one stored.
            self._pending.append(MessageEnd())
            return DataChunk(b"\r\n")
        return MessageEnd()

    def _abort(self, reply: Reply) -> Event:
        self._send(reply)
        self._end_transaction()
        self._count_error(reply)
        return MessageAborted(reply)
