"""Making a message fit for a next hop: short lines (RFC 5321 §4.5.3.1.6) and 7-bit (RFC 6152 §3).

:func:`downgrade` returns the message unchanged unless it has a line over 998 octets or (for a
peer without 8BITMIME) 8-bit octets in a body. Then only the MIME leaf parts that need it are
re-encoded, as Postfix does: text parts as quoted-printable (base64 when the decoded text has
bare CR or LF, which quoted-printable cannot carry), and so the message/global types of RFC 6532
and RFC 6533 (header lines, which stay readable so), everything else as base64, each with its
``Content-Transfer-Encoding`` replaced; multipart and message/rfc822 parts are walked into (RFC
2046 §5) and their own ``8bit``/``binary`` label becomes ``7bit`` once what they hold is 7-bit;
other message types (delivery-status, ...) take no encoding (RFC 2045 §6.4) and stay as they are.
Mail without MIME is one text/plain leaf: it gains ``MIME-Version`` (and a charset, ``utf-8`` when
the octets are UTF-8, else RFC 1428's ``unknown-8bit``), so a reader decodes it back to the very
lines that were sent. Header lines over the limit are folded at white space (RFC 5322 §2.2.3),
or, with no white space to fold at, broken by CRLF SP as Postfix's ``smtp_line_length_limit``
does. Preamble and epilogue (which readers ignore, RFC 2046 §5.1.1) are wrapped and lose 8-bit
octets. 8-bit octets in header fields stay: they need SMTPUTF8, not a body encoding (the
client engine refuses to send them where they cannot go: 5.6.9, 5.6.3).

A re-encoded message no longer matches a DKIM signature made before (RFC 6376 §5.3 asks signers
to convert first): mail submitted here is converted at intake, before it is signed, so that only
mail relayed for others (an alias with a remote target) can be changed at relay time. Written by
hand because ``email.generator`` re-renders the parts it does not need to touch (headers
refolded, boundaries and line ends changed); the ``email`` package only parses header fields
here, and ``binascii`` does the encoding. Pure: bytes in, bytes out; input lines end in CRLF.
"""

from __future__ import annotations

import binascii
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from postroom.wire.framing import to_crlf

MAX_LINE = 998  # RFC 5321 §4.5.3.1.6: octets per line, without the CRLF
QP_LINE = 76  # RFC 2045 §6.7 rule 5: characters per encoded line, a soft break's "=" included
_SCAN = 1 << 20  # octets looked at in one piece for a long line
# Multiparts and messages nested deeper are left as they are (Postfix refuses past 100): each
# level is one more pass over what it holds, and a hostile message of a few KB nests hundreds.
# 8-bit octets left there make the hop refuse the message (5.6.3: convert or return it).
MAX_NESTING = 30
_HEADER_PARSER = BytesHeaderParser(policy=compat32)
_CTE_FIELD = re.compile(rb"(?i)content-transfer-encoding[ \t]*:")
_COMMENT = re.compile(r"\([^()]*\)")  # RFC 822 comments, allowed in structured fields
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]+")
_AS_IS = ("", "7bit", "8bit", "binary")  # the encodings that are no encoding (RFC 2045 §6.2)
_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")  # RFC 5322 §2.2 field name, obs WSP (§4.5)


def downgrade(data: bytes, *, eight_bit: bool) -> bytes:
    """``data`` with every line at most 998 octets and, unless ``eight_bit`` (the peer offers
    8BITMIME), every body 7-bit; ``data`` itself when nothing needs changing."""
    data = to_crlf(data)
    if not needs_downgrade(data, eight_bit=eight_bit):
        return data
    return _entity(data, seven_bit=not eight_bit, message=True, digest=False, depth=0)


def needs_downgrade(data: bytes, *, eight_bit: bool, line_end: bytes = b"\r\n") -> bool:
    """Whether :func:`downgrade` has anything to do (``data`` with ``line_end``: CRLF on the
    wire, LF as a draft stores it)."""
    return (not eight_bit and not data.isascii()) or has_long_line(data, line_end)


def has_long_line(data: bytes, line_end: bytes = b"\r\n") -> bool:
    """Whether a line of ``data`` is longer than :data:`MAX_LINE` (without its end). Read a
    MiB at a time: split whole, 20 million empty lines made a list of 160 MB."""
    start, size = 0, len(data)
    while start < size:
        cut = min(start + _SCAN, size)
        end = data.find(b"\n", cut)
        if end < 0:
            if size - cut > MAX_LINE:  # the line at the cut runs to the end
                return True
            end = size
        elif end - cut > MAX_LINE + 1:  # so does it, to a line end that far on
            return True
        else:
            end += 1
        if max(map(len, data[start:end].split(line_end))) > MAX_LINE:
            return True
        start = end
    return False


def starts_with_header_field(data: bytes) -> bool:
    """Whether ``data`` begins with a header field; if not, a message has no header section
    and what it holds is all body (RFC 5322 §2.1)."""
    return _FIELD_START.match(data) is not None


def fields_end(data: bytes, line_end: bytes = b"\r\n") -> int:
    """The length of the header fields at the start of ``data`` (lines ending in
    ``line_end``): up to its first empty line, or to an earlier line that is neither a field
    (RFC 5322 §2.2) nor a continuation of one, where Postfix's cleanup ends the header section
    too (a script's text that follows its fields with no empty line)."""
    pos, size = 0, len(data)
    while pos < size:
        if data.startswith(line_end, pos):
            return pos
        continuation = pos > 0 and data[pos : pos + 1] in (b" ", b"\t")
        if not continuation and not _FIELD_START.match(data, pos):
            return pos
        nl = data.find(line_end, pos)
        pos = size if nl < 0 else nl + len(line_end)
    return pos


def stray_line(data: bytes, line_end: bytes = b"\r\n") -> int:
    """The offset of a line that ends the header section of ``data`` without the empty line
    (see :func:`fields_end`), or -1: none, or the first line (a message without a header
    section, which the fields we add on top end with the empty line)."""
    end = fields_end(data, line_end)
    return end if 0 < end < len(data) and not data.startswith(line_end, end) else -1


def _split_entity(raw: bytes, message: bool) -> tuple[bytes, bytes | None]:
    """(header section with its last CRLF, body) of one entity; no body without a blank line.
    A message whose first line is no header field is all body (a part is read leniently). A
    later line that is no field ends the header (:func:`fields_end`), as readers take it: the
    body starts there, and the fields we change stay above it (the empty line comes back with
    the entity put together again)."""
    if raw.startswith(b"\r\n"):
        return b"", raw[2:]
    if message and not starts_with_header_field(raw):
        return b"", raw
    end = fields_end(raw)
    if end == 0:  # a part whose first line is no field: up to its empty line
        end = raw.find(b"\r\n\r\n") + 2 if b"\r\n\r\n" in raw else len(raw)
    if end >= len(raw):
        return raw, None
    if raw.startswith(b"\r\n", end):
        return raw[:end], raw[end + 2 :]
    return raw[:end], raw[end:]


def _entity(raw: bytes, *, seven_bit: bool, message: bool, digest: bool, depth: int) -> bytes:
    """One entity converted; ``message`` for a message's own header (top level, or inside
    message/rfc822), ``digest`` for a part of multipart/digest; ``depth`` levels down."""
    head, body = _split_entity(raw, message)
    if body is None:
        return fold_header(head)
    fields = _HEADER_PARSER.parsebytes(head + b"\r\n")
    if digest and "content-type" not in fields:
        fields.set_default_type("message/rfc822")  # RFC 2046 §5.1.5
    ctype = fields.get_content_type()
    raw_cte = str(fields.get("content-transfer-encoding", ""))
    cte = _COMMENT.sub("", raw_cte).strip().lower()
    boundary = fields.get_boundary()
    composite = (ctype.startswith("multipart/") and boundary) or (
        ctype == "message/rfc822" and cte in _AS_IS
    )
    if composite and depth >= MAX_NESTING:
        return raw  # (see MAX_NESTING)
    if ctype.startswith("multipart/") and boundary:
        body = _multipart(
            body, boundary.encode("ascii", "surrogateescape"), seven_bit, ctype, depth + 1
        )
        return _relabel(head, cte, body, seven_bit) + b"\r\n" + body
    if composite:
        # RFC 2046 §5.2.1: no other encoding is allowed here; convert the message inside.
        body = _entity(body, seven_bit=seven_bit, message=True, digest=False, depth=depth + 1)
        return _relabel(head, cte, body, seven_bit) + b"\r\n" + body
    if ctype.startswith("message/") and not ctype.startswith("message/global") and cte in _AS_IS:
        # RFC 2045 §6.4, RFC 6532 §3.5: a message type (delivery-status, partial, ...) takes
        # no encoding but 7bit/8bit/binary; base64 would hide its fields from every reader.
        # Its lines are folded if long (no line over 998 goes out, RFC 5321 §4.5.3.1.6);
        # 8-bit octets stay, returned to the sender by a hop without 8BITMIME (5.6.3).
        return fold_header(head) + b"\r\n" + fold_header(body)
    return _leaf(head, body, fields, cte, seven_bit=seven_bit, message=message)


def _relabel(head: bytes, cte: str, body: bytes, seven_bit: bool) -> bytes:
    """A composite part's header: ``7bit`` once it holds only 7-bit data."""
    if seven_bit and cte in ("8bit", "binary") and body.isascii():
        head = _set_cte(head, "7bit")
    return fold_header(head)


def _leaf(
    head: bytes, body: bytes, fields: Message, cte: str, *, seven_bit: bool, message: bool
) -> bytes:
    if not (has_long_line(body) or (seven_bit and not body.isascii())):
        return fold_header(head) + b"\r\n" + body
    if cte == "base64" and not _mislabelled(body):
        decoded = _unbase64(body)
    elif cte == "base64":
        # Text a client sent unencoded under a base64 label: decoded, it was lost for good.
        decoded = body
    elif cte == "quoted-printable":  # (8-bit octets in it are kept, as readers keep them)
        decoded = binascii.a2b_qp(body)
    else:
        decoded = body
    bare = decoded.replace(b"\r\n", b"")
    textual = fields.get_content_maintype() == "text" or fields.get_content_type().startswith(
        "message/global"
    )
    if textual and b"\r" not in bare and b"\n" not in bare:
        encoded, new_cte = _quoted_printable(decoded), "quoted-printable"
    else:
        encoded, new_cte = _base64(decoded), "base64"
    head = _set_cte(head, new_cte)
    if "content-type" not in fields and not decoded.isascii():
        # Without one the charset would be us-ascii (RFC 2045 §5.2): say what it is.
        charset = "utf-8" if _is_utf8(decoded) else "unknown-8bit"  # RFC 1428
        head += f"Content-Type: text/plain; charset={charset}\r\n".encode()
    if message and "mime-version" not in fields:
        head += b"MIME-Version: 1.0\r\n"  # RFC 2045 §4: what makes the encoding count
    return fold_header(head) + b"\r\n" + encoded


def _quoted_printable(text: bytes) -> bytes:
    """RFC 2045 §6.7 for ``text`` (CRLF lines): ``binascii``'s encoder (quotetabs off: only
    trailing white space is encoded, rule 3), its output mended where a line breaks the rules.
    It writes 77 characters for a line that ends in white space near column 76 (rule 5 says
    76), and it writes ``--`` first on a line: after a soft line break, or where the text
    (decoded from base64 or quoted-printable) had it. ``--boundary`` there would be a
    delimiter of the multipart around (RFC 2046 §5.1.1) and cut the part in two. Such text
    lines are wrapped again, a ``-`` that would start a line with ``--`` written ``=2D``."""
    # (b2a_qp breaks soft lines with a bare LF when the text has no CRLF of its own.)
    encoded = to_crlf(binascii.b2a_qp(text, istext=True))
    lines = encoded.split(b"\r\n")
    if not any(len(line) > QP_LINE or line[:2] == b"--" for line in lines):
        return encoded
    out: list[bytes] = []
    logical: list[bytes] = []  # the physical lines of one text line
    for line in lines:
        logical.append(line)
        if line[-1:] != b"=":  # (binascii writes "=" as "=3D": a last "=" is a soft break)
            if any(len(part) > QP_LINE or part[:2] == b"--" for part in logical):
                out.extend(_qp_wrap(b"".join(part[:-1] for part in logical[:-1]) + line))
            else:
                out.extend(logical)
            logical = []
    return b"\r\n".join(out)


def _qp_wrap(encoded: bytes) -> list[bytes]:
    """One encoded text line in lines of at most 76 characters, soft breaks included, never
    cut inside an ``=XX``, and none starting with ``--``."""
    out: list[bytes] = []
    start, size = 0, len(encoded)
    while True:
        first = b""
        if encoded[start : start + 2] == b"--":
            first, start = b"=2D", start + 1
        room = QP_LINE - len(first)
        if size - start <= room:
            out.append(first + encoded[start:])
            return out
        cut = start + room - 1  # and the soft break's "="
        if encoded[cut - 1 : cut] == b"=":  # not inside an "=XX"
            cut -= 1
        elif encoded[cut - 2 : cut - 1] == b"=":
            cut -= 2
        out.append(first + encoded[start:cut] + b"=")
        start = cut


def _unbase64(data: bytes) -> bytes:
    """Whatever a broken base64 body holds: non-alphabet octets and a dangling sextet that
    carries no whole octet are dropped (as readers do)."""
    try:
        return binascii.a2b_base64(data)  # lenient: skips what is not base64
    except binascii.Error:
        clean = _NOT_BASE64.sub(b"", data)
        clean = clean[: len(clean) - len(clean) % 4 if len(clean) % 4 == 1 else len(clean)]
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))


def _mislabelled(body: bytes) -> bool:
    """Is a body labelled base64 that holds 8-bit octets no base64 at all, but text sent as it
    is? When, with those octets out and each line trimmed, nothing is left or the rest is no
    valid base64 (text has spaces between words, punctuation, lengths that are no multiple of
    4). Real base64 with a few stray octets is base64 still: they are skipped, as readers
    skip them (RFC 2045 §6.8). Text that is valid base64 once its 8-bit octets are out (one
    word like "schön") is decoded as a reader decodes it: nothing tells the two apart."""
    if body.isascii():
        return False
    rest = b"".join(line.strip(b" \t") for line in _EIGHT_BIT.sub(b"", body).split(b"\r\n"))
    if not rest:
        return True
    try:
        binascii.a2b_base64(rest, strict_mode=True)
    except binascii.Error:
        return True
    return False


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _base64(data: bytes) -> bytes:
    # RFC 2045 §6.8: lines of at most 76 characters.
    lines = [binascii.b2a_base64(data[i : i + 57], newline=False) for i in range(0, len(data), 57)]
    return b"\r\n".join(lines) + (b"\r\n" if lines else b"")


def _set_cte(head: bytes, cte: str) -> bytes:
    """``head`` without its Content-Transfer-Encoding fields, with ``cte`` at the end."""
    out: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and dropping:
            continue  # a continuation of the field being dropped
        dropping = _CTE_FIELD.match(line) is not None
        if not dropping:
            out.append(line)
    out.append(f"Content-Transfer-Encoding: {cte}\r\n".encode())
    return b"".join(out)


def _multipart(body: bytes, boundary: bytes, seven_bit: bool, ctype: str, depth: int) -> bytes:
    """Each part of a multipart body converted; delimiter lines kept as they were."""
    dash = b"--" + boundary
    lines = body.split(b"\r\n")
    out: list[bytes] = []
    part: list[bytes] | None = None  # None: in the preamble or the epilogue
    filler: list[bytes] = []
    closed = False

    def flush_part() -> None:
        if part is not None:
            raw = b"\r\n".join(part)
            digest = ctype == "multipart/digest"
            out.append(_entity(raw, seven_bit=seven_bit, message=False, digest=digest, depth=depth))

    for line in lines:
        # RFC 2046 §5.1.1: a delimiter line may end in transport padding (white space).
        if (
            not closed
            and line.startswith(dash)
            and line[len(dash) :].rstrip(b" \t") in (b"", b"--")
        ):
            if part is None:
                out.extend(_filler(filler, seven_bit))
                filler = []
            else:
                flush_part()
            out.append(line)
            closed = line[len(dash) :].rstrip(b" \t") == b"--"
            part = None if closed else []
        elif part is not None:
            part.append(line)
        else:
            filler.append(line)
    flush_part()
    out.extend(_filler(filler, seven_bit))
    return b"\r\n".join(out)


def _filler(lines: list[bytes], seven_bit: bool) -> list[bytes]:
    """Preamble or epilogue lines, wrapped and (for a 7-bit peer) without 8-bit octets."""
    out: list[bytes] = []
    for line in lines:
        if seven_bit and not line.isascii():
            line = bytes(b if b < 0x80 else 0x3F for b in line)  # "?"
        # Wrapped lines go on after a space: one starting "--boundary" would be a delimiter.
        out.append(line[:MAX_LINE])
        step = MAX_LINE - 1
        out.extend(b" " + line[i : i + step] for i in range(MAX_LINE, len(line), step))
    return out


def fold_header(head: bytes) -> bytes:
    """Header lines over 998 octets folded before white space (RFC 5322 §2.2.3), else broken
    with CRLF SP; shorter lines unchanged."""
    if not has_long_line(head):
        return head
    out: list[bytes] = []
    for line in head.split(b"\r\n"):
        while len(line) > MAX_LINE:
            colon = line.find(b":") + 1 if _FIELD_START.match(line) else 1
            cut = max(
                line.rfind(b" ", colon + 1, MAX_LINE + 1),
                line.rfind(b"\t", colon + 1, MAX_LINE + 1),
            )
            if cut <= colon or not line[:cut].strip():
                cut = MAX_LINE - 1
                while cut > 1 and 0x80 <= line[cut] < 0xC0:
                    cut -= 1  # not inside a UTF-8 character (RFC 6532 §3.2)
                out.append(line[:cut])
                line = b" " + line[cut:]
            else:
                out.append(line[:cut])
                line = line[cut:]
        out.append(line)
    return b"\r\n".join(out)
