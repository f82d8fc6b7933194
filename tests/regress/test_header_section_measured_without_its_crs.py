"""``[limits] header_size`` was compared with the header section as stored (LF line ends), not as
the client sent it (CRLF): a section of short lines passed with up to a third more octets than
the limit (500 allowed 540 in 45 lines). The limit is now on the octets on the wire, field lines
and their CRLFs, the empty line after them not counted: exactly at it is accepted, one over it
is ``552 5.3.4``, by DATA and by BDAT alike."""

from __future__ import annotations

import pytest

from tests.conftest import Server, ServerFactory, converse

LIMIT = 500


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    s = server_factory(
        domains=("a.test",), services=("smtp",), extra_toml=f"[limits]\nheader_size = {LIMIT}"
    )
    s.add_user("alice@a.test", "pw")
    return s


def header_section(octets: int) -> bytes:
    """Short field lines (12 octets each with CRLF) and one padded to make ``octets``."""
    lines = b"X-A: 12345\r\n" * 40
    pad = octets - len(lines) - len(b"Subject: \r\n")
    assert pad > 0
    section = lines + b"Subject: " + b"s" * pad + b"\r\n"
    assert len(section) == octets
    return section


def send(srv: Server, message: bytes, bdat: bool) -> bytes:
    start = b"EHLO x\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<alice@a.test>\r\n"
    if bdat:
        data = b"BDAT %d LAST\r\n" % len(message) + message
    else:
        data = b"DATA\r\n" + message + b".\r\n"
    out = converse(srv, start + data + b"QUIT\r\n")
    return out.split(b"\r\n")[-3]  # the reply to the message, before QUIT's 221


@pytest.mark.parametrize("bdat", [False, True], ids=["data", "bdat"])
def test_header_section_at_the_limit_is_accepted_one_over_refused(srv: Server, bdat: bool) -> None:
    body = b"\r\nbody\r\n"
    assert send(srv, header_section(LIMIT) + body, bdat).startswith(b"250 ")
    assert send(srv, header_section(LIMIT + 1) + body, bdat).startswith(b"552 5.3.4")
    assert send(srv, header_section(LIMIT + 40) + body, bdat).startswith(b"552 5.3.4")
    # A message of one header section and no empty line or body: the same limit.
    assert send(srv, header_section(LIMIT), bdat).startswith(b"250 ")
    assert send(srv, header_section(LIMIT + 1), bdat).startswith(b"552 5.3.4")


@pytest.mark.parametrize("bdat", [False, True], ids=["data", "bdat"])
def test_a_message_without_a_header_section_is_not_too_large(srv: Server, bdat: bool) -> None:
    """A first line that is no header field makes the message all body (mail-handling.md),
    but every octet up to the first empty line was counted as its header section: a
    headerless message over ``header_size`` without an empty line got 552 5.3.4. The
    section ends at the first line that is neither a field nor a continuation."""
    body = b"body line of text\r\n" * 60  # 1,140 octets, no empty line
    assert send(srv, b"hello world\r\n" + body, bdat).startswith(b"250 ")
    assert send(srv, b"no header " + b"h" * 2 * LIMIT + b"\r\n", bdat).startswith(b"250 ")
    # Fields, then a line that is none: the fields are the section, the rest is body.
    assert send(srv, b"Subject: s\r\n\tcontinued\r\n" + body, bdat).startswith(b"250 ")
    # A section of fields over the limit is still refused, continuations counted.
    big = b"Subject: s\r\n" + b"\tcontinued line\r\n" * 40
    assert send(srv, big + body, bdat).startswith(b"552 5.3.4")
