"""Mailbox addresses and SMTP paths (RFC 5321 §4.1.2, RFC 6531 for UTF-8), parsed strictly.

Network input never becomes a file name until it has passed through here: :func:`parse_path`
turns the text between ``<`` and ``>`` into an :class:`Address`, and :func:`mailbox_key`
gives the lower-cased, IDNA-encoded form used for account lookup and Maildir paths.
Written by hand because the stdlib ``email.utils`` parses RFC 5322 header syntax, which is looser
than (and different from) the RFC 5321 envelope grammar, and accepts things an MTA must refuse.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass

import idna
from precis_i18n import get_profile

from postroom.errors import AddressError

# RFC 5321 §4.5.3.1.1-3: size limits of the parts.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
_USERNAME = get_profile("UsernameCasePreserved")  # RFC 8265 §3.3: see _identifier

# RFC 5321 §4.1.2 atext (RFC 5322 §3.2.3); with SMTPUTF8 non-ASCII UTF-8 too (what UTF-8 can
# encode: no surrogates, which the CLI's surrogateescape argv may hold), but no C1 control
# and no line or paragraph separator (RFC 5198 §2; an i18n probe saw NEL reach Return-Path).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8 = r"\u00a0-\u2027\u202a-\ud7ff\ue000-\U0010ffff"
_DOT_STRING = re.compile(rf"^[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"^[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*\Z")
# qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is "\" %d32-126.
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(rf'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
# Local parts that may name a mailbox directory: a dot-atom without "/" and not starting with ".".
_SAFE_LOCAL = re.compile(
    rf"^[a-z0-9!#$%&'*+\-=?^_`{{|}}~{_UTF8}]"
    rf"[a-z0-9!#$%&'*+\-=?^_`{{|}}~.{_UTF8}]*\Z"
)


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox: ``local`` exactly as given (case kept, RFC 5321 §2.4), ``domain`` normalised."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """``local@domain`` as accounts and Maildirs are stored under it (see local_key)."""
        return f"{local_key(self.local)}@{self.domain}"


def local_key(local: str) -> str:
    """A local part as accounts are keyed: lower-cased, and a UTF-8 one in Unicode NFC (RFC
    6532 §3.1, RFC 6530 §10.1), so that ``jürgen`` typed precomposed or decomposed is one
    mailbox, not two that look alike."""
    if local.isascii():
        return local.lower()
    return unicodedata.normalize("NFC", local).lower()


def normalise_domain(name: str) -> str:
    """Lower-case and IDNA-encode a domain (``Bücher.Example`` -> ``xn--bcher-kva.example``)."""
    name = name.strip().rstrip(".")
    if not name:
        raise ValueError("empty domain")
    if name.startswith("[") and name.endswith("]"):
        return _address_literal(name)
    if display_form(name):
        raise ValueError(f"bad domain {name!r}: not a U-label")
    try:
        ascii_name = name.lower() if name.isascii() else idna.encode(name, uts46=True).decode()
    except idna.IDNAError as exc:
        raise ValueError(f"bad domain {name!r}: {exc}") from None
    ascii_name = ascii_name.lower()
    if len(ascii_name) > MAX_DOMAIN:
        raise ValueError("domain too long")
    labels = ascii_name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"bad domain {name!r}")
    return ascii_name


def display_form(name: str) -> bool:
    """Whether the domain ``name`` is a spelling a display may take rather than U-labels (RFC
    5890 §2.3.2.1, RFC 6531 §3.3): fullwidth letters, ideographic full stops, ligatures and
    other compatibility forms, which UTS 46 maps to a name. Case and canonical equivalence
    (NFC, NFD) are the same name, and so is the Thai and Lao AM, which keyboards type."""
    if name.isascii():
        return False
    text = unicodedata.normalize("NFC", name.lower())
    return any(
        ch in "\u3002\uff0e\uff61"
        or (ch not in "\u0e33\u0eb3" and unicodedata.normalize("NFKC", ch) != ch)
        for ch in text
        if not ch.isascii()
    )


def domain_of(address: str) -> str:
    """The domain of ``address`` (one the parser took) as local domains are compared:
    lower-cased, but an address literal as :func:`normalise_domain` writes it (its tag
    ``IPv6:``; lower-cased, an IPv6 literal in ``domains`` was sent out, never stored)."""
    domain = address.rpartition("@")[2]
    return domain if domain.startswith("[") else domain.lower()


def _address_literal(text: str) -> str:
    """RFC 5321 §4.1.3 address literals: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``."""
    inner = text[1:-1]
    try:
        if "%" in inner:  # a zone ID names an interface of the sender's host: not in §4.1.3
            raise ValueError
        if inner[:5].lower() == "ipv6:":
            ip = ipaddress.IPv6Address(inner[5:])
            # RFC 5952 §5: an IPv4-mapped address keeps its dotted quad (::ffff:192.0.2.1)
            return f"[IPv6:{f'::ffff:{ip.ipv4_mapped}' if ip.ipv4_mapped else ip.compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise ValueError(f"bad address literal {text!r}") from None


def parse_mailbox(text: str, *, utf8: bool = False, local_limit: bool = True) -> Address:
    """Parse ``local@domain`` (no angle brackets). ``local_limit``: refuse a local part over
    64 octets (RFC 5321 §4.5.3.1.1), as an account name must not be."""
    at = text.rfind("@")
    if at <= 0 or at == len(text) - 1:
        raise AddressError(f"not an address: {text!r}")
    local, domain = text[:at], text[at + 1 :]
    if not utf8 and not text.isascii():
        raise AddressError("non-ASCII address needs SMTPUTF8")
    dot, quoted = (_DOT_STRING_UTF8, _QUOTED_UTF8) if utf8 else (_DOT_STRING, _QUOTED)
    if not (dot.match(local) or quoted.match(local)):
        raise AddressError(f"bad local part {local!r}")
    # Measured in NFC, the form accounts are keyed by (local_key): a decomposed spelling of
    # a name that fits is the same account, and logs in (an i18n probe: refused over 64).
    if local_limit and len(unicodedata.normalize("NFC", local).encode()) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    # RFC 5321 §4.1.2: a Domain has no white space or control characters, and no empty label
    # (one trailing dot, the root, is tolerated as most MTAs do); normalise_domain, made for
    # config files, would strip them.
    if not domain.isprintable() or any(c.isspace() for c in domain) or ".." in domain:
        raise AddressError(f"bad domain {domain!r}")
    try:
        domain = normalise_domain(domain)
    except ValueError as exc:
        raise AddressError(str(exc)) from None
    if local.startswith('"'):
        local = _simplify_quoted(local)
    return Address(local, domain)


def _simplify_quoted(local: str) -> str:
    """``"john"`` and ``john`` are the same mailbox (RFC 5321 §4.1.2): drop needless quotes."""
    inner = re.sub(r"\\(.)", r"\1", local[1:-1])
    if _DOT_STRING_UTF8.match(inner):
        return inner
    return local


def parse_path(text: str, *, utf8: bool = False, allow_null: bool = False) -> Address | None:
    """Parse an RFC 5321 Reverse-path / Forward-path including the angle brackets.

    Returns None for the null path ``<>`` when ``allow_null``. A source route
    (``<@a,@b:user@c>``) is accepted and ignored, as RFC 5321 §4.1.2 and Appendix C require.
    """
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    # RFC 5321 §4.5.3.1.3: 256 octets "including the punctuation", the brackets too.
    if len(text.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise AddressError(f"path longer than {MAX_PATH} octets")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return None
        raise AddressError("null path not allowed here")
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("bad source route")
        inner = inner[colon + 1 :]
    # RFC 5321 §4.5.3.1: limits on these lengths "should" be avoided; VERP, SRS and BATV
    # senders run past 64 octets, and Postfix and Exim take them. The path's 256 octets hold
    # (and no account, so no mailbox, has such a name: safe_local_part keeps its limit).
    return parse_mailbox(inner, utf8=utf8, local_limit=False)


def is_plain_address(text: str, *, local_optional: bool = False) -> bool:
    """Whether ``text`` is an ASCII ``local@domain`` with a dot-atom local part (RFC 5322
    §3.4.1) and a domain of two labels or more (also ``@domain`` if ``local_optional``): the
    DKIM AUID as RFC 6376 §3.5 and the RFC 8601 §2.2 pvalue take it."""
    local, at, domain = text.rpartition("@")
    if not at or not text.isascii() or len(text) > 254:  # RFC 5321 §4.5.3.1.3
        return False
    if (local or not local_optional) and not _DOT_STRING.fullmatch(local):
        return False
    labels = domain.split(".")
    return len(labels) > 1 and all(_LABEL.fullmatch(label) for label in labels)


_RUA_SIZE = re.compile(r"[0-9]+[kmgtKMGT]?")  # RFC 7489 §6.4 dmarc-uri size (ABNF: any case)


def dmarc_rua_uris(value: str) -> tuple[str, ...]:
    """The ``rua=`` URIs of a DMARC record for ``value`` (``[auth] dmarc_rua``): addresses
    separated by commas, each with or without ``mailto:`` and with an optional size limit
    (``!10m``, RFC 7489 §6.4), the domain in A-labels, in the local part %-encoded what a
    mailto: URI may not hold as it is (RFC 6068 §2) and DMARC's "!" and "," (RFC 7489 §6.2).
    ValueError naming the part that is no such address."""
    uris = []
    for part in value.split(","):
        part = part.strip()
        if part[:7].lower() == "mailto:":
            part = part[7:]
        local, _at, rest = part.rpartition("@")
        domain, bang, size = rest.partition("!")
        try:
            domain = normalise_domain(domain)
        except ValueError:
            domain = ""
        printable = local.isprintable() and not any(c in local for c in ' "\\')
        if not (local and printable and domain) or (bang and not _RUA_SIZE.fullmatch(size)):
            raise ValueError(f"{part!r} is no address (local@domain, an optional !size)")
        quoted = urllib.parse.quote(local, safe="$'()*+;:-._~")  # (UTF-8 too: RFC 6068 §2)
        uris.append(f"mailto:{quoted}@{domain}{bang}{size.lower()}")
    return tuple(uris)


def safe_local_part(local: str) -> str:
    """The lower-cased local part if it may name a directory; AddressError otherwise. Beside
    what a path cannot hold, a UTF-8 one must be an identifier (:func:`_identifier`): RFC 6531
    allows any character, but an account named with an invisible one, a symbol or a
    fullwidth letter looks like another, or rewrites the terminal line that lists it."""
    lowered = local_key(local)
    if (
        not _SAFE_LOCAL.match(lowered)
        or ".." in lowered
        or len(lowered.encode()) > MAX_LOCAL_PART
        or not (lowered.isascii() or _identifier(lowered))
    ):
        raise AddressError(f"local part {local!r} cannot name a mailbox")
    return lowered


def _identifier(local: str) -> bool:
    """RFC 8265 §3.3 (UsernameCasePreserved, precis-i18n): letters, marks and digits of any
    script and printable ASCII, in their own form (no fullwidth or other compatibility
    form, no symbol, no space, control, or default-ignorable character such as a zero-width
    joiner, a variation selector or a Hangul filler); and no combining mark first."""
    try:
        same = _USERNAME.enforce(local) == local
    except UnicodeError:
        return False
    return same and not unicodedata.category(local[0]).startswith("M")


def parse_user_address(text: str) -> Address:
    """An address typed by an admin or a login: case-insensitive, UTF-8 allowed."""
    return parse_mailbox(text.strip(), utf8=True)
