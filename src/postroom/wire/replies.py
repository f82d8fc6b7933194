"""SMTP replies: one :class:`Reply` type and the named replies postroom sends.

Every reply carries an enhanced status code (RFC 2034, RFC 3463) when it is not a greeting.
Shared by the server engine (which renders replies) and the client engine (which parses them).
Reply text is printable US-ASCII (RFC 5321 §4.2; RFC 1939 §3 for POP3): :func:`printable`
turns anything else (a non-ASCII or control character in text made at run time) into ``?``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: a three-digit code, an enhanced status (or ""), and one or more text lines.
    ``local`` marks a reply the SMTP client made up itself (a decision of ours, a lost
    connection), as opposed to one a server sent: a bounce must not blame a server for it."""

    code: int
    status: str
    lines: tuple[str, ...]
    local: bool = False

    @classmethod
    def make(cls, code: int, status: str, *lines: str) -> Reply:
        return cls(code, status, lines or ("",))

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def render(self) -> bytes:
        """The reply on the wire (RFC 5321 §4.2.1); multi-line replies use ``code-``."""
        cached = _RENDERED.get(self)
        if cached is not None:
            return cached
        out = self._render()
        if len(_RENDERED) < 1024:
            _RENDERED[self] = out
        return out

    def _render(self) -> bytes:
        prefix = f"{self.status} " if self.status else ""
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            # Enhanced codes go on every line of a multi-line reply (RFC 2034 §4), except EHLO's.
            out.append(f"{self.code}{sep}{prefix}{printable(line)}".rstrip() + "\r\n")
        return "".join(out).encode("ascii")

    def __str__(self) -> str:
        prefix = f"{self.status} " if self.status else ""
        return f"{self.code} {prefix}{self.text}"


_RENDERED: dict[Reply, bytes] = {}


def printable(text: str) -> str:
    """``text`` with every character outside printable US-ASCII (0x20-0x7E) replaced by ``?``:
    RFC 5321 §4.2 allows no other in a reply, and a CR or LF would split it in two."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text)


STATUS_CODE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")  # RFC 3463 §2: class.subject.detail


def parse_status(text: str) -> tuple[str, str]:
    """Split ``"5.1.1 user unknown"`` into (``"5.1.1"``, ``"user unknown"``); ("", text)
    unless it starts with a code as RFC 3463 §2 writes one (``45.1.1`` and ``5.1.1000``, sent
    by a peer, are none: a DSN could not carry them)."""
    head, _, rest = text.partition(" ")
    if STATUS_CODE.fullmatch(head):
        return head, rest
    return "", text


_REPLY_CODE = re.compile(r"^([2-5])\d\d(?:[ -]|$)")


def status_of(reply: str) -> str:
    """The enhanced status code of a reply kept as text (``550 5.1.1 no such user``, or
    without its reply code: ``4.4.7 delivery time expired``), or "" if it has none: only the
    code right after the reply code counts, and only if its class is the reply code's (RFC 3463
    §2), never digits further on (``550 host [10.4.5.6] blocked`` has none)."""
    text = reply.strip()
    code = _REPLY_CODE.match(text)
    if code:
        text = text[code.end() :]
    status, _ = parse_status(text)
    if status and code and status[0] != code.group(1):
        return ""
    return status


R = Reply.make

OK = R(250, "2.0.0", "OK")
SENDER_OK = R(250, "2.1.0", "Sender OK")
RECIPIENT_OK = R(250, "2.1.5", "Recipient OK")
RESET_OK = R(250, "2.0.0", "Reset OK")
NOOP_OK = R(250, "2.0.0", "OK")
START_DATA = Reply(354, "", ("End data with <CR><LF>.<CR><LF>",))
VRFY_CANNOT = R(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = R(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY")
READY_TLS = R(220, "2.0.0", "Ready to start TLS")
AUTH_OK = R(235, "2.7.0", "Authentication successful")

SHUTTING_DOWN = R(421, "4.3.2", "Service shutting down, closing connection")
TIMEOUT = R(421, "4.4.2", "Timeout, closing connection")
TOO_MANY_ERRORS = R(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = R(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_COMMANDS = R(421, "4.7.0", "Too many commands, closing connection")
BDAT_UNREADABLE = R(421, "4.5.4", "Syntax: BDAT size [LAST]; the chunk cannot be skipped, closing")
STORAGE_FULL = R(452, "4.3.1", "Insufficient system storage, try again later")
STORAGE_AWAY = R(452, "4.3.1", "Mail storage unavailable, try again later")  # PostgreSQL away
TOO_MANY_RECIPIENTS = R(452, "4.5.3", "Too many recipients")
LOCAL_ERROR = R(451, "4.3.0", "Local error in processing, try again later")
AUTH_THROTTLED = R(454, "4.7.0", "Too many failed logins, try again later")
AUTH_UNAVAILABLE = R(454, "4.7.0", "Temporary authentication failure")  # RFC 4954 §6

SYNTAX_ERROR = R(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = R(500, "5.5.2", "Line too long")  # RFC 5321 §4.5.3.1.4
AUTH_LINE_TOO_LONG = R(500, "5.5.6", "Authentication exchange line too long")  # RFC 4954 §6
BARE_LF_COMMAND = R(500, "5.5.2", "Bare CR or LF not allowed in commands")
PARAM_SYNTAX = R(501, "5.5.4", "Syntax error in parameters or arguments")
ADDRESS_SYNTAX = R(501, "5.1.3", "Bad address syntax")
SENDER_SYNTAX = R(501, "5.1.7", "Bad sender address syntax")  # RFC 3463: X.1.3 is a recipient's
NOT_IMPLEMENTED = R(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = R(503, "5.5.1", "Bad sequence of commands")
PARAM_NOT_IMPLEMENTED = R(555, "5.5.4", "Parameter not recognized or not implemented")
AUTH_REQUIRED = R(530, "5.7.0", "Authentication required")
ACCOUNT_GONE = R(530, "5.7.0", "Authentication required: the account or its password changed")
AUTH_FAILED = R(535, "5.7.8", "Authentication credentials invalid")
ENCRYPTION_REQUIRED = R(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_CANCELLED = R(501, "5.7.0", "Authentication cancelled")  # RFC 4954 §4; Postfix's code
AUTH_BAD_MECH = R(504, "5.5.4", "Unrecognized authentication type")
AUTH_BAD_BASE64 = R(501, "5.5.2", "Cannot decode base64 response")
# RFC 4954 §4: 501 for a response that cannot be decoded, and for one that is not a message
# of the mechanism (decoded, but not SASL: the text tells the two apart).
AUTH_MALFORMED = R(501, "5.5.2", "Malformed authentication response")
MUST_STARTTLS = R(530, "5.7.0", "Must issue a STARTTLS command first")
USER_UNKNOWN = R(550, "5.1.1", "Mailbox unavailable: no such user here")
USER_UNKNOWN_NOW = R(550, "5.1.1", "Mailbox unavailable: the account was removed")
# RFC 3463 X.4.6: aliases that only lead back to themselves (or nest too deep) name no mailbox.
ALIAS_LOOP = R(550, "5.4.6", "Alias loop or aliases nested too deep: no mailbox at this address")
RELAY_DENIED = R(554, "5.7.1", "Relay access denied")
SENDER_NOT_OWNED = R(553, "5.7.1", "Sender address not owned by authenticated user")
MESSAGE_TOO_BIG = R(552, "5.3.4", "Message size exceeds fixed maximum message size")
HEADERS_TOO_BIG = R(552, "5.3.4", "Header section too large")
BARE_LF_DATA = R(550, "5.5.2", "Message rejected: bare CR or LF in DATA (RFC 5321 section 2.3.8)")
# RFC 5322 §2.1 allows no NUL in a message; RFC 5321 §4.2.3: 554 "transaction failed" for a
# message refused as malformed at its end (not a policy 550); RFC 3463 X.6.0: a content error.
NUL_IN_DATA = R(554, "5.6.0", "Message rejected: NUL in message data (RFC 5322 section 2.1)")
NO_VALID_RECIPIENTS = R(554, "5.5.1", "No valid recipients")
NEED_SMTPUTF8 = R(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
TOO_MANY_HOPS = R(554, "5.4.6", "Too many Received headers: mail loop")
