"""The highest TLS version a ClientHello offers, read from its first record (RFC 8446 §4.1.2,
§4.2.1; RFC 5246 §7.4.1.2), and the ``protocol_version`` alert that refuses it.

Why by hand: OpenSSL does send that alert when a TLS 1.0 or 1.1 client meets a server whose
minimum is TLS 1.2, but asyncio's and uvloop's SSL transports drop whatever OpenSSL queued when
the handshake fails, so the client saw a bare close (sslscan, testssl.sh and old clients then
report a network error, not the refusal). The servers peek at the ClientHello before the
handshake (:mod:`postroom.tlsgate`) and answer an old one with the alert themselves. Only a
hello read completely and offering nothing above TLS 1.1 is refused; anything else (garbage,
a hello split over records) is left to OpenSSL.

Pure: bytes in, a decision out.
"""

from __future__ import annotations

import struct

TLS12 = 0x0303
NEED_MORE = -1  # not enough octets yet
UNKNOWN = 0  # not a ClientHello we can read whole: let OpenSSL decide
_SUPPORTED_VERSIONS = 0x002B
MAX_RECORD = 5 + (1 << 14) + 2048  # a TLSPlaintext record, with slack


def offered_version(data: bytes) -> int:
    """The highest version ``data`` (the first octets from the client) offers,
    :data:`NEED_MORE` or :data:`UNKNOWN`."""
    if len(data) < 5:
        return NEED_MORE
    if data[0] != 0x16 or data[1] != 3:  # handshake record, SSL 3 / TLS record version
        return UNKNOWN
    length = struct.unpack_from(">H", data, 3)[0]
    if len(data) < 5 + length:
        return NEED_MORE if 5 + length <= MAX_RECORD else UNKNOWN
    try:
        return _hello(data[5 : 5 + length])
    except (struct.error, IndexError):
        return UNKNOWN


def _hello(body: bytes) -> int:
    if body[0] != 1:  # client_hello
        return UNKNOWN
    size = int.from_bytes(body[1:4], "big")
    if 4 + size > len(body):
        return UNKNOWN  # continued in another record
    version = struct.unpack_from(">H", body, 4)[0]
    pos = 4 + 2 + 32  # legacy_version, random
    pos += 1 + body[pos]  # legacy_session_id
    pos += 2 + struct.unpack_from(">H", body, pos)[0]  # cipher_suites
    pos += 1 + body[pos]  # legacy_compression_methods
    if pos >= 4 + size:
        return int(version)  # no extensions (an SSL 3 / TLS 1.0 era hello)
    end = pos + 2 + struct.unpack_from(">H", body, pos)[0]
    pos += 2
    while pos + 4 <= end:
        kind, ext_len = struct.unpack_from(">HH", body, pos)
        if kind == _SUPPORTED_VERSIONS:  # RFC 8446 §4.2.1: it overrides legacy_version
            versions = body[pos + 5 : pos + 5 + body[pos + 4]]
            offered = [
                int.from_bytes(versions[i : i + 2], "big") for i in range(0, len(versions), 2)
            ]
            # GREASE values (RFC 8701, 0x?A?A) are not versions.
            real = [v for v in offered if v & 0x0F0F != 0x0A0A]
            return max(real) if real else UNKNOWN
        pos += 4 + ext_len
    return int(version)


def too_old(data: bytes) -> bool | None:
    """True: a whole ClientHello offering at most TLS 1.1; False: let the handshake run;
    None: more octets are needed to tell."""
    version = offered_version(data)
    if version == NEED_MORE:
        return None
    return version != UNKNOWN and version < TLS12


def protocol_version_alert(data: bytes) -> bytes:
    """A fatal ``protocol_version`` alert (RFC 8446 §6.2: 70) in a record of the version the
    client's record layer used."""
    return bytes([0x15, 3, data[2] if len(data) > 2 else 1, 0, 2, 2, 70])
