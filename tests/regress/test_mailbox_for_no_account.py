"""Mail stored where nobody can read it: an alias to a user that does not exist (or to
itself) made a Maildir for an address without an account, and ``user del bob`` left
``team -> alice, bob`` delivering into bob's Maildir. Now a local alias target must be a user
or an alias (``alias add`` exits 1 naming it), ``user del`` takes the user out of every alias
(and says which), and delivery never makes a Maildir for an address without an account
(postmaster aside): not at RCPT, not for a queued retry, not for a DSN to a local sender."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from postroom.storage.local.queue import LocalQueue
from tests.conftest import Server, ServerFactory


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    s = server_factory(services=("smtp",))
    s.add_user("alice@a.test")
    s.add_user("bob@a.test")
    return s


def send(srv: Server, rcpt: str) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
        c.sendmail("x@remote.test", [rcpt], b"Subject: t\r\n\r\nhello\r\n")


def test_alias_to_unknown_local_user_is_refused(srv: Server) -> None:
    p = srv.cli("alias", "add", "a1@a.test", "nosuch@a.test", check=False)
    assert p.returncode == 1
    assert "nosuch@a.test" in p.stderr
    assert "a1@a.test" not in srv.cli("alias", "list").stdout
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(srv, "a1@a.test")
    assert not srv.maildir("nosuch@a.test").exists()
    assert not srv.maildir("a1@a.test").exists()


def test_alias_to_itself_makes_no_maildir(srv: Server) -> None:
    p = srv.cli("alias", "add", "self@a.test", "self@a.test", check=False)
    assert p.returncode == 1 and "self@a.test" in p.stderr
    # An existing alias may not point back at itself either (nobody would read that copy)...
    srv.cli("alias", "add", "team@a.test", "alice@a.test")
    p = srv.cli("alias", "add", "team@a.test", "team@a.test", check=False)
    assert p.returncode == 1 and "team@a.test" in p.stderr
    # ...but a user may keep a copy of what its alias forwards.
    srv.cli("alias", "add", "alice@a.test", "alice@a.test", "bob@a.test")
    send(srv, "team@a.test")
    assert len(srv.wait_messages("alice@a.test", 1)) == 1
    assert len(srv.wait_messages("bob@a.test", 1)) == 1
    assert not srv.maildir("self@a.test").exists()
    assert not srv.maildir("team@a.test").exists()


def test_user_del_leaves_every_alias(srv: Server) -> None:
    srv.cli("alias", "add", "team@a.test", "alice@a.test", "bob@a.test")
    srv.cli("alias", "add", "sales@a.test", "bob@a.test", "x@remote.test")
    p = srv.cli("user", "del", "bob@a.test")
    assert "team@a.test" in p.stdout and "sales@a.test" in p.stdout
    listing = srv.cli("alias", "list").stdout
    assert "team@a.test\talice@a.test\n" in listing
    assert "bob@" not in listing
    send(srv, "team@a.test")
    assert len(srv.wait_messages("alice@a.test", 1)) == 1
    assert srv.messages("bob@a.test") == []


def _queue(data_dir: Path, sender: str, rcpt: str) -> str:
    """A message waiting in the queue (queued before the account went)."""
    queue = LocalQueue(data_dir, "mx.a.test")
    return queue.add_waiting(
        sender, [rcpt], b"Subject: queued\r\n\r\nqueued before the account went\r\n"
    )


def test_queued_retry_makes_no_maildir(srv: Server) -> None:
    srv.stop()
    _queue(srv.data_dir, "alice@a.test", "ghost@a.test")
    _queue(srv.data_dir, "ghost@a.test", "ghost@a.test")  # made-up local sender: no DSN
    srv.start()
    bounces = srv.wait_messages("alice@a.test", 1)
    assert len(bounces) == 1 and b"5.1.1" in bounces[0]
    deadline = time.monotonic() + 10
    while srv.cli("queue", "list").stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.cli("queue", "list").stdout == ""
    assert not srv.maildir("ghost@a.test").exists()
