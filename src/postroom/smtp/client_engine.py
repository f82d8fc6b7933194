"""Sans-I/O SMTP client engine for outbound delivery (RFC 5321; 1870, 2920, 3030, 3207, 3461, 6152,
6531).

Bytes from the server go in (:meth:`ClientEngine.receive_data`), bytes to write come out
(:meth:`ClientEngine.data_to_send`) and typed events say what happened (:meth:`next_event`):
:class:`StartTLS` (do the handshake, then call :meth:`tls_started`), :class:`Ready` (idle: hand over
a message or quit), :class:`EndOfData` (asked for: the message is written but for
its final dot; :meth:`end_data` sends it, :meth:`abort` gives up), :class:`MessageDone` (one result
per recipient) and :class:`Closed`. One session runs greeting -> EHLO (HELO if EHLO gets a 5xx) ->
STARTTLS and EHLO again -> transactions (MAIL, RCPT..., DATA, pipelined when offered) -> QUIT; a 421
at any point ends it. Replies reach the ``_on_*`` handlers through one queue of awaited replies, so
pipelined and lock-step sessions share the same code; every state change goes through the one table
:data:`TRANSITIONS`, which a test checks against this diagram::

    GREETING --GREETED--> EHLO
    EHLO --EHLO_REFUSED--> HELO
    EHLO|HELO --STARTTLS--> STARTTLS
    STARTTLS --TLS_GO--> TLS_HANDSHAKE
    TLS_HANDSHAKE --TLS_STARTED--> EHLO
    EHLO|HELO|STARTTLS|READY|TRANSACTION|RSET --IDLE--> READY
    READY --SEND--> TRANSACTION
    TRANSACTION --RSET--> RSET
    READY --QUIT--> QUIT
    GREETING|EHLO|HELO|STARTTLS|TLS_HANDSHAKE|READY|TRANSACTION|RSET|QUIT --CLOSE--> CLOSED

To a server that offers CHUNKING, a message of up to :data:`BDAT_MAX` octets goes as one
``BDAT n LAST`` chunk instead of DATA (RFC 3030 §2), which saves DATA's wait for its 354; with
PIPELINING the chunk goes in the same write as MAIL and the RCPTs (§4.2), so a message costs one
round trip. A larger message goes with DATA, which waits for the RCPT replies, so that a refused
recipient does not cost the whole body's transfer; so does a message whose end is held
(``hold_end`` of :meth:`ClientEngine.send_message`).

IDLE is "ready for a message" (after the greeting's EHLO, a refused opportunistic STARTTLS,
RSET, or the end of a transaction); CLOSE ends the session, cleanly after QUIT or on a failure.
RSET is sent only to close a transaction that did not end with the reply to the final dot
(which ends it by itself, RFC 5321 §4.1.1.4) or a 250 to BDAT LAST, so a reused connection
starts its next message at once; a connection the server dropped meanwhile shows in
:attr:`MessageDone.unanswered`.

The caller fits the data to the server first (``delivery/mime_downgrade.py``: short lines, 7-bit
without 8BITMIME); a message that needs SMTPUTF8 never goes to a server without it (5.6.7 for
an address, 5.6.9 for header fields: RFC 6531 §3.4, §3.5), nor an 8-bit octet to a server
without 8BITMIME (5.6.3). Security notes: replies are split by ``framing.LineReader`` with
bounded line length and line count; any byte that arrives between the 220 to STARTTLS and the
handshake ends the session (plaintext injection, the client-side twin of CVE-2011-0411); data is
normalised to CRLF and dot-stuffed by ``framing`` only, so a bare LF before a dot can never end
the message early at a lenient server (SMTP smuggling, RFC 5321 §2.3.8); a BDAT chunk is
counted, not stuffed, so it has no end marker to forge. An exception escaping this module is a
bug in the caller (``EngineMisuse``), never the peer's fault.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from postroom.errors import EngineMisuse
from postroom.wire.events import StartTLS
from postroom.wire.framing import TOO_LONG, LineReader, dot_stuff_parts, to_crlf
from postroom.wire.replies import Reply, parse_status

MAX_REPLY_LINE = 4096  # RFC 5321 §4.5.3.1.5 says 512; a longer line is cut here, not refused
# A reply of more lines is a peer that would hold a delivery slot and stream at us until the
# reply's time-out (a hostile-MX probe: 1.1 million lines in 120 s): the session fails.
MAX_REPLY_LINES = 1000
# Octets of one reply kept (the last line, which ends it, always): an EHLO of 300 short lines
# is kept whole (a recheck probe: cut at 200 lines, it lost the SMTPUTF8 at its end).
MAX_REPLY_KEPT = 1 << 16
_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$", re.DOTALL)
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*\Z")
# RFC 3461 §4: xtext (ENVID, ORCPT) is printable ASCII without "+" and "=" unless hex-escaped.
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_NOTIFY = ("NEVER", "SUCCESS", "FAILURE", "DELAY")
# RFC 6533 §3: QCHAR, what a utf-8-addr-xtext holds as it is; anything else is \x{HEX}.
_QCHAR = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")


def _utf8_addr_xtext(value: str) -> str:
    return "".join(c if _QCHAR.fullmatch(c) else f"\\x{{{ord(c):X}}}" for c in value)


# RFC 5321 §4.5.3.2: minimum time-outs for each reply the client waits for (seconds).
TIMEOUT_GREETING = 300.0
TIMEOUT_MAIL = 300.0
TIMEOUT_RCPT = 300.0
TIMEOUT_DATA_INIT = 120.0
TIMEOUT_DATA_END = 600.0
TIMEOUT_OTHER = 300.0
BDAT_MAX = 1 << 16  # larger messages use DATA (see the module docstring)


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


class TLSPolicy(enum.Enum):
    NONE = "none"  # never STARTTLS (a retry after a failed handshake)
    OPPORTUNISTIC = "opportunistic"  # RFC 7435: encrypt when offered, else plaintext
    REQUIRED = "required"  # no STARTTLS offered or refused -> temporary failure 4.7.5


class ClientState(enum.StrEnum):
    GREETING = "GREETING"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    TLS_HANDSHAKE = "TLS_HANDSHAKE"
    READY = "READY"
    TRANSACTION = "TRANSACTION"
    RSET = "RSET"
    QUIT = "QUIT"
    CLOSED = "CLOSED"


class ClientTrigger(enum.StrEnum):
    GREETED = "GREETED"
    EHLO_REFUSED = "EHLO_REFUSED"
    STARTTLS = "STARTTLS"
    TLS_GO = "TLS_GO"
    TLS_STARTED = "TLS_STARTED"
    IDLE = "IDLE"
    SEND = "SEND"
    RSET = "RSET"
    QUIT = "QUIT"
    CLOSE = "CLOSE"


_S, _T = ClientState, ClientTrigger
TRANSITIONS: Final[dict[ClientState, dict[ClientTrigger, ClientState]]] = {
    _S.GREETING: {_T.GREETED: _S.EHLO, _T.CLOSE: _S.CLOSED},
    _S.EHLO: {
        _T.EHLO_REFUSED: _S.HELO,
        _T.STARTTLS: _S.STARTTLS,
        _T.IDLE: _S.READY,
        _T.CLOSE: _S.CLOSED,
    },
    _S.HELO: {_T.STARTTLS: _S.STARTTLS, _T.IDLE: _S.READY, _T.CLOSE: _S.CLOSED},
    _S.STARTTLS: {_T.TLS_GO: _S.TLS_HANDSHAKE, _T.IDLE: _S.READY, _T.CLOSE: _S.CLOSED},
    _S.TLS_HANDSHAKE: {_T.TLS_STARTED: _S.EHLO, _T.CLOSE: _S.CLOSED},
    _S.READY: {
        _T.IDLE: _S.READY,
        _T.SEND: _S.TRANSACTION,
        _T.QUIT: _S.QUIT,
        _T.CLOSE: _S.CLOSED,
    },
    _S.TRANSACTION: {_T.IDLE: _S.READY, _T.RSET: _S.RSET, _T.CLOSE: _S.CLOSED},
    _S.RSET: {_T.IDLE: _S.READY, _T.CLOSE: _S.CLOSED},
    _S.QUIT: {_T.CLOSE: _S.CLOSED},
    _S.CLOSED: {},
}


@dataclass(frozen=True, slots=True)
class ForwardPath:
    """One forward-path. ``notify``/``orcpt`` are the RFC 3461 values as received (wire form)."""

    address: str
    notify: tuple[str, ...] | None = None  # ("NEVER",) or some of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None  # "rfc822;xtext" passed on unchanged (RFC 3461 §4.2)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """The envelope of one transaction. ``sender`` is "" for the null reverse-path."""

    sender: str
    recipients: tuple[ForwardPath, ...]
    smtputf8: bool = False  # the client that gave us the message asked for SMTPUTF8
    ret: str | None = None  # RFC 3461 RET: "FULL" or "HDRS"
    envid: str | None = None  # RFC 3461 ENVID in xtext, passed on unchanged (§4.4)


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """One recipient's result. ``missing`` names the extension this server lacks that the
    message needs ("SMTPUTF8", "8BITMIME"): refused by us before any command, it is this
    server's shortcoming, and another MX host of the domain may take the message."""

    recipient: ForwardPath
    outcome: Outcome
    reply: Reply
    missing: str | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """The session is idle: call send_message, reset or quit."""


@dataclass(frozen=True, slots=True)
class MessageDone:
    """Every recipient of the message has a result. ``dsn`` is whether the server offered DSN
    (without it, a NOTIFY=SUCCESS recipient is owed a "relayed" DSN, RFC 3461 §4.1).
    ``unanswered``: the session ended (closed, or 421) before the server answered MAIL, so no
    part of the message reached it and another connection may take it at once."""

    results: tuple[RecipientResult, ...]
    dsn: bool
    unanswered: bool = False


@dataclass(frozen=True, slots=True)
class EndOfData:
    """The message is written up to its final dot (``send_message(..., hold_end=True)``):
    :meth:`ClientEngine.end_data` sends it (the server then commits the message), or
    :meth:`ClientEngine.abort` ends the session without it."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The session is over; ``reply`` is the server's last word or the local reason."""

    reply: Reply
    clean: bool  # True after QUIT/221, False after a failure


Event = Ready | StartTLS | EndOfData | MessageDone | Closed


def _local(code: int, status: str, text: str) -> Reply:
    return Reply(code, status, (text,), local=True)


def _outcome(reply: Reply) -> Outcome:
    if 200 <= reply.code < 300:
        return Outcome.DELIVERED
    return Outcome.PERMANENT if reply.code >= 500 else Outcome.TEMPORARY


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) -> their parameters (RFC 5321 §4.1.1.1)."""
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if _KEYWORD.match(keyword):
            ext[keyword.upper()] = params.strip()
    return ext


def needs_smtputf8_headers(data: bytes) -> bool:
    """True if the header section holds non-ASCII octets (RFC 6532 internationalised headers)."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    return not head.isascii()


@dataclass
class _Delivery:
    message: OutgoingMessage
    data: bytes
    to_send: list[int]  # indexes of recipients actually sent in RCPT
    results: dict[int, RecipientResult] = field(default_factory=dict)
    mail_reply: Reply | None = None
    rcpt_replies: dict[int, Reply] = field(default_factory=dict)
    next_rcpt: int = 0  # lock-step mode: position in to_send of the next RCPT
    open: bool = False  # MAIL accepted and the transaction not ended by a DATA/BDAT reply
    hold_end: bool = False  # stop before the final dot (EndOfData) until end_data()
    end: bytes = b""  # the end-of-data line held back


_Handler = Callable[[Reply], None]


class ClientEngine:
    """One SMTP client session. See the module docstring for the flow and the events."""

    def __init__(
        self,
        helo_name: str,
        *,
        tls: TLSPolicy = TLSPolicy.OPPORTUNISTIC,
        max_line: int = MAX_REPLY_LINE,
    ) -> None:
        self.helo_name = helo_name
        self.tls_policy = tls
        self.state = ClientState.GREETING
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.secure = False
        # The server said 220 to STARTTLS (secure once the handshake is done).
        self.tls_begun = False
        # The greeting, or EHLO and HELO, answered with a refusal: no delivery here.
        self.refused_us = False
        self.greeting: Reply | None = None
        self._reader = LineReader(max_line)
        self._lines: list[bytes] = []
        self._kept = 0  # octets of the reply being read in _lines (past MAX_REPLY_KEPT: cut)
        self._count = 0  # lines of the reply being read
        self._out = bytearray()
        self._events: deque[Event] = deque()
        # Replies awaited, in order (RFC 2920 §3.2: replies come in command order).
        self._awaiting: deque[tuple[_Handler, float]] = deque()
        self._awaiting.append((self._on_greeting, TIMEOUT_GREETING))
        self.replies = 0  # complete replies read: each starts the :meth:`timeout` of the next
        self._txn: _Delivery | None = None

    # --- the table -------------------------------------------------------------------------------

    def _go(self, trigger: ClientTrigger) -> None:
        """Move along the table; a move it does not have is a bug in the caller."""
        try:
            self.state = TRANSITIONS[self.state][trigger]
        except KeyError:
            raise EngineMisuse(f"{trigger} in state {self.state}") from None

    def _require(self, trigger: ClientTrigger, what: str) -> None:
        if trigger not in TRANSITIONS[self.state]:
            raise EngineMisuse(f"{what} in state {self.state}")

    # --- I/O side -------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server."""
        if self.state is ClientState.CLOSED or not data:
            return
        if self.state is ClientState.TLS_HANDSHAKE:
            # Bytes between the 220 to STARTTLS and the handshake were not protected by TLS.
            self._fail(_local(421, "4.7.0", "server sent data before the TLS handshake"))
            return
        self._reader.feed(data)
        self._parse()

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def timeout(self) -> float | None:
        """How long to wait for the next reply (RFC 5321 §4.5.3.2), None when none is awaited:
        for the whole reply, counted from the last one (:attr:`replies`) or the command."""
        return (
            self._awaiting[0][1]
            if self._awaiting and self.state is not ClientState.CLOSED
            else None
        )

    def connection_lost(self, reason: str = "connection lost") -> None:
        """The transport closed or timed out; pending recipients fail temporarily."""
        if self.state is ClientState.CLOSED:
            return
        if self.state is ClientState.QUIT:
            self._close(_local(221, "2.0.0", "closed"), clean=True)
            return
        self._fail(_local(421, "4.4.2", reason))

    def tls_started(self) -> None:
        """The TLS handshake succeeded: forget everything learnt in plaintext, EHLO again."""
        self._require(ClientTrigger.TLS_STARTED, "tls_started")
        if self._reader.pending():  # pragma: no cover - receive_data already refuses this
            raise EngineMisuse("read buffer not empty at the TLS switch")
        self.secure = True
        self.extensions = {}  # RFC 3207 §4.2: discard knowledge obtained before TLS
        self._send_ehlo(ClientTrigger.TLS_STARTED)

    # --- the caller's commands ------------------------------------------------------------------

    def send_message(self, message: OutgoingMessage, data: bytes, hold_end: bool = False) -> None:
        """Start a transaction for ``message`` whose content (not stuffed) is ``data``. With
        ``hold_end`` the final dot waits for :meth:`end_data` (an :class:`EndOfData` event).

        ``data`` is sent as it is: the caller has already made it fit the server's extensions
        (RFC 6152 §3: 7-bit for a server without 8BITMIME; RFC 5321 §4.5.3.1.6: short lines).
        What cannot be converted is refused here, before a command is sent, with a reply of
        our own for the bounce: a non-ASCII address without SMTPUTF8 (5.6.7), a message that
        was given to us with SMTPUTF8 and has UTF-8 header fields without SMTPUTF8 (5.6.9;
        RFC 6531 §3.4, §3.5), and 8-bit octets left in header fields for a server without
        8BITMIME (5.6.3, RFC 6152 §3: convert or return it). 8-bit header fields of a message
        given to us *without* SMTPUTF8 go unchanged to a server with 8BITMIME: the sender did
        not ask for SMTPUTF8, and that is what other MTAs do with such legacy mail. These
        refusals name the extension (``RecipientResult.missing``): the caller may try another
        server. A message over the server's SIZE (5.3.4) names none.
        """
        self._require(ClientTrigger.SEND, "send_message")
        if not message.recipients:
            raise EngineMisuse("a message needs at least one recipient")
        data = to_crlf(data)
        results: dict[int, RecipientResult] = {}
        utf8_offered = "SMTPUTF8" in self.extensions
        no_utf8 = _local(
            553,
            "5.6.7",  # RFC 6531 §3.5: non-ASCII addresses not permitted
            "the server does not offer SMTPUTF8, which a non-ASCII address needs (RFC 6531)",
        )
        refused: Reply | None = None  # the whole message, for every recipient
        missing = "SMTPUTF8"  # the extension ``refused`` is for
        if not utf8_offered and not message.sender.isascii():
            refused = no_utf8
        for i, rcpt in enumerate(message.recipients):
            if refused is not None:
                results[i] = RecipientResult(rcpt, Outcome.PERMANENT, refused, missing)
            elif not utf8_offered and not rcpt.address.isascii():
                results[i] = RecipientResult(rcpt, Outcome.PERMANENT, no_utf8, missing)
        # Then what the message itself cannot pass, for the recipients left: the addresses
        # first, as a lone non-ASCII recipient is also named in our Received field ("for").
        # The caller converted the body for a server without 8BITMIME: 8-bit octets left are
        # in header fields (of the message, or of one inside it).
        if len(results) < len(message.recipients):
            if not utf8_offered and message.smtputf8 and needs_smtputf8_headers(data):
                refused = _local(
                    554,
                    "5.6.9",  # RFC 6531 §3.5: UTF-8 header message cannot be transferred
                    "the message has UTF-8 header fields (RFC 6532) and the server does not"
                    " offer SMTPUTF8, which they need (RFC 6531)",
                )
            elif "8BITMIME" not in self.extensions and not data.isascii():
                missing = "8BITMIME"
                refused = _local(
                    554,
                    "5.6.3",  # RFC 3463: conversion required but not supported
                    "the message has 8-bit header fields (or 8-bit parts nested too deep or of a"
                    " message type, which takes no encoding), which cannot be converted to"
                    " 7-bit, and the server does not offer 8BITMIME (RFC 6152)",
                )
            if refused is not None:
                for i, rcpt in enumerate(message.recipients):
                    refusal = RecipientResult(rcpt, Outcome.PERMANENT, refused, missing)
                    results.setdefault(i, refusal)
        limit = self._size_limit()
        if limit and len(data) > limit:
            # RFC 1870 §6: do not send what the server has announced it will refuse.
            too_big = _local(
                552,
                "5.3.4",
                f"the message ({len(data)} octets) is larger than the server accepts"
                f" (SIZE {limit}, RFC 1870)",
            )
            for i, rcpt in enumerate(message.recipients):
                results.setdefault(i, RecipientResult(rcpt, Outcome.PERMANENT, too_big))
        to_send = [i for i in range(len(message.recipients)) if i not in results]
        txn = _Delivery(message, data, to_send, results, hold_end=hold_end)
        if not to_send:
            self._finish(txn)
            self._ready()
            return
        self._txn = txn
        self._go(ClientTrigger.SEND)
        self._command(self._mail_command(txn), self._on_mail, TIMEOUT_MAIL)
        if "PIPELINING" in self.extensions:
            # RFC 2920 §3.1: MAIL, every RCPT and DATA go in one write; replies are read in order.
            for k in range(len(to_send)):
                self._command(self._rcpt_command(txn, k), self._on_rcpt, TIMEOUT_RCPT)
            txn.next_rcpt = len(to_send)
            self._send_content(txn)

    def end_data(self) -> None:
        """After :class:`EndOfData`: send the final dot; the server's reply ends the message."""
        if self.state is ClientState.CLOSED:
            return  # the connection was lost meanwhile: MessageDone and Closed are queued
        txn = self._txn
        if txn is None or not txn.end or self.state is not ClientState.TRANSACTION:
            raise EngineMisuse(f"end_data in state {self.state} without EndOfData")
        self._out += txn.end
        txn.end = b""
        self._awaiting.append((self._on_data_end, TIMEOUT_DATA_END))

    def abort(self, reason: Reply) -> None:
        """End the session now, sending nothing more: an open transaction's recipients fail
        with ``reason`` (temporary). After :class:`EndOfData` the caller closes the connection
        without the final dot, and the server cancels the transaction (RFC 5321 §3.8)."""
        if self.state is not ClientState.CLOSED:
            self._fail(reason)

    def quit(self) -> None:
        """Say QUIT; a Closed event follows (also if the server just closes)."""
        if self.state is ClientState.CLOSED:
            return
        self._go(ClientTrigger.QUIT)
        self._command(b"QUIT", self._on_quit, TIMEOUT_OTHER)

    # --- replies ---------------------------------------------------------------------------------

    def _parse(self) -> None:
        while self.state not in (ClientState.CLOSED, ClientState.TLS_HANDSHAKE):
            line = self._reader.read_line()
            if line is None:
                return  # (a line over the limit is dropped as it comes: memory stays bounded)
            if line is TOO_LONG:
                # RFC 5321 §4.5.3.1.5 allows 512 octets; a longer line is cut, not a failure:
                # its code is what counts, and a 250 to the final dot taken for an error sent
                # the message again. What never ends runs into the reply's time-out.
                line = self._reader.too_long_head
            assert isinstance(line, bytes)
            m = _REPLY_LINE.match(line) or (
                _REPLY_LINE.match(line + b" ") if len(line) == 3 else None
            )
            if m is None or (self._lines and m.group(1) != self._lines[0][:3]):
                shown = line[:60].decode("ascii", "replace")
                self._fail(_local(421, "4.5.0", f"protocol error: bad reply line {shown!r}"))
                return
            self._count += 1
            if self._count > MAX_REPLY_LINES:
                self._fail(
                    _local(421, "4.5.0", f"protocol error: reply over {MAX_REPLY_LINES} lines")
                )
                return
            if self._kept + len(line) <= MAX_REPLY_KEPT:
                self._lines.append(line)
                self._kept += len(line)
            elif self._kept <= MAX_REPLY_KEPT:  # the first line past the limit
                self._lines.append(line)
                self._kept = MAX_REPLY_KEPT + 1
            else:  # (lines past the limit are dropped; the last one, which ends it, is kept)
                self._lines[-1] = line
            if m.group(2) == b" ":
                reply = self._make_reply(self._lines)
                self._lines = []
                self._kept = self._count = 0
                self._dispatch(reply)

    @staticmethod
    def _make_reply(lines: Sequence[bytes]) -> Reply:
        code = int(lines[0][:3])
        texts = [ln[4:].decode("utf-8", "replace") for ln in lines]
        status, first = parse_status(texts[0])
        if status and status[0] != str(code)[0]:
            status = ""  # RFC 3463 §2: the class must match the reply code; ignore a mismatch
        if status:
            texts[0] = first
            for i in range(1, len(texts)):
                head, rest = parse_status(texts[i])
                if head == status:
                    texts[i] = rest
        return Reply(code, status, tuple(texts))

    def _dispatch(self, reply: Reply) -> None:
        if not self._awaiting:
            self._fail(_local(421, "4.5.0", f"protocol error: unexpected reply {reply}"))
            return
        handler, _ = self._awaiting.popleft()
        self.replies += 1
        if reply.code == 421 and handler not in (self._on_quit, self._on_greeting):
            # RFC 5321 §3.8: the server is closing; everything still open fails temporarily.
            self._fail(reply)
            return
        handler(reply)

    # --- session setup --------------------------------------------------------------------------

    def _on_greeting(self, reply: Reply) -> None:
        self.greeting = reply
        if reply.code != 220:
            # RFC 5321 §3.1: a 554 (or 421) greeting: do not try to deliver here.
            self.refused_us = True
            if reply.code != 421:
                self._out += b"QUIT\r\n"
            self._close(reply, clean=False)
            return
        self._send_ehlo(ClientTrigger.GREETED)

    def _send_ehlo(self, trigger: ClientTrigger) -> None:
        self._go(trigger)
        self._command(b"EHLO " + self.helo_name.encode("ascii"), self._on_ehlo, TIMEOUT_OTHER)

    def _on_ehlo(self, reply: Reply) -> None:
        if reply.code == 250:
            self.esmtp = True
            self.extensions = parse_ehlo(reply)
            self._after_hello()
        elif reply.code >= 500 and not self.secure:
            # RFC 5321 §3.2: a server that does not know EHLO; fall back to HELO.
            self._go(ClientTrigger.EHLO_REFUSED)
            self._command(b"HELO " + self.helo_name.encode("ascii"), self._on_helo, TIMEOUT_OTHER)
        else:
            self.refused_us = True
            self._quit_and_close(reply)

    def _on_helo(self, reply: Reply) -> None:
        if reply.code != 250:
            self.refused_us = True
            self._quit_and_close(reply)
            return
        self.esmtp = False
        self.extensions = {}
        self._after_hello()

    def _after_hello(self) -> None:
        if not self.secure and self.tls_policy is not TLSPolicy.NONE:
            if "STARTTLS" in self.extensions:
                self._go(ClientTrigger.STARTTLS)
                self._command(b"STARTTLS", self._on_starttls, TIMEOUT_OTHER)
                return
            if self.tls_policy is TLSPolicy.REQUIRED:
                self._quit_and_close(_local(451, "4.7.5", "TLS required but not offered"))
                return
        self._ready()

    def _on_starttls(self, reply: Reply) -> None:
        if reply.code == 220:
            self.tls_begun = True
            self._go(ClientTrigger.TLS_GO)
            if self._reader.pending():
                self._fail(_local(421, "4.7.0", "server sent data before the TLS handshake"))
                return
            self._events.append(StartTLS())
        elif self.tls_policy is TLSPolicy.REQUIRED:
            self._quit_and_close(reply)
        else:
            self._ready()  # opportunistic: carry on in plaintext

    def _ready(self) -> None:
        self._go(ClientTrigger.IDLE)
        self._events.append(Ready())

    def _on_rset(self, reply: Reply) -> None:
        if reply.code == 250:
            self._ready()
        else:
            self._quit_and_close(reply)

    def _on_quit(self, reply: Reply) -> None:
        self._close(reply, clean=True)

    # --- the transaction ------------------------------------------------------------------------

    def _size_limit(self) -> int:
        size = self.extensions.get("SIZE", "")
        return int(size) if size.isdigit() else 0

    def _mail_command(self, txn: _Delivery) -> bytes:
        msg = txn.message
        parts = [f"MAIL FROM:<{msg.sender}>"]
        if "SIZE" in self.extensions:
            parts.append(f"SIZE={len(txn.data)}")  # RFC 1870 §6
        if not txn.data.isascii() and "8BITMIME" in self.extensions:
            parts.append("BODY=8BITMIME")  # RFC 6152 §2
        if "SMTPUTF8" in self.extensions and self._needs_utf8(txn):
            parts.append("SMTPUTF8")  # RFC 6531 §3.4
        if "DSN" in self.extensions:
            if msg.ret and msg.ret.upper() in ("FULL", "HDRS"):
                parts.append(f"RET={msg.ret.upper()}")
            if msg.envid and _XTEXT.match(msg.envid) and len(msg.envid) <= 100:
                parts.append(f"ENVID={msg.envid}")  # RFC 3461 §4.4
        return " ".join(parts).encode("utf-8")

    def _needs_utf8(self, txn: _Delivery) -> bool:
        msg = txn.message
        if not msg.sender.isascii() or any(not r.address.isascii() for r in msg.recipients):
            return True
        return msg.smtputf8 and needs_smtputf8_headers(txn.data)

    def _rcpt_command(self, txn: _Delivery, k: int) -> bytes:
        rcpt = txn.message.recipients[txn.to_send[k]]
        parts = [f"RCPT TO:<{rcpt.address}>"]
        if "DSN" in self.extensions:
            notify = [n.upper() for n in rcpt.notify or () if n.upper() in _NOTIFY]
            if notify:
                parts.append(f"NOTIFY={','.join(notify)}")  # RFC 3461 §4.1
            if rcpt.orcpt and ";" in rcpt.orcpt and len(rcpt.orcpt) <= 500:
                kind, _, value = rcpt.orcpt.partition(";")
                if _KEYWORD.match(kind) and _XTEXT.match(value):
                    parts.append(f"ORCPT={rcpt.orcpt}")  # RFC 3461 §4.2, unchanged
                elif kind.lower() == "utf-8" and value.isprintable() and " " not in value:
                    # RFC 6533 §3: a utf-8-addr-unitext goes as it is in an SMTPUTF8
                    # transaction, else as utf-8-addr-xtext (it was dropped).
                    utf8 = "SMTPUTF8" in self.extensions and self._needs_utf8(txn)
                    parts.append(f"ORCPT={kind};{value if utf8 else _utf8_addr_xtext(value)}")
        return " ".join(parts).encode("utf-8")

    def _on_mail(self, reply: Reply) -> None:
        txn = self._require_txn()
        txn.mail_reply = reply
        if reply.code != 250:
            if not txn.next_rcpt:  # lock-step: nothing else was sent
                self._end_txn(txn)
            return  # pipelined: the RCPT and DATA (or BDAT) replies still come and end it
        txn.open = True
        if not txn.next_rcpt:
            self._command(self._rcpt_command(txn, 0), self._on_rcpt, TIMEOUT_RCPT)
            txn.next_rcpt = 1

    def _on_rcpt(self, reply: Reply) -> None:
        txn = self._require_txn()
        k = len(txn.rcpt_replies)
        txn.rcpt_replies[txn.to_send[k]] = reply
        pipelined = "PIPELINING" in self.extensions
        if pipelined or k + 1 < txn.next_rcpt:
            return
        if txn.next_rcpt < len(txn.to_send):
            self._command(self._rcpt_command(txn, txn.next_rcpt), self._on_rcpt, TIMEOUT_RCPT)
            txn.next_rcpt += 1
        elif self._accepted(txn):
            self._send_content(txn)
        else:
            self._end_txn(txn)

    def _send_content(self, txn: _Delivery) -> None:
        """DATA, or the whole message as one BDAT LAST chunk (see the module docstring)."""
        if "CHUNKING" in self.extensions and not txn.hold_end and len(txn.data) <= BDAT_MAX:
            # RFC 3030 §4.2: BDAT may be pipelined; the server reads and discards the chunk
            # even if it refuses the command (no valid recipient, say).
            self._out += b"BDAT %d LAST\r\n" % len(txn.data) + txn.data
            self._awaiting.append((self._on_bdat_last, TIMEOUT_DATA_END))
        else:
            self._command(b"DATA", self._on_data, TIMEOUT_DATA_INIT)

    def _accepted(self, txn: _Delivery) -> list[int]:
        if txn.mail_reply is None or txn.mail_reply.code != 250:
            return []
        return [i for i, r in txn.rcpt_replies.items() if 200 <= r.code < 300]

    def _on_data(self, reply: Reply) -> None:
        txn = self._require_txn()
        if reply.code == 354:
            if not self._accepted(txn):
                # RFC 2920 §3.1: DATA was accepted though no recipient was: send an empty body.
                self._out += b".\r\n"
                self._awaiting.append((self._on_empty_data_end, TIMEOUT_DATA_END))
                return
            body, end = dot_stuff_parts(txn.data)
            self._out += body
            if txn.hold_end:  # the final dot waits for end_data() (or abort())
                txn.end = end
                self._events.append(EndOfData())
            else:
                self._out += end
                self._awaiting.append((self._on_data_end, TIMEOUT_DATA_END))
            return
        if reply.is_positive:
            # RFC 5321 §4.3.2: DATA gets 354 or a failure. Any other positive reply means
            # nothing was sent, so it must never count as a delivery: a protocol error.
            self._fail(_local(421, "4.5.0", f"protocol error: {reply} in reply to DATA"))
            return
        self._end_with(txn, reply)

    def _on_data_end(self, reply: Reply) -> None:
        txn = self._require_txn()
        txn.open = False  # RFC 5321 §4.1.1.4: the reply to end-of-data ends the transaction
        self._end_with(txn, reply)

    def _on_bdat_last(self, reply: Reply) -> None:
        txn = self._require_txn()
        if 300 <= reply.code < 400:  # BDAT gets 250 or a failure (RFC 3030 §2), never a 3xx
            self._fail(_local(421, "4.5.0", f"protocol error: {reply} in reply to BDAT"))
            return
        if reply.is_positive:
            txn.open = False  # the message is taken: the transaction is over
        # A refused chunk may leave the transaction open (RFC 3030 §2 does not say): RSET follows.
        self._end_with(txn, reply)

    def _end_with(self, txn: _Delivery, reply: Reply) -> None:
        """The reply to DATA or to the message decides for every accepted recipient."""
        for i in self._accepted(txn):
            txn.results[i] = RecipientResult(txn.message.recipients[i], _outcome(reply), reply)
        self._end_txn(txn)

    def _on_empty_data_end(self, reply: Reply) -> None:
        txn = self._require_txn()
        txn.open = False
        self._end_txn(txn)

    def _end_txn(self, txn: _Delivery) -> None:
        """Results for everyone not yet decided, then RSET if a transaction is still open."""
        self._finish(txn)
        self._txn = None
        if txn.open:
            self._go(ClientTrigger.RSET)
            self._command(b"RSET", self._on_rset, TIMEOUT_OTHER)
        else:
            self._ready()

    def _finish(self, txn: _Delivery) -> None:
        mail = txn.mail_reply
        for i, rcpt in enumerate(txn.message.recipients):
            if i in txn.results:
                continue
            outcome = None
            if mail is not None and mail.code != 250:
                reply = mail  # RFC 2920 §3.1: RCPT replies after a failed MAIL mean nothing
            else:
                reply = txn.rcpt_replies.get(i) or _local(451, "4.3.0", "no reply received")
                if reply.code == 552:
                    # RFC 5321 §4.5.3.1.10: 552 to RCPT is "too many recipients", which
                    # clients SHOULD treat as temporary: the rest go in a later transaction.
                    outcome = Outcome.TEMPORARY
            if 200 <= reply.code < 300:  # accepted at RCPT but no DATA result: cannot happen
                reply = _local(451, "4.3.0", "transaction ended without a DATA reply")
            if 300 <= reply.code < 400:
                reply = _local(451, "4.5.0", f"unexpected reply {reply}")
            txn.results[i] = RecipientResult(rcpt, outcome or _outcome(reply), reply)
        ordered = tuple(txn.results[i] for i in range(len(txn.message.recipients)))
        # (A 421 to MAIL goes to _fail, never to _on_mail; nothing to send means nothing sent.)
        unanswered = bool(txn.to_send) and txn.mail_reply is None
        self._events.append(MessageDone(ordered, "DSN" in self.extensions, unanswered))

    def _require_txn(self) -> _Delivery:
        if self._txn is None:  # pragma: no cover - the awaited-reply queue prevents this
            raise EngineMisuse("no transaction")
        return self._txn

    # --- plumbing -------------------------------------------------------------------------------

    def _command(self, line: bytes, handler: _Handler, timeout: float) -> None:
        self._out += line + b"\r\n"
        self._awaiting.append((handler, timeout))

    def _quit_and_close(self, reply: Reply) -> None:
        self._out += b"QUIT\r\n"
        self._close(reply, clean=False)

    def _fail(self, reply: Reply) -> None:
        """The session ends abnormally: results for an open transaction, then Closed."""
        if reply.is_positive:  # a local reason must never look like success
            reply = _local(421, "4.4.2", reply.text)
        txn = self._txn
        if txn is not None:
            self._txn = None
            temp = reply if reply.code < 500 else _local(421, "4.4.2", reply.text)
            mail_failed = txn.mail_reply is not None and txn.mail_reply.code != 250
            for i, rcpt in enumerate(txn.message.recipients):
                if i in txn.results or mail_failed:
                    continue
                earlier = txn.rcpt_replies.get(i)
                if earlier is None or 200 <= earlier.code < 400:
                    # Accepted or not yet answered: not delivered, so try again later.
                    txn.results[i] = RecipientResult(rcpt, Outcome.TEMPORARY, temp)
            self._finish(txn)  # refused recipients keep their RCPT (or MAIL) reply
        self._close(reply, clean=False)

    def _close(self, reply: Reply, *, clean: bool) -> None:
        self._go(ClientTrigger.CLOSE)
        self._awaiting.clear()
        self._reader.discard()
        self._events.append(Closed(reply, clean))
