"""The DKIM-Signature's h= list was folded every 70 characters, also inside a header field name
("conte<CRLF><TAB>nt-transfer-encoding"): RFC 6376 §3.5 allows FWS only around the colons, and
dkimpy (so, receivers) then failed every signature of a message that named enough fields, such
as a submission converted to quoted-printable. h= is now folded only after a colon."""

from __future__ import annotations

import base64

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from postroom.auth.dkim_sign import SIGNED_HEADERS, SigningKey, sign

MESSAGE = b"".join(
    name.title() + b": x@a.test\r\n" for name in SIGNED_HEADERS if name != b"from"
) + (b"From: alice@a.test\r\n\r\nbody\r\n")


def test_a_long_h_list_is_folded_between_names_and_verifies() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    record = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)
    signature = sign(MESSAGE, [SigningKey("a.test", "sel", key)], 1_700_000_000)
    h_tag = signature.split(b"h=", 1)[1].split(b";", 1)[0]
    for piece in h_tag.split(b":"):
        assert piece.strip() in SIGNED_HEADERS, piece  # no name broken in two
    assert max(len(line) for line in signature.split(b"\r\n")) <= 78

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"sel._domainkey.a.test."
        return record

    assert dkim.DKIM(signature + MESSAGE).verify(dnsfunc=dnsfunc)
