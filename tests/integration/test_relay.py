"""Issue 5: two postroom instances, DNS on loopback, MX routing, retries, bounces, kill -9.

a.test is served on 127.0.0.2 and b.test (plus some test domains) on 127.0.0.3, both with the
smtp port P, which is also ``[delivery] port``: "the other MX on port 25" in miniature.
"""

from __future__ import annotations

import contextlib
import datetime
import email
import json
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from email.message import Message

import pytest

from tests.conftest import Server, ServerFactory, free_port, insecure, wait_until
from tests.dnszone import LoopbackDNS

A_IP, B_IP, DOWN_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
POP3 = ("pop3",)


def common_port() -> int:
    """A TCP port free on all three test addresses."""
    for _ in range(50):
        port = free_port(A_IP)
        ok = True
        for ip in (B_IP, DOWN_IP):
            with socket.socket() as s:
                try:
                    s.bind((ip, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no common free port")


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    zone = LoopbackDNS()
    zone.mx("a.test", 10, "mx.a.test")
    zone.a("mx.a.test", A_IP)
    zone.mx("b.test", 10, "mx.b.test")
    zone.a("mx.b.test", B_IP)
    zone.mx("backup.test", 10, "down.backup.test")
    zone.a("down.backup.test", DOWN_IP)
    zone.mx("backup.test", 20, "mx.b.test")
    zone.a("plain.test", B_IP)
    zone.mx("nullmx.test", 0, ".")
    yield zone
    zone.stop()


class Pair:
    def __init__(self, factory: ServerFactory, dns: LoopbackDNS, sender_extra: str = "") -> None:
        port = common_port()
        delivery = (
            f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "3s"\n'
            f'[delivery]\nport = {port}\nconnect_timeout = "3s"\n'
        )
        self.a = factory(
            domains=("a.test",),
            host=A_IP,
            name="a",
            ports={"smtp": port},
            services=("smtp", "submission", *POP3),
            extra_toml=delivery + sender_extra,
        )
        self.b = factory(
            domains=("b.test", "backup.test", "plain.test"),
            host=B_IP,
            name="b",
            ports={"smtp": port},
            services=("smtp", *POP3),
            extra_toml=delivery,
        )
        self.a.add_user("alice@a.test", "alice-pw")
        for user in ("bob@b.test", "bob@backup.test", "bob@plain.test"):
            self.b.add_user(user)

    def submit(self, rcpts: list[str], subject: str = "hello") -> None:
        msg = (
            f"From: alice@a.test\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\n"
            f"body of {subject}\r\n"
        ).encode()
        with smtplib.SMTP(self.a.host, self.a.ports["submission"], timeout=30) as c:
            c.starttls(context=insecure())
            c.login("alice@a.test", "alice-pw")
            c.sendmail("alice@a.test", rcpts, msg)


def queue(srv: Server) -> list[dict[str, object]]:
    return list(json.loads(srv.cli("queue", "list", "--json").stdout))


def wait_for(predicate: Callable[[], object], timeout: float = 20) -> bool:
    with contextlib.suppress(AssertionError):
        return bool(wait_until(predicate, timeout, interval=0.1))
    return False


def dsn_parts(raw: bytes) -> tuple[Message, list[Message]]:
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    status = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    return msg, list(status.get_payload())  # type: ignore[arg-type]


def test_submit_to_remote_domain_and_fetch_with_pop3(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    pair = Pair(server_factory, dns)
    pair.submit(["bob@b.test"], "over the wire")
    (stored,) = pair.b.wait_messages("bob@b.test", 1)
    assert b"Subject: over the wire" in stored
    assert stored.count(b"Received: ") == 2  # a.test's and b.test's
    # RFC 6409 §8.2-8.3: submitted mail that leaves gets the Date and Message-ID it lacked.
    assert b"\r\nDate: " in stored and b"\r\nMessage-ID: <" in stored
    assert wait_for(lambda: queue(pair.a) == [])
    import poplib

    pop = poplib.POP3(B_IP, pair.b.ports["pop3"], timeout=20)
    pop.stls(context=insecure())
    pop.user("bob@b.test")
    pop.pass_("secret")
    _resp, lines, _octets = pop.retr(1)
    assert b"Subject: over the wire" in lines
    pop.quit()


def test_mx_preference_backup_and_implicit_a(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    pair = Pair(server_factory, dns)
    pair.submit(["bob@backup.test", "bob@plain.test"], "routing")
    assert len(pair.b.wait_messages("bob@backup.test", 1)) == 1
    assert len(pair.b.wait_messages("bob@plain.test", 1)) == 1


def test_null_mx_nxdomain_and_unknown_user_bounce(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    pair = Pair(server_factory, dns)
    pair.submit(["nobody@b.test", "x@nullmx.test", "y@nonexistent.test"], "doomed")

    def bounced() -> dict[str, tuple[str, str]] | None:
        """(action, status) by recipient once bounces name all three (one bounce or several:
        either is right)."""
        found = {
            part["Final-Recipient"].split(";")[1].strip(): (part["Action"], part["Status"])
            for raw in pair.a.messages("alice@a.test")
            for part in dsn_parts(raw)[1][1:]
            if part["Action"]
        }
        return found if len(found) >= 3 else None

    statuses = wait_until(bounced, 20, "bounces naming all three recipients")
    for raw in pair.a.messages("alice@a.test"):
        report, _ = dsn_parts(raw)
        assert report["From"].startswith("MAILER-DAEMON@")
        assert raw.startswith(b"Return-Path: <>")
        headers = next(
            p
            for p in report.walk()
            if p.get_content_type() in ("text/rfc822-headers", "message/rfc822")
        )
        assert "Subject: doomed" in str(headers.get_payload()) or "doomed" in headers.as_string()
    assert statuses == {  # RFC 3463 §3.2; 5.1.10: RFC 7505 §3 (null MX)
        "nobody@b.test": ("failed", "5.1.1"),
        "x@nullmx.test": ("failed", "5.1.10"),
        "y@nonexistent.test": ("failed", "5.1.2"),
    }
    assert wait_for(lambda: queue(pair.a) == [])


def test_deferred_then_flush_delivers_once_even_across_kill9(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    pair = Pair(server_factory, dns)
    pair.b.stop()
    pair.submit(["bob@b.test"], "later\x1b[2J")  # a terminal escape: "clear the screen"
    assert wait_for(
        lambda: [r["status"] for q in queue(pair.a) for r in q["recipients"]] == ["deferred"]
    )  # type: ignore[index,union-attr]
    (entry,) = queue(pair.a)
    assert entry["attempts"] == 1 and entry["next_attempt"]
    assert pair.a.cli("queue", "list").stdout.startswith(str(entry["id"]))
    shown = pair.a.cli("queue", "show", str(entry["id"])).stdout
    assert "later" in shown and "attempt: " in shown and f"mx.b.test[{B_IP}]" in shown
    assert "\x1b" not in shown and "later?[2J" in shown  # nothing acts on the terminal
    detail = json.loads(pair.a.cli("queue", "show", str(entry["id"]), "--json").stdout)
    # The list's object, its "attempts" (a count there) now the attempts themselves.
    assert {k: v for k, v in detail.items() if k != "attempts"} == {
        k: v for k, v in entry.items() if k != "attempts"
    }
    (attempt,) = detail["attempts"]
    assert attempt["recipients"] == ["bob@b.test"] and attempt["host"] == "mx.b.test"
    assert attempt["ip"] == B_IP and attempt["tls"] is False
    assert "connect to" in attempt["reply"] and attempt["time"].endswith("Z")
    pair.a.kill9()
    pair.a.start()
    assert [q["id"] for q in queue(pair.a)] == [entry["id"]]
    again = json.loads(pair.a.cli("queue", "show", str(entry["id"]), "--json").stdout)
    assert again["attempts"] == detail["attempts"]  # the history is durable
    pair.a.stop()  # a flush without a running server: due at once, the next start tries it
    assert pair.a.cli("queue", "flush").returncode == 0
    (flushed,) = queue(pair.a)
    due = datetime.datetime.fromisoformat(str(flushed["next_attempt"]))
    assert abs(due.timestamp() - time.time()) < 60  # an ISO 8601 time, as always: now
    pair.b.start()
    pair.a.start()
    assert len(pair.b.wait_messages("bob@b.test", 1)) == 1
    assert wait_for(lambda: queue(pair.a) == [])  # nothing left that could be sent again
    assert len(pair.b.messages("bob@b.test")) == 1
    assert pair.a.messages("alice@a.test") == []  # no bounce


def test_max_queue_time_bounces(server_factory: ServerFactory, dns: LoopbackDNS) -> None:
    pair = Pair(server_factory, dns)
    pair.a.stop()
    text = pair.a.config.read_text().replace(
        # The next retry would be an hour away: the bounce still comes at max_queue_time.
        "[delivery]\n",
        '[delivery]\nmax_queue_time = "2s"\nretry_intervals = ["1h"]\n',
        1,
    )
    pair.a.config.write_text(text)
    pair.a.start()
    pair.b.stop()
    pair.submit(["bob@b.test"], "expiring")
    msgs = pair.a.wait_messages("alice@a.test", 1, timeout=20)
    assert len(msgs) == 1
    report, parts = dsn_parts(msgs[0])
    assert parts[1]["Action"] == "failed"
    assert "(postroom) id" in str(report["Received"])  # delivered here: traced like all mail
    assert wait_for(lambda: queue(pair.a) == [])


def test_queue_delete(server_factory: ServerFactory, dns: LoopbackDNS) -> None:
    pair = Pair(server_factory, dns)
    pair.b.stop()
    pair.submit(["bob@b.test"], "to delete")
    assert wait_for(lambda: len(queue(pair.a)) == 1 and queue(pair.a)[0]["attempts"] == 1)
    qid = str(queue(pair.a)[0]["id"])
    pair.a.cli("queue", "delete", qid)
    assert queue(pair.a) == []
    assert pair.a.cli("queue", "delete", qid, check=False).returncode == 1
    assert pair.a.messages("alice@a.test") == []


def test_queue_delete_during_an_attempt(server_factory: ServerFactory, dns: LoopbackDNS) -> None:
    # The CLI waited for the attempt, gave up after 30 s taking the silence for "no server",
    # and unlinked the files itself while the server went on (and saved state, and retried).
    pair = Pair(server_factory, dns)
    pair.b.stop()
    port = pair.a.ports["smtp"]
    with socket.create_server((B_IP, port)) as mute:  # accepts, says nothing, then hangs up
        pair.submit(["bob@b.test"], "deleted in flight")
        conn, _ = mute.accept()  # the attempt is in progress
        (entry,) = queue(pair.a)
        started = time.monotonic()
        pair.a.cli("queue", "delete", str(entry["id"]))
        assert time.monotonic() - started < 10
        assert queue(pair.a) == []
        conn.close()  # the attempt fails now: no retry, no state, no bounce for it
    time.sleep(1.5)
    assert queue(pair.a) == []
    assert list((pair.a.data_dir / "queue" / "state").iterdir()) == []
    assert pair.a.messages("alice@a.test") == []


def test_alias_with_remote_target_forwards(server_factory: ServerFactory, dns: LoopbackDNS) -> None:
    pair = Pair(server_factory, dns)
    pair.a.cli("alias", "add", "fwd@a.test", "alice@a.test", "bob@b.test")
    with smtplib.SMTP(pair.a.host, pair.a.ports["smtp"], timeout=30) as c:
        c.sendmail(
            "someone@elsewhere.test", ["fwd@a.test"], b"Subject: forwarded\r\n\r\nvia an alias\r\n"
        )
    assert len(pair.a.wait_messages("alice@a.test", 1)) == 1
    (fwd,) = pair.b.wait_messages("bob@b.test", 1)
    # Forwarded without SRS: the envelope sender is the original one.
    assert fwd.startswith(b"Return-Path: <someone@elsewhere.test>")
