"""Reading the offered TLS version from real ClientHellos (made by OpenSSL through Python's
ssl module), partial input, and octets that are no ClientHello at all."""

from __future__ import annotations

import ssl
import warnings

import pytest

from postroom import clienthello


def hello(low: ssl.TLSVersion, high: ssl.TLSVersion) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version, ctx.maximum_version = low, high
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="mx.a.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


V = ssl.TLSVersion


@pytest.mark.parametrize(
    ("low", "high", "old"),
    [
        (V.TLSv1, V.TLSv1, True),
        (V.TLSv1, V.TLSv1_1, True),
        (V.TLSv1_1, V.TLSv1_1, True),
        (V.TLSv1, V.TLSv1_2, False),
        (V.TLSv1_2, V.TLSv1_2, False),
        (V.TLSv1_2, V.TLSv1_3, False),
        (V.TLSv1_3, V.TLSv1_3, False),
    ],
)
def test_real_hellos(low: ssl.TLSVersion, high: ssl.TLSVersion, old: bool) -> None:
    data = hello(low, high)
    assert clienthello.too_old(data) is old
    for cut in (0, 3, 5, len(data) // 2, len(data) - 1):  # not all there yet: wait
        assert clienthello.too_old(data[:cut]) is None


def test_alert_uses_the_clients_record_version() -> None:
    data = hello(V.TLSv1, V.TLSv1_1)
    alert = clienthello.protocol_version_alert(data)
    assert alert == bytes([0x15, 3, data[2], 0, 2, 2, 70])


@pytest.mark.parametrize(
    "data",
    [b"EHLO x\r\n", b"\x80\x2e\x01\x00\x02" + bytes(60), b"\x16\x03\x01\xff\xff" + bytes(10)],
)
def test_what_is_no_readable_hello_is_left_to_openssl(data: bytes) -> None:
    assert clienthello.too_old(data) in (False, None)
    assert clienthello.too_old(data + bytes(70000)) is False
