"""DKIM signing (RFC 6376 §5; Ed25519 per RFC 8463): one ``DKIM-Signature`` per key.

relaxed/relaxed canonicalization, ``From`` over-signed (named once more than it occurs, so
that no ``From`` can be added later, RFC 6376 §8.15), and the header fields a receiver looks
at when present: To, Cc, Subject, Date, Message-ID, Reply-To, In-Reply-To, References, the
MIME header fields and the List-* ones (RFC 2369, RFC 8058).

Parsing and canonicalization are ``dkim_canon``'s, the code our verifier runs (dkimpy's results,
faster); the signature itself is computed with ``cryptography``: dkimpy's own RSA is pure Python
(about 21 ms per RSA-2048 signature here, against 1.4 ms in OpenSSL). The body is
canonicalized and hashed once for all keys. Pure: no I/O; the caller runs it in the DKIM helper
process (``auth/helper.py``). Security notes: the private keys come in as objects and are never
logged.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim.canonicalization import Relaxed

from postroom.auth import dkim_canon

SIGNED_HEADERS = (
    b"from",
    b"sender",
    b"reply-to",
    b"subject",
    b"date",
    b"message-id",
    b"to",
    b"cc",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"content-disposition",
    b"content-language",
    b"list-id",
    b"list-help",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"list-subscribe",
    b"list-post",
    b"list-owner",
    b"list-archive",
)


@dataclass(frozen=True)
class SigningKey:
    """A key ready to sign: selector, domain and the private key object."""

    domain: str
    selector: str
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

    @property
    def algorithm(self) -> bytes:
        return (
            b"ed25519-sha256" if isinstance(self.key, ed25519.Ed25519PrivateKey) else b"rsa-sha256"
        )


def header_list(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """The h= list: every present field of SIGNED_HEADERS as often as it occurs, and From
    once more (over-signing)."""
    counts: dict[bytes, int] = {}
    for name, _value in headers:
        lower = name.lower().rstrip()  # "From :" is a From (RFC 5322 §4.5.3 obs-optional)
        if lower in SIGNED_HEADERS:
            counts[lower] = counts.get(lower, 0) + 1
    out: list[bytes] = []
    for name in SIGNED_HEADERS:
        out += [name] * (counts.get(name, 0) + (1 if name == b"from" else 0))
    return out


def _fold(fields: list[tuple[bytes, bytes]]) -> bytes:
    """``tag=value`` pairs joined by ``; ``, folded before 78 columns where a space allows
    it. Only b= and bh= are broken inside their value: FWS in base64 is ignored (RFC 6376
    §3.5), while in d=, s= and the rest white space is part of the value (§3.2) or not allowed
    by the grammar, so such a tag moves whole to a line of its own, however long (at most
    998 octets, RFC 5322 §2.1.1: a domain name is at most 253). h= is broken only after a
    colon: FWS may not stand inside a header field name (RFC 6376 §3.5, sig-h-tag)."""
    lines: list[bytes] = []
    line = b"DKIM-Signature:"
    for i, (tag, value) in enumerate(fields):
        text = tag + b"=" + value + (b";" if i < len(fields) - 1 else b"")
        if len(line) + 1 + len(text) <= 78:
            line += b" " + text
            continue
        lines.append(line)
        if tag not in (b"b", b"bh", b"h"):
            line = b"\t" + text
            continue
        line, rest = b"", text
        while rest:
            cut = 70
            if tag == b"h" and len(rest) > cut:
                # after the last colon that fits, else after the first one
                cut = rest.rfind(b":", 0, cut) + 1 or rest.find(b":") + 1 or len(rest)
            if line:
                lines.append(line)
            line, rest = b"\t" + rest[:cut], rest[cut:]
    lines.append(line)
    return b"\r\n".join(lines) + b"\r\n"


def sign(message: bytes, keys: Sequence[SigningKey], now: int) -> bytes:
    """The ``DKIM-Signature`` fields (CRLF-terminated, newest first) to put on top of
    ``message``; empty when there is no key. ``now`` is the ``t=`` timestamp."""
    if not keys:
        return b""
    headers, body = dkim_canon.split_message(message)
    canonical_body = dkim_canon.canonical_body(b"relaxed", body)
    body_hash = base64.b64encode(hashlib.sha256(canonical_body).digest())
    include = header_list(headers)
    canonical_headers = dkim_canon.canonical_headers(Relaxed, headers)
    out = []
    for key in keys:
        fields = [
            (b"v", b"1"),
            (b"a", key.algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", key.domain.encode("ascii")),
            (b"s", key.selector.encode("ascii")),
            (b"t", str(now).encode("ascii")),
            (b"h", b":".join(include)),
            (b"bh", body_hash),
            (b"b", b""),
        ]
        unsigned = _fold(fields)
        name, _, value = unsigned.partition(b":")
        data = dkim_canon.signed_header_data(Relaxed, canonical_headers, include, (name, value))
        if isinstance(key.key, ed25519.Ed25519PrivateKey):
            # RFC 8463 §3: Ed25519 signs the SHA-256 hash of the header data.
            signature = key.key.sign(hashlib.sha256(data).digest())
        else:
            signature = key.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        fields[-1] = (b"b", base64.b64encode(signature))
        out.append(_fold(fields))
    return b"".join(reversed(out))
