"""SMTP command lines -> typed commands (RFC 5321 §4.1.1, with the ESMTP parameters we offer).

Pure: a decoded line goes in, a command dataclass or a :class:`CommandError` carrying the reply
comes out. Per-command length limits follow RFC 5321 §4.5.3.1.4 (512 octets) plus what each
advertised extension adds to MAIL/RCPT (RFC 1870 SIZE, RFC 3461 DSN, RFC 4954 AUTH=,
RFC 6531 SMTPUTF8) and RFC 4954 §4 for AUTH (12,288 octets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from postroom.address import Address, parse_path
from postroom.errors import AddressError
from postroom.wire import replies
from postroom.wire.replies import Reply

MAX_COMMAND = 512
# MAIL: SIZE (26) + BODY (16) + SMTPUTF8 (9) + RET (9) + ENVID (107) + AUTH= (500), rounded up.
MAX_MAIL = MAX_COMMAND + 700
# RCPT: NOTIFY (37) + ORCPT (507), rounded up.
MAX_RCPT = MAX_COMMAND + 600
MAX_AUTH = 12288
MAX_LINE = MAX_AUTH

_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
# RFC 6533 §3 utf-8-addr-unitext / -xtext: graphic ASCII but "+", "=" and "\\", UTF-8 past
# U+009F (no C1 controls), "\\x{HEX}" escapes, and (xtext's) "+XX".
_UNITEXT = re.compile(
    r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e\u00a0-\U0010ffff]|\\x\{[0-9A-Fa-f]{1,6}\}"
    r"|\+[0-9A-F]{2})+\Z"
)
_PARAM_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*\Z")


class CommandError(Exception):
    """The line is not a valid command; ``reply`` says why. ``fatal``: what follows the line
    cannot be told apart from commands (a BDAT without a readable size), so the session ends
    with the reply."""

    def __init__(self, reply: Reply, fatal: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class Hello:
    domain: str
    extended: bool


@dataclass(frozen=True, slots=True)
class Mail:
    sender: Address | None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.params


@dataclass(frozen=True, slots=True)
class Rcpt:
    recipient: Address
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Bdat:
    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class Auth:
    mechanism: str
    initial: str | None


@dataclass(frozen=True, slots=True)
class Simple:
    """A command without structured arguments: DATA RSET NOOP QUIT HELP VRFY EXPN STARTTLS."""

    verb: str
    arg: str


Command = Hello | Mail | Rcpt | Bdat | Auth | Simple

_SIMPLE_NO_ARG = {"DATA", "RSET", "QUIT", "STARTTLS"}
_SIMPLE_ANY_ARG = {"NOOP", "HELP", "VRFY", "EXPN"}
_UTF8_ARG = {"MAIL", "RCPT", "VRFY", "EXPN"}
_KNOWN = {"EHLO", "HELO", "MAIL", "RCPT", "BDAT", "AUTH", *_SIMPLE_NO_ARG, *_SIMPLE_ANY_ARG}


def _params(text: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    # Only SP separates parameters (RFC 5321 §4.1.2); other white space is part of a value.
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _PARAM_KEY.match(key) or (eq and not value):
            raise CommandError(replies.PARAM_SYNTAX)
        key = key.upper()
        if key in out:
            raise CommandError(replies.PARAM_SYNTAX)
        # The values are ASCII (RFC 1870, 6152, 3461, 4954; a superscript two is no digit for
        # int(), a long s no "s"), but for ORCPT's UTF-8 address (RFC 6533).
        if not value.isascii() and key != "ORCPT":
            raise CommandError(replies.PARAM_SYNTAX)
        out[key] = value if eq else None
    return out


_LIMITS = {"MAIL": MAX_MAIL, "RCPT": MAX_RCPT, "AUTH": MAX_AUTH}
_HELO_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}|\[[A-Za-z0-9.:-]{1,100}\]")


def _split_path(rest: str, bad: Reply = replies.ADDRESS_SYNTAX) -> tuple[str, str]:
    """Split ``<path> params`` (tolerating one space after the colon, as clients send); ``bad``
    is the reply for a path that does not parse."""
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        raise CommandError(bad)
    if '"' not in rest and "\\" not in rest:  # the common case: the first ">" closes the path
        end = rest.find(">")
        if end < 0:
            raise CommandError(bad)
        return rest[: end + 1], _after_path(rest[end + 1 :])
    # A quoted local part (RFC 5321 §4.1.2 Quoted-string, with quoted-pairs) may contain
    # ">": find the closing bracket outside quotes.
    in_quote = escaped = False
    for i, ch in enumerate(rest):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            return rest[: i + 1], _after_path(rest[i + 1 :])
    raise CommandError(bad)


def _after_path(tail: str) -> str:
    """The parameters after a path, which a SP must open (RFC 5321 §4.1.2)."""
    if tail and tail[0] != " ":
        raise CommandError(replies.PARAM_SYNTAX)
    return tail


def is_bdat(line: bytes) -> bool:
    """Does the line (or the start of one) hold a BDAT command?"""
    return line[:4].upper() == b"BDAT" and line[4:5] in (b"", b" ")


def parse(line: bytes, *, smtputf8: bool = False) -> Command:
    """Parse one command line (without CRLF). ``smtputf8``: MAIL asked for SMTPUTF8 (for RCPT).
    Any BDAT refused here is fatal: its chunk has no size to be read off by."""
    try:
        return _parse(line, smtputf8)
    except CommandError:
        if is_bdat(line):
            raise CommandError(replies.BDAT_UNREADABLE, fatal=True) from None
        raise


def _parse(line: bytes, smtputf8: bool) -> Command:
    if b"\r" in line or b"\n" in line:
        raise CommandError(replies.BARE_LF_COMMAND)
    if b"\0" in line:
        raise CommandError(replies.SYNTAX_ERROR)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        # RFC 5321 §4.2.4: 501 for a command we know with arguments we refuse, 500 otherwise.
        verb = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
        raise CommandError(
            replies.PARAM_SYNTAX if verb in _KNOWN and b" " in line else replies.SYNTAX_ERROR
        ) from None
    verb, _, rest = text.partition(" ")
    # Verbs are ASCII keywords (RFC 5321 §4.1.1; RFC 6531 widens only addresses and
    # headers): "MA\u0131L" upper-cases to "MAIL", and must not run as one.
    verb = verb.upper() if verb.isascii() else "?"
    limit = _LIMITS.get(verb, MAX_COMMAND)
    if len(line) + 2 > limit:
        # RFC 4954 §6: 5.5.6 for an authentication exchange line (the initial response's).
        raise CommandError(replies.AUTH_LINE_TOO_LONG if verb == "AUTH" else replies.LINE_TOO_LONG)
    if verb == "NOOP":
        return Simple(verb, "")  # RFC 5321 §4.1.1.9: a parameter SHOULD be ignored
    # UTF-8 is allowed in addresses (RFC 6531 §3.3) and in VRFY/EXPN strings (§3.7.4.2).
    if verb not in _UTF8_ARG and not text.isascii():
        # RFC 5321 §4.2.4: 501 for a command we know with arguments we refuse, 500 otherwise.
        raise CommandError(replies.PARAM_SYNTAX if verb in _KNOWN else replies.SYNTAX_ERROR)
    if verb in ("EHLO", "HELO"):
        domain = rest.strip(" ")
        # RFC 5321 §4.1.1.1: a Domain or an address literal. Checked loosely (underscores and
        # a trailing dot pass, as real clients send them) but strictly enough that the name,
        # copied into the Received header, cannot carry spaces, tabs, control characters,
        # comments or a ";" that would forge trace fields (RFC 5321 §4.4).
        if not _HELO_NAME.fullmatch(domain):
            raise CommandError(replies.PARAM_SYNTAX)
        return Hello(domain, verb == "EHLO")
    if verb == "MAIL":
        if rest[:5].upper() != "FROM:":
            raise CommandError(replies.PARAM_SYNTAX)
        # RFC 3463: a sender's bad syntax is X.1.7 (X.1.3 names a recipient's).
        path, tail = _split_path(rest[5:], replies.SENDER_SYNTAX)
        params = _params(tail)
        utf8 = "SMTPUTF8" in params
        if not utf8 and not text.isascii():
            raise CommandError(replies.NEED_SMTPUTF8)
        try:
            sender = parse_path(path, utf8=utf8, allow_null=True)
        except AddressError:
            raise CommandError(replies.SENDER_SYNTAX) from None
        return Mail(sender, params)
    if verb == "RCPT":
        if rest[:3].upper() != "TO:":
            raise CommandError(replies.PARAM_SYNTAX)
        path, tail = _split_path(rest[3:])
        if not smtputf8 and not text.isascii():
            raise CommandError(replies.NEED_SMTPUTF8)
        params = _params(tail)
        # RFC 5321 §4.1.1.3: <Postmaster> without a domain must be accepted.
        if path.lower() == "<postmaster>":
            return Rcpt(Address("postmaster", ""), params)
        try:
            rcpt = parse_path(path, utf8=smtputf8)
        except AddressError:
            raise CommandError(replies.ADDRESS_SYNTAX) from None
        assert rcpt is not None
        return Rcpt(rcpt, params)
    if verb == "BDAT":
        # RFC 3030 §2: a chunk's octets follow at once, so a BDAT that is refused still has
        # them read off (the engine does). Without a size to read by, the octets that follow
        # would be taken as commands (a message smuggled in a chunk): parse() makes every
        # refusal of a BDAT end the session.
        parts = rest.split()
        size = parts[0] if parts else ""
        if (
            len(parts) > 2
            or not (size.isascii() and size.isdigit())
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            raise CommandError(replies.PARAM_SYNTAX)
        return Bdat(int(size), len(parts) == 2)  # RFC 3030 §4: any run of digits
    if verb == "AUTH":
        parts = rest.split()
        if not parts or len(parts) > 2:
            raise CommandError(replies.PARAM_SYNTAX)
        return Auth(parts[0].upper(), parts[1] if len(parts) == 2 else None)
    if verb in _SIMPLE_NO_ARG:
        if rest.strip():
            raise CommandError(replies.PARAM_SYNTAX)
        return Simple(verb, "")
    if verb in _SIMPLE_ANY_ARG:
        return Simple(verb, rest)
    raise CommandError(replies.SYNTAX_ERROR)


def valid_xtext(value: str) -> bool:
    """RFC 3461 §4: xtext for ENVID and ORCPT."""
    return bool(_XTEXT.match(value))


def valid_orcpt_address(addr_type: str, value: str) -> bool:
    """An ORCPT's address: xtext (RFC 3461 §4.2), or for the "utf-8" type also the UTF-8
    forms of RFC 6533 §3 (which a server takes with SMTPUTF8 only)."""
    if value.isascii() and valid_xtext(value):
        return True
    return addr_type.lower() == "utf-8" and bool(_UNITEXT.match(value))
