"""``[listen]`` took ``"[192.0.2.1]:25"`` and ``"[mx.a.test]:25"`` as hosts, though brackets
enclose an IPv6 address only (RFC 3986 §3.2.2 IP-literal), and a port of non-ASCII digits
(``"127.0.0.1:²5"``) failed with Python's ``invalid literal for int()``. Both are bad config
now, with a message about the endpoint."""

from __future__ import annotations

import pytest

from postroom.config import parse_endpoint


@pytest.mark.parametrize("text", ["[192.0.2.1]:25", "[mx.a.test]:25", "[]:25", "[::1]x:25"])
def test_brackets_hold_an_ipv6_address_only(text: str) -> None:
    with pytest.raises(ValueError, match=r"endpoint|address"):
        parse_endpoint(text)


@pytest.mark.parametrize("text", ["127.0.0.1:²5", "127.0.0.1:٢٥", "[::1]:²5"])
def test_port_of_non_ascii_digits_is_a_bad_port(text: str) -> None:
    with pytest.raises(ValueError, match="bad port"):
        parse_endpoint(text)


def test_good_endpoints_still_parse() -> None:
    assert parse_endpoint("[::1]:25") == ("::1", 25)
    assert parse_endpoint("[fe80::1%lo]:25") == ("fe80::1%lo", 25)
    assert parse_endpoint("0.0.0.0:587") == ("0.0.0.0", 587)
    assert parse_endpoint("mx.a.test:25") == ("mx.a.test", 25)
    assert parse_endpoint("[::1]", 53) == ("::1", 53)
    assert parse_endpoint("::1", 53) == ("::1", 53)
