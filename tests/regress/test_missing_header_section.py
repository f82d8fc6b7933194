"""A message with no header section (its first line is no header field) got Received (and, then,
Date/Message-ID) put straight above its first line, which then read as one more header field: the
body lost its first line. An empty line now ends the added header section, as Postfix's cleanup
does; a message that starts with the empty line (an empty header section) keeps just that one."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest

from tests.conftest import Server, ServerFactory, insecure


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    s = server_factory(domains=("a.test",), services=("smtp", "submission"))
    s.add_user("alice@a.test", "pw")
    s.add_user("bob@a.test", "pw")
    return s


def submit(srv: Server, data: bytes) -> None:
    with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
        c.starttls(context=insecure())
        c.login("alice@a.test", "pw")
        c.sendmail("alice@a.test", ["bob@a.test"], data)


def stored(srv: Server, count: int) -> list[bytes]:
    msgs = srv.wait_messages("bob@a.test", count)
    assert len(msgs) == count
    return [m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for m in msgs]


@pytest.mark.parametrize(
    "body",
    [
        b"Hello Bob,\r\nlunch at noon?\r\n",
        b"From the desk of Alice\r\nlunch?\r\n",  # mbox-like, no colon
        b"  indented first line\r\nlunch?\r\n",  # a continuation of nothing
    ],
)
def test_submitted_body_without_headers_stays_body(srv: Server, body: bytes) -> None:
    submit(srv, body)
    (got,) = stored(srv, 1)
    msg = email.message_from_bytes(got, policy=email.policy.compat32)
    assert msg["Received"] and msg["Date"] is None  # mail that stays here gets no Date
    assert msg.defects == []
    assert got.endswith(b"\r\n\r\n" + body)
    assert msg.get_payload() == body.decode()


def test_mx_mail_without_headers_stays_body(srv: Server) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
        c.sendmail("x@remote.test", ["bob@a.test"], b"no headers here\r\n")
    (got,) = stored(srv, 1)
    assert got.endswith(b"\r\n\r\nno headers here\r\n")


def test_empty_header_section_gets_no_second_blank_line(srv: Server) -> None:
    submit(srv, b"\r\nbody after an empty header section\r\n")
    (got,) = stored(srv, 1)
    assert got.endswith(b" +0000\r\n\r\nbody after an empty header section\r\n")  # Received
    assert b"\r\n\r\n\r\n" not in got


def test_headers_keep_their_place(srv: Server) -> None:
    submit(srv, b"Subject: hi\r\n\r\nbody\r\n")
    (got,) = stored(srv, 1)
    assert b"\r\nSubject: hi\r\n\r\nbody\r\n" in got
    assert got.count(b"\r\n\r\n") == 1
