"""A real ``postroom serve`` on loopback, driven by smtplib, swaks and raw sockets."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import time

import pytest

from tests.conftest import Server, ServerFactory, free_port, need_tool, wait_until

# Trace fields, and the Authentication-Results the MX port puts on top (with their folds).
TRACE = (b"Return-Path:", b"Delivered-To:", b"Received:", b"Authentication-Results:", b"\t")


def strip_trace(stored: bytes) -> bytes:
    """The stored message without the trace header lines postroom adds on top."""
    lines = stored.split(b"\r\n")
    i = 0
    while i < len(lines) and lines[i].startswith(TRACE):
        i += 1
    return b"\r\n".join(lines[i:])


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    s = server_factory(
        domains=("a.test", "b.test"),
        extra_toml='[limits]\nmessage_size = "11MB"',
        services=("smtp", "submission", "submissions"),
    )
    s.add_user("alice@a.test")
    s.add_user("bob@b.test")
    return s


def send(srv: Server, rcpts: list[str], msg: bytes, sender: str = "x@remote.test") -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
        c.sendmail(sender, rcpts, msg)


@pytest.mark.parametrize(
    "body",
    [
        b"plain\r\n",
        b".leading dot\r\n..two dots\r\n.\r\nafter a lone dot line\r\n",
        "8-bit body: \u00e9\u00e8\u00e0 \u2603\r\n".encode(),
        b"x" * 998 + b"\r\n" + b"y" * 998 + b"\r\n",
    ],
    ids=["plain", "dots", "8bit", "998-octet-lines"],
)
def test_delivered_byte_for_byte(srv: Server, body: bytes) -> None:
    msg = b"From: x@remote.test\r\nTo: alice@a.test\r\nSubject: t\r\n\r\n" + body
    send(srv, ["alice@a.test"], msg)
    (stored,) = srv.wait_messages("alice@a.test", 1)
    assert strip_trace(stored) == msg
    assert stored.startswith(b"Return-Path: <x@remote.test>\r\n")
    assert b"by mx.a.test (postroom)" in stored


def test_ten_megabyte_message(srv: Server) -> None:
    line = b"0123456789" * 99 + b"\r\n"
    msg = b"Subject: big\r\n\r\n" + line * (10 * 1024 * 1024 // len(line))
    send(srv, ["alice@a.test"], msg)
    (stored,) = srv.wait_messages("alice@a.test", 1, timeout=30)
    assert strip_trace(stored) == msg


def test_size_overflow(srv: Server) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"]) as c:
        c.ehlo()
        assert c.esmtp_features["size"] == str(11 * 1024 * 1024)
        code, text = c.mail("x@remote.test", ["SIZE=20000000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        c.rset()
        c.mail("x@remote.test")
        c.rcpt("alice@a.test")
        code, text = c.data(b"x" * (12 * 1024 * 1024))
        assert (code, text[:5]) == (552, b"5.3.4")
        assert c.noop()[0] == 250
    assert srv.messages("alice@a.test") == []


def test_policy_replies(srv: Server) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"]) as c:
        c.ehlo()
        assert c.mail("<>")[0] == 250
        code, text = c.rcpt("nobody@a.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = c.rcpt("someone@elsewhere.test")
        assert (code, text[:5]) == (554, b"5.7.1")
        assert c.rcpt("postmaster@b.test")[0] == 250
        assert c.rcpt("BOB@B.TEST")[0] == 250
        assert "auth" not in c.esmtp_features
        assert c.verify("alice@a.test")[0] == 252
        c.data(b"Subject: hi\r\n\r\nx\r\n")
    assert len(srv.wait_messages("bob@b.test", 1)) == 1
    assert len(srv.wait_messages("postmaster@b.test", 1)) == 1


def test_aliases_expand_at_rcpt(srv: Server) -> None:
    srv.cli("alias", "add", "team@a.test", "alice@a.test", "bob@b.test")
    send(srv, ["team@a.test"], b"Subject: team\r\n\r\nhello\r\n")
    assert len(srv.wait_messages("alice@a.test", 1)) == 1
    assert len(srv.wait_messages("bob@b.test", 1)) == 1


def test_an_alias_loop_is_refused_at_rcpt(srv: Server) -> None:
    # It was accepted with no recipient left, and the message went nowhere.
    # A target must exist when added: make the loop through a user who then goes.
    srv.add_user("carol@a.test")
    srv.cli("alias", "add", "loop1@a.test", "carol@a.test")
    srv.cli("alias", "add", "loop2@a.test", "loop1@a.test")
    srv.cli("alias", "add", "loop1@a.test", "loop2@a.test")
    srv.cli("user", "del", "carol@a.test")
    srv.cli("alias", "add", "copy@a.test", "loop1@a.test", "alice@a.test")
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.ehlo()
        c.mail("x@r.test")
        assert c.rcpt("loop1@a.test")[0] == 550
        assert c.rcpt("copy@a.test")[0] == 250  # loops inside a wider alias are skipped
        c.data(b"Subject: copy\r\n\r\nx\r\n")
    assert len(srv.wait_messages("alice@a.test", 1)) == 1
    assert not srv.maildir("copy@a.test").exists()  # an alias has no Maildir of its own


def test_success_dsn_to_a_local_sender_follows_its_aliases(srv: Server) -> None:
    # A DSN went to a Maildir named after the sender's local part, whoever it was: an alias
    # sender's user never saw it, and anyone could make Maildirs (or a retry loop, with a
    # local part no directory may have) by sending from made-up local addresses.
    srv.cli("alias", "add", "sales@a.test", "alice@a.test")
    for sender in ("sales@a.test", "ghost@a.test", '"a/b"@a.test'):
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.ehlo()
            c.mail(sender)
            assert c.rcpt("alice@a.test", ["NOTIFY=SUCCESS"])[0] == 250
            assert c.data(b"Subject: dsn please\r\n\r\nx\r\n")[0] == 250
    msgs = srv.wait_messages("alice@a.test", 4)  # three messages and the one DSN to sales@
    assert sum(b"multipart/report" in m for m in msgs) == 1
    wait_until(lambda: srv.log.read_text().count("no DSN: the local sender") == 2)
    wait_until(srv.queue_empty)
    assert sorted(p.name for p in (srv.data_dir / "mail" / "a.test").iterdir()) == ["alice"]
    assert srv.cli("queue", "list").stdout == ""
    assert srv.log.read_text().count("no DSN: the local sender") == 2


def test_an_alias_of_several_mailboxes_is_reported_expanded_once(srv: Server) -> None:
    # RFC 3461 §6.2.7.3, RFC 3464 §2.3.3: NOTIFY=SUCCESS for an alias of several mailboxes
    # got "Action: delivered" once per mailbox; the expansion is the alias's own last step,
    # reported once as "expanded" for the alias, with its ORCPT. An alias of one mailbox is
    # a forward (§6.2.7.2): its mailbox's "delivered", naming the alias as original recipient.
    # Two aliases of the same mailboxes in one message, and one of them spelled two ways: a
    # notice for each alias (a member carried its name, and the second found none free: its
    # members got "delivered" under the first one's name).
    srv.add_user("carol@b.test")
    srv.cli("alias", "add", "team@b.test", "bob@b.test", "carol@b.test")
    srv.cli("alias", "add", "one@b.test", "carol@b.test")
    srv.cli("alias", "add", "crew@b.test", "bob@b.test", "carol@b.test")
    for aliases in (["team@b.test"], ["one@b.test"], ["team@b.test", "Crew@b.test", "TEAM@b.test"]):
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
            c.ehlo()
            c.mail("alice@a.test")
            for alias in aliases:
                assert c.rcpt(alias, ["NOTIFY=SUCCESS", f"ORCPT=rfc822;{alias}"])[0] == 250
            assert c.data(f"Subject: to {aliases[-1]}\r\n\r\nx\r\n".encode())[0] == 250
    reports = srv.wait_messages("alice@a.test", 3)
    assert len(srv.wait_messages("bob@b.test", 2)) == 2
    assert len(srv.wait_messages("carol@b.test", 3)) == 3
    (both,) = [r for r in reports if b"Subject: to TEAM@b.test" in r]
    assert both.count(b"\r\nAction: ") == 2 and both.count(b"\r\nAction: expanded\r\n") == 2
    assert b"\r\nFinal-Recipient: rfc822; team@b.test\r\n" in both
    assert b"\r\nFinal-Recipient: rfc822; Crew@b.test\r\n" in both
    assert b"\r\nOriginal-Recipient: rfc822; Crew@b.test\r\n" in both
    (team,) = [r for r in reports if b"Subject: to team@b.test" in r]
    (one,) = [r for r in reports if b"Subject: to one@b.test" in r]
    assert team.count(b"\r\nAction: ") == 1 and b"\r\nAction: expanded\r\n" in team
    assert b"\r\nFinal-Recipient: rfc822; team@b.test\r\n" in team
    assert b"\r\nOriginal-Recipient: rfc822; team@b.test\r\n" in team
    assert one.count(b"\r\nAction: ") == 1 and b"\r\nAction: delivered\r\n" in one
    assert b"\r\nFinal-Recipient: rfc822; carol@b.test\r\n" in one
    assert b"\r\nOriginal-Recipient: rfc822; one@b.test\r\n" in one
    wait_until(srv.queue_empty)
    assert len(srv.messages("alice@a.test")) == 3


def test_received_says_smtp_after_helo_and_esmtp_after_ehlo(srv: Server) -> None:
    for hello in ("helo", "ehlo"):
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
            getattr(c, hello)("client.r.test")
            c.sendmail("x@r.test", ["alice@a.test"], f"Subject: {hello}\r\n\r\nx\r\n")
    by_subject = {m.split(b"Subject: ")[1][:4]: m for m in srv.wait_messages("alice@a.test", 2)}
    assert b"(postroom) with SMTP id " in by_subject[b"helo"]  # RFC 3848
    assert b"(postroom) with ESMTP id " in by_subject[b"ehlo"]


def test_received_names_an_ipv6_client_as_an_ipv6_literal(server_factory: ServerFactory) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    port = free_port()  # free on 127.0.0.1, and most likely on ::1 too
    srv = server_factory(domains=("a.test",), services=("smtp",), host="::1", ports={"smtp": port})
    srv.add_user("alice@a.test")
    with smtplib.SMTP("::1", srv.ports["smtp"], timeout=20) as c:
        c.sendmail("x@r.test", ["alice@a.test"], b"Subject: v6\r\n\r\nx\r\n")
    (msg,) = srv.wait_messages("alice@a.test", 1)
    assert b"([IPv6:::1])" in msg  # RFC 5321 §4.1.3
    swaks = need_tool("swaks")  # (its -6 needs IO::Socket::INET6: libio-socket-inet6-perl)
    proc = subprocess.run(
        [swaks, "-6", "--server", "::1", "--port", str(port), "--to", "alice@a.test"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(srv.wait_messages("alice@a.test", 2)) == 2


def test_raw_pipelining_and_bdat(srv: Server) -> None:
    with socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 mx.a.test")
        s.sendall(
            b"EHLO c\r\nMAIL FROM:<x@r.test>\r\nRCPT TO:<alice@a.test>\r\n"
            b"BDAT 17 LAST\r\nSubject: b\r\n\r\nb\r\nQUIT\r\n"
        )
        lines = f.read().split(b"\r\n")
    codes = [ln[:4] for ln in lines if ln[3:4] == b" "]
    assert codes == [b"250 ", b"250 ", b"250 ", b"250 ", b"221 "]
    (stored,) = srv.wait_messages("alice@a.test", 1)
    assert strip_trace(stored) == b"Subject: b\r\n\r\nb\r\n"


def test_swaks_delivers(srv: Server) -> None:
    swaks = need_tool("swaks")
    proc = subprocess.run(
        [
            swaks,
            "--server",
            f"{srv.host}:{srv.ports['smtp']}",
            "--to",
            "alice@a.test",
            "--from",
            "s@remote.test",
            "--header",
            "Subject: via swaks",
            "--body",
            "swaks body",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (stored,) = srv.wait_messages("alice@a.test", 1)
    assert b"Subject: via swaks" in stored and b"swaks body" in stored


def test_kill9_after_250_delivers_exactly_once(srv: Server) -> None:
    for i in range(5):
        send(srv, ["alice@a.test"], f"Subject: n{i}\r\n\r\nbody {i}\r\n".encode())
    srv.kill9()
    srv.start()
    srv.wait_messages("alice@a.test", 5)
    wait_until(srv.queue_empty)  # recovery has run to its end: nothing more will come
    msgs = srv.messages("alice@a.test")
    subjects = sorted(m.split(b"Subject: ")[1].split(b"\r\n")[0] for m in msgs)
    assert subjects == [f"n{i}".encode() for i in range(5)]


def test_recovery_completes_spooled_but_undelivered(srv: Server) -> None:
    """A message in the journal but not delivered before a crash is delivered after restart,
    once."""
    srv.stop()
    from postroom.queue.envelope import Envelope, Recipient
    from postroom.storage.local import journal

    env = Envelope(
        id="TESTRECOVERY1",
        sender="x@r.test",
        recipients=[Recipient("alice@a.test")],
        created=time.time(),
    )
    body = b"Return-Path: <x@r.test>\nSubject: recovered\n\nbody\n"
    entry = journal.Entry(1, env.id, env.to_json(), (), body, keep=True)
    records = [*journal.encode_start(journal.boot_id()), *journal.encode_entry(entry)]
    (srv.data_dir / "journal" / f"1.1{journal.SUFFIX}").write_bytes(b"".join(records))
    srv.start()
    msgs = srv.wait_messages("alice@a.test", 1)
    assert len(msgs) == 1 and b"Subject: recovered" in msgs[0]
    wait_until(srv.queue_empty, what="the replayed message released")
    assert len(srv.messages("alice@a.test")) == 1  # and not published twice


def test_sigterm_exits_zero_quickly(srv: Server) -> None:
    c = socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10)
    f = c.makefile("rb")
    f.readline()
    t0 = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - t0 < 10
    assert f.readline().startswith(b"421")
    c.close()


def test_a_message_still_coming_at_the_stop_deadline_gets_421(srv: Server) -> None:
    # A client dripping its DATA past the stop's 8 s grace saw the connection close with no
    # reply (RFC 5321 §3.8 wants the 421 first), and no line said which client lost its mail.
    c = socket.create_connection((srv.host, srv.ports["smtp"]), timeout=15)
    f = c.makefile("rb")
    f.readline()
    c.sendall(b"EHLO c.test\r\nMAIL FROM:<x@r.test>\r\nRCPT TO:<alice@a.test>\r\nDATA\r\n")
    for _ in range(40):  # the EHLO lines, MAIL, RCPT, DATA
        line = f.readline()
        if not line or line.startswith(b"354"):
            break
    assert line.startswith(b"354"), line
    c.sendall(b"Subject: slow\r\n\r\npart of it\r\n")
    log = srv.log
    assert srv.stop() == 0
    assert f.readline().startswith(b"421 4.3.2")
    c.close()
    assert "cut off by the stop" in log.read_text()
    assert srv.messages("alice@a.test") == []
