"""A DKIM signature made at submission would break if a relay hop re-encoded the message later
(8-bit to a peer without 8BITMIME, lines over 998 octets). Submitted mail with a remote
recipient is therefore made 7-bit with short lines at intake, before it is signed and queued
(RFC 6376 §5.3): what is signed is what is sent. Mail that stays here (all recipients local)
and mail that came in on the MX port are stored as they came."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest

from postroom.delivery.mime_downgrade import needs_downgrade
from tests.conftest import Server, ServerFactory, free_port, insecure

BODY = "Grüße, " + "lang " * 300 + "x" * 2000 + "\r\n"


def message(extra: str = "") -> bytes:
    return (
        "From: alice@a.test\r\nTo: bob@a.test\r\nSubject: 8 bit\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n" + BODY + extra
    ).encode()


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    # Remote recipients stay deferred: the only resolver named does not answer.
    dns = f'[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\ntimeout = "1s"'
    s = server_factory(domains=("a.test",), services=("smtp", "submission"), extra_toml=dns)
    s.add_user("alice@a.test", "pw")
    s.add_user("bob@a.test", "pw")
    return s


def stored(srv: Server, count: int) -> list[bytes]:
    msgs = srv.wait_messages("bob@a.test", count)
    assert len(msgs) == count
    return [m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for m in msgs]


@pytest.mark.parametrize("size", ["small", "spilled"])
def test_submitted_mail_is_stored_as_it_will_be_sent(srv: Server, size: str) -> None:
    # "spilled": over the 1 MiB kept in memory, so the spool file is rewritten.
    data = message("y" * 70 + "\r\n" if size == "small" else ("z" * 76 + "\r\n") * 15000)
    with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
        c.starttls(context=insecure())
        c.login("alice@a.test", "pw")
        c.sendmail("alice@a.test", ["bob@a.test", "carol@remote.test"], data)
    (got,) = stored(srv, 1)
    assert not needs_downgrade(got, eight_bit=False)  # no relay hop will change it
    msg = email.message_from_bytes(got, policy=email.policy.compat32)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_payload(decode=True) == data.split(b"\r\n\r\n", 1)[1]


def test_submitted_mail_that_stays_here_is_kept_as_it_came(srv: Server) -> None:
    data = message()
    with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
        c.starttls(context=insecure())
        c.login("alice@a.test", "pw")
        c.sendmail("alice@a.test", ["bob@a.test"], data)
    (got,) = stored(srv, 1)
    assert got.endswith(data)


def test_mail_from_the_mx_port_is_kept_as_it_came(srv: Server) -> None:
    data = message()
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
        c.sendmail("x@remote.test", ["bob@a.test"], data)
    (got,) = stored(srv, 1)
    assert got.endswith(data)
