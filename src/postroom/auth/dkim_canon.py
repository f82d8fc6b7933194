"""What DKIM signs (RFC 6376 §3.4, §3.7): a message's header fields, canonicalized, and the
octets a signature covers. Shared by the signer and the verifier, so that both hash the same.

dkimpy does all of this correctly, and slowly for a server that checks every message: its
parser runs a regular expression per line through the module-level cache, its relaxed
canonicalization two substitutions per field, and the b= removal of its ``hash_headers`` a
backtracking pattern: together, most of a verification's Python time. The
code here gives the same results (property tests in tests/unit/test_dkim.py compare it with
dkimpy on arbitrary input) with one bytes method per field where it can: relaxed values are
``split()`` and joined, and only a value with something that ``split()`` counts as space and
relaxed canonicalization does not (VT, FF, a lone CR or LF, a CRLF that is not a fold) takes
dkimpy's way. Bodies are canonicalized with the same steps as dkimpy's, in an order that
cannot take quadratic time on a line of spaces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import dkim
from dkim.canonicalization import (
    CanonicalizationPolicy,
    Relaxed,
    Simple,
    correct_empty_body,
    strip_trailing_lines,
)

Field = tuple[bytes, bytes]  # name, value with its folds and its final CRLF

_WSP_RUN = re.compile(rb"[\t ]+")
_NAME = re.compile(rb"[\x21-\x7e]+")  # as dkimpy: printable, up to the first colon after it
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 §3.6.8 ftext: no colon
_SPACE_BEFORE_COLON = re.compile(rb"^(" + _FIELD_NAME.pattern + rb")[ \t]+:", re.MULTILINE)
# What ``split()`` would take for white space where relaxed canonicalization does not: VT, FF,
# a lone CR or LF, and a CRLF that is not a fold (unfolding removes it without a space).
_ODD_SPACE = re.compile(rb"[\x0b\x0c]|\r(?!\n)|(?<!\r)\n|\r\n(?=[^ \t])")
# The b= tag and its value, which the signature does not cover (RFC 6376 §3.5, §3.7): a tag
# named b at the start of the field value or after a ";" (FWS before the name allowed, §3.2),
# so also a b= written first right after the colon, and never a "b=" inside another tag's
# value (dkimpy's RE_BTAG takes any "b=" after white space and misses the first); written so
# that it cannot backtrack over the value: white space, then base64 characters and white
# space ending in a base64 character. Every occurrence is emptied, as dkimpy does.
_B_TAG = re.compile(rb"((?:^|;)\s*b\s*=)(?:\s*[A-Za-z0-9+/=](?:[\sA-Za-z0-9+/=]*[A-Za-z0-9+/=])?)?")


class MalformedHeader(ValueError):
    """A header line that is neither a field nor a continuation (no signature can verify)."""


def without_space_before_colons(head: bytes) -> bytes:
    """``head`` (a header section) with no white space between a field name and its colon:
    that form (RFC 5322 §4.5.3 obs-optional) "MUST NOT be generated", and dkimpy and
    OpenDKIM see no From field in ``From :``, so they fail every signature of it."""
    return _SPACE_BEFORE_COLON.sub(rb"\1:", head)


def split_message(message: bytes) -> tuple[list[Field], bytes]:
    """The header fields and the body (CRLF lines) of ``message``, as ``dkim.rfc822_parse``
    gives them, and also a field with white space before its colon: a leading ``From `` line
    is skipped; any other line without a field name raises :class:`MalformedHeader`. A
    message with a bare LF (never one the server took) is left to dkimpy."""
    if message.count(b"\n") != message.count(b"\r\n"):
        try:
            parsed, rest = dkim.rfc822_parse(message)
        except (dkim.MessageFormatError, IndexError) as exc:  # IndexError: a fold first
            raise MalformedHeader(str(exc)) from None
        return [(bytes(name), bytes(value)) for name, value in parsed], bytes(rest)
    end = -2 if message.startswith(b"\r\n") else message.find(b"\r\n\r\n")  # the first empty line
    if end == -1:
        head, body = message, b""
    else:
        head, body = message[: end + 2], message[end + 4 :]
    fields: list[tuple[bytes, list[bytes]]] = []  # name, lines of the value (joined once)
    lines = head.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise MalformedHeader("the header section starts with a continuation line")
            fields[-1][1].append(line)
            continue
        colon = _colon(line)
        if colon > 0:
            fields.append((line[:colon], [line[colon + 1 :]]))
        elif not line.startswith(b"From "):  # an mbox separator ("From sender date") is skipped
            raise MalformedHeader(f"not a header field: {line[:60]!r}")
    return [(name, b"\r\n".join(value) + b"\r\n") for name, value in fields], body


def _colon(line: bytes) -> int:
    """The offset of the colon that ends the field name of ``line``, or -1 when ``line`` is no
    header field."""
    colon = line.find(b":", 1)  # the name is at least one character, even a ":"
    if colon > 0 and _NAME.fullmatch(line, 0, colon):
        return colon
    if colon > 0 and _FIELD_NAME.fullmatch(line[:colon].rstrip(b" \t")):
        # RFC 5322 §4.5.3 obs-optional: white space between the name and the colon (dkimpy
        # refuses the whole message for one such field, signed or not). The name keeps it:
        # simple canonicalization keeps it, relaxed strips it (RFC 6376 §3.4.2). "From : x"
        # is such a field, a From, not an mbox separator: taken for one, a From added on top
        # escaped the over-signing (and DMARC still read it).
        return colon
    return -1


def _relaxed_value(value: bytes) -> bytes:
    """RFC 6376 §3.4.2: unfolded, runs of WSP made one SP, none at either end."""
    if _ODD_SPACE.search(value):
        return bytes(Relaxed.canonicalize_headers([(b"", value)])[0][1])
    return b" ".join(value.split()) + b"\r\n"


def canonical_headers(policy: type[Relaxed] | type[Simple], fields: Sequence[Field]) -> list[Field]:
    """``fields`` in the header canonicalization ``policy`` (dkimpy's ``Relaxed`` or
    ``Simple``)."""
    if policy is Simple:
        return list(fields)
    return [(name.lower().rstrip(), _relaxed_value(value)) for name, value in fields]


def canonical_body(algorithm: bytes, body: bytes) -> bytes:
    """``body`` in the body canonicalization ``algorithm`` (``b"relaxed"`` or ``b"simple"``,
    RFC 6376 §3.4.3, §3.4.4). Relaxed as dkimpy's, in an order that stays linear: dkimpy strips
    the white space before each CRLF first, with a pattern that takes quadratic time on a long
    run of spaces; runs made one space first, that space is a plain replace."""
    if algorithm == b"relaxed":
        body = _WSP_RUN.sub(b" ", body).replace(b" \r\n", b"\r\n")
        return bytes(correct_empty_body(strip_trailing_lines(body)))
    return bytes(strip_trailing_lines(body))


def header_policy(policy: CanonicalizationPolicy) -> type[Relaxed] | type[Simple]:
    """The header half of a c= policy (dkimpy's ``CanonicalizationPolicy``)."""
    header: type[Relaxed] | type[Simple] = policy.header_algorithm
    return header


def signed_header_data(
    policy: type[Relaxed] | type[Simple],
    fields: Sequence[Field],
    include: Sequence[bytes],
    signature_field: Field,
) -> bytes:
    """The octets a signature covers (RFC 6376 §3.7): the fields ``include`` names, taken
    from the bottom of the canonicalized ``fields``, then the DKIM-Signature field itself
    with b= empty and without its final line end, canonicalized by ``policy``."""
    return signature_data(policy, select_headers(fields, include), signature_field)


def signature_data(
    policy: type[Relaxed] | type[Simple], selected: Sequence[Field], signature_field: Field
) -> bytes:
    """The octets a signature covers, given the canonicalized fields its h= ``selected``
    (:func:`select_headers`, :meth:`HeaderIndex.select`): see :func:`signed_header_data`."""
    name, value = signature_field
    ((cname, cvalue),) = canonical_headers(policy, [(name, _B_TAG.sub(rb"\1", value))])
    return b"".join(n + b":" + v for n, v in selected) + cname + b":" + cvalue.rstrip()


class HeaderIndex:
    """A message's header fields, indexed once by name for every signature checked against
    them: each signature then costs its h= list, not the header section. Checking each
    signature against each key record by canonicalizing every field its h= names (before
    selecting) made a 0.9 MB header of 180,000 ``X:`` fields under ten signatures that named
    ``x`` cost 3-4 s of CPU, a queue of them a minute."""

    def __init__(self, fields: Sequence[Field]) -> None:
        self.fields = fields
        self._where: dict[type[Relaxed] | type[Simple], dict[bytes, list[int]]] = {}
        self._canonical: dict[tuple[type[Relaxed] | type[Simple], int], Field] = {}

    def select(self, policy: type[Relaxed] | type[Simple], include: Sequence[bytes]) -> list[Field]:
        """The fields each name of ``include`` takes from the bottom up (RFC 6376 §5.4.2),
        canonicalized by ``policy``: :func:`select_headers` of :func:`canonical_headers`."""
        where = self._where.get(policy)
        if where is None:
            where = self._where[policy] = {}
            for i, (name, _value) in enumerate(self.fields):
                where.setdefault(_selected_as(name), []).append(i)
        taken: dict[bytes, int] = {}
        selected = []
        for name in include:
            name = name.lower()
            positions = where.get(name, ())
            count = taken.get(name, 0)
            if count < len(positions):
                taken[name] = count + 1
                selected.append(self._canonical_field(policy, positions[-1 - count]))
        return selected

    def _canonical_field(self, policy: type[Relaxed] | type[Simple], position: int) -> Field:
        field = self._canonical.get((policy, position))
        if field is None:
            (field,) = canonical_headers(policy, [self.fields[position]])
            self._canonical[(policy, position)] = field
        return field


def _selected_as(name: bytes) -> bytes:
    """The name an h= entry selects a field by (RFC 6376 §5.4.2): lower-cased, without the
    white space RFC 5322 §4.5.3 lets stand before the colon, whatever the canonicalization
    (simple keeps that space in what it hashes, not in the name). Under c=simple a
    ``From :`` added on top of a message whose signature over-signs From was selected by
    nothing: the signature passed, and DMARC read the added From."""
    return name.lower().rstrip(b" \t")


def select_headers(fields: Sequence[Field], include: Sequence[bytes]) -> list[Field]:
    """The fields each name of ``include`` takes, from the bottom up (RFC 6376 §5.4.2):
    dkimpy's ``select_headers``, in one pass. Its scan per name cost h= names x fields: a
    sender's 250 KiB message with 20,000 of each took 23 s of CPU to check."""
    where: dict[bytes, list[int]] = {}
    for i, (name, _value) in enumerate(fields):
        where.setdefault(_selected_as(name), []).append(i)
    selected = []
    for name in include:
        left = where.get(name.lower())
        if left:
            selected.append(fields[left.pop()])
    return selected
