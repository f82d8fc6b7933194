"""The ``Authentication-Results`` header field (RFC 8601): rendering ours, removing forged ones.

:func:`render` writes one field whose authserv-id is our ``hostname`` with the ``spf``,
``dkim`` (one result per signature, or ``none``) and ``dmarc`` results (RFC 8601 §2.2, §2.7;
``header.b`` from RFC 6008; ``header.i`` when the signature's i= is an address, §2.7.1).
:func:`strip_ours` removes every field already in the header section that names our
authserv-id (§5: they cannot be ours, since ours is only added here), including folded ones
and ones with (nested) comments before the id. Pure: bytes in, bytes out.

Security notes: values that come from the message or the client (domains, HELO) are reduced
to RFC 8601 ``value`` characters (a token or a quoted string) so that nothing a sender writes
can add results or fields of its own.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from postroom.address import is_plain_address
from postroom.auth.dkim_verify import DkimResult
from postroom.auth.dmarc import DmarcResult
from postroom.auth.spf import SpfResult

_FIELD = re.compile(rb"(?im)^authentication-results[ \t]*:")
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~@]+\Z")


def _value(text: str) -> str:
    """A token if it is one, else a quoted string (RFC 2045 §5.1 value)."""
    if not text.isprintable():  # CR, LF and other controls are not printable
        text = "".join(c for c in text if c.isprintable())
    text = text[:255]
    if text and _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _header_b(values: Sequence[str]) -> list[str]:
    """RFC 6008 §4: the start of each b=, at least 8 characters, and as many more as it takes
    to tell it from every other (a passing and a failing signature with one start could not
    be told apart; identical ones cannot be, but each is told from the rest). The longest
    start a value shares with another is shared with a neighbour among the distinct values in
    sorted order: one sort, whatever the values hold. At most :data:`MAX_HEADER_B` (a line's
    room; a real b= is at most 684 characters up to RSA-4096)."""
    need = dict.fromkeys(values, 8)
    for a, b in itertools.pairwise(sorted(need)):
        size = min(len(a), len(b))
        shared = next((k for k in range(size) if a[k] != b[k]), size)
        need[a], need[b] = max(need[a], shared + 1), max(need[b], shared + 1)
    return [v[: min(need[v], MAX_HEADER_B)] for v in values]


MAX_HEADER_B = 960


def _folded(props: Sequence[str]) -> str:
    """One result's properties, separated by a space, or by a fold where a line would grow
    past RFC 5322 §2.1.1's 998 octets (a long header.b, a long header.i after it)."""
    text, line = props[0], 1 + len(props[0])  # (the tab that starts its line)
    for prop in props[1:]:
        if line + 1 + len(prop) > 990:  # (and the ";" after it)
            text, line = f"{text}\r\n\t{prop}", 1 + len(prop)
        else:
            text, line = f"{text} {prop}", line + 1 + len(prop)
    return text


def render(
    authserv_id: str,
    spf: SpfResult | None,
    dkim_results: Sequence[DkimResult],
    dmarc: DmarcResult | None,
) -> bytes:
    """The whole field, folded, CRLF-terminated."""
    parts: list[str] = []
    if spf is not None:
        prop = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
        parts.append(f"spf={spf.result} {prop}={_value(spf.domain)}")
    if not dkim_results:
        parts.append("dkim=none")
    header_b = _header_b([r.b for r in dkim_results])
    for r, b in zip(dkim_results, header_b, strict=True):
        props = [f"dkim={r.result}"]
        if r.reason and r.result != "pass":
            props.append(f"({_comment(r.reason)})")
        if r.domain:
            props.append(f"header.d={_value(r.domain)}")
        if r.selector:
            props.append(f"header.s={_value(r.selector)}")
        if r.algorithm:
            props.append(f"header.a={_value(r.algorithm)}")
        if b:  # (base64 characters only: quoted as they are, not cut at 255 as _value cuts)
            quoted = b if _TOKEN.match(b) else f'"{b}"'
            props.append(f"header.b={quoted}")
        if _is_auid(r.identity):
            props.append(f"header.i={r.identity}")
        parts.append(_folded(props))
    if dmarc is not None:
        text = f"dmarc={dmarc.result}"
        if dmarc.record is not None:
            text += f" ({policy_words(dmarc)} dis={dmarc.disposition})"
        if dmarc.from_domain:
            text += f" header.from={_value(dmarc.from_domain)}"
        parts.append(text)
    body = ";\r\n\t".join(parts)
    return f"Authentication-Results: {authserv_id};\r\n\t{body}\r\n".encode("utf-8", "replace")


def _is_auid(identity: str) -> bool:
    """Whether a signature's decoded i= may go in as header.i: an ASCII address of the RFC
    8601 §2.2 pvalue form ``[ [ local-part ] "@" ] domain-name`` (a dot-atom local-part), at
    most 254 octets (RFC 5321 §4.5.3.1.3). Anything else is left out, not quoted: decoded from
    dkim-quoted-printable (RFC 6376 §2.11), i= may hold ";", spaces, "=" and 8-bit octets, which
    naive readers take for results of ours (``header.i="x; dkim=pass header.d=..."`` inside a
    pass) and which would put 8-bit into a 7-bit header section. AUIDs in use are addresses."""
    return is_plain_address(identity, local_optional=True)


def policy_words(dmarc: DmarcResult) -> str:
    """``p=reject``, or ``p=reject sp=none`` for a subdomain under its organizational
    domain's record: sp= applied there, and p= alone would read as what that record
    publishes (both are shown, as large receivers do)."""
    if dmarc.record is not None and dmarc.policy_domain not in ("", dmarc.from_domain):
        return f"p={dmarc.record.p} sp={dmarc.policy}"
    return f"p={dmarc.policy}"


def _comment(text: str, limit: int = 120) -> str:
    """``text`` as an RFC 8601 comment: printable, no parentheses or backslashes, at most
    ``limit`` characters, cut at a word's end."""
    clean = "".join(c for c in text if c.isprintable() and c not in "()\\")
    if len(clean) <= limit:
        return clean
    return clean[: limit - 3].rsplit(" ", 1)[0] + "..."


def authserv_id(value: bytes) -> str:
    """The authserv-id of a field value (after any leading comments)."""
    rest = _skip_cfws(value.replace(b"\r\n", b" ").replace(b"\n", b" "))
    quoted = re.match(rb'"((?:[^"\\]|\\.)*)"', rest)  # a quoted-string: undo its quoted-pairs
    if quoted:
        token = re.sub(rb"\\(.)", rb"\1", quoted.group(1)).strip()
    else:
        token = re.split(rb"[\s;()]", rest, maxsplit=1)[0].strip(b'"')
    return token.decode("utf-8", "replace").lower().rstrip(".")


def _skip_cfws(text: bytes) -> bytes:
    """``text`` after its leading white space and comments; comments nest and may hold
    quoted pairs (RFC 5322 §3.2.2). An unclosed comment leaves nothing."""
    i, depth = 0, 0
    while i < len(text):
        c = text[i : i + 1]
        if c == b"\\" and depth:
            i += 2
            continue
        if c == b"(":
            depth += 1
        elif c == b")" and depth:
            depth -= 1
        elif not depth and not c.isspace():
            break
        i += 1
    return text[i:] if not depth else b""


def mentions_results(head: bytes) -> bool:
    """Whether the header section ``head`` has any Authentication-Results field."""
    return _FIELD.search(head) is not None


def strip_ours(message: bytes, ours: str) -> bytes:
    """``message`` without the Authentication-Results fields of its header section that name
    ``ours`` as their authserv-id (RFC 8601 §5)."""
    end = message.find(b"\r\n\r\n")
    head_end = len(message) if end < 0 else end + 2
    head = message[:head_end]
    if not _FIELD.search(head):
        return message
    ours = ours.lower().rstrip(".")
    lines = head.split(b"\r\n")
    out: list[bytes] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        j = i + 1
        while j < len(lines) and lines[j][:1] in (b" ", b"\t"):
            j += 1  # folded continuation lines belong to this field
        field_lines = lines[i:j]
        if _FIELD.match(line):
            value = b"\r\n".join(field_lines).split(b":", 1)[1]
            if authserv_id(value) == ours:
                i = j
                continue
        out += field_lines
        i = j
    return b"\r\n".join(out) + message[head_end:]
