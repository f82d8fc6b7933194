"""Catch-all aliases: ``alias add @DOMAIN TARGET`` takes the mail for every address of a local
domain that is neither a user nor an alias (``*@DOMAIN`` means the same). Before, ``@DOMAIN``
was "malformed" and ``*@DOMAIN`` was stored as a literal address nobody could write to."""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import Server, ServerFactory


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    s = server_factory(domains=("a.test", "b.test"), services=("smtp",))
    s.add_user("alice@a.test")
    s.add_user("bob@b.test")
    return s


def send(srv: Server, rcpt: str, subject: str) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
        c.sendmail("x@remote.test", [rcpt], f"Subject: {subject}\r\n\r\nhi\r\n".encode())


def test_catch_all_takes_unknown_addresses(srv: Server) -> None:
    srv.cli("alias", "add", "@B.test", "alice@a.test")
    srv.cli("alias", "add", "sales@b.test", "bob@b.test")
    assert "@b.test\talice@a.test\n" in srv.cli("alias", "list").stdout
    send(srv, "Anything@b.test", "caught")
    send(srv, "bob@b.test", "user")  # a user keeps its own mail
    send(srv, "sales@b.test", "alias")  # so does an alias
    send(srv, "postmaster@b.test", "postmaster")  # and postmaster its own Maildir
    caught = srv.wait_messages("alice@a.test", 1)
    assert len(caught) == 1 and b"Subject: caught" in caught[0]
    # In alice's Maildir (no Delivered-To: every local copy of a message is one file, linked
    # into each Maildir); the trace names the address it was sent to.
    assert b"\tfor <Anything@b.test>;" in caught[0]
    assert len(srv.wait_messages("bob@b.test", 2)) == 2
    assert len(srv.wait_messages("postmaster@b.test", 1)) == 1
    assert not srv.maildir("anything@b.test").exists()
    # Only that domain: a.test has no catch-all.
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(srv, "nobody@a.test", "refused")
    # Removing it restores 550 for unknown addresses.
    srv.cli("alias", "del", "@b.test")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(srv, "anything@b.test", "refused")


def test_star_form_and_bad_catch_alls(srv: Server) -> None:
    srv.cli("alias", "add", "*@b.test", "bob@b.test")
    assert "@b.test\tbob@b.test\n" in srv.cli("alias", "list").stdout
    assert "*@" not in srv.cli("alias", "list").stdout
    p = srv.cli("alias", "add", "@c.test", "bob@b.test", check=False)
    assert p.returncode == 1 and "c.test" in p.stderr
    p = srv.cli("alias", "add", "@a.test", "ghost@a.test", check=False)
    assert p.returncode == 1 and "ghost@a.test" in p.stderr
    # A user deleted later leaves the catch-all too: nothing is stored for it.
    srv.cli("alias", "add", "@a.test", "alice@a.test")
    assert "@a.test" in srv.cli("user", "del", "alice@a.test").stdout
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(srv, "anything@a.test", "refused")
