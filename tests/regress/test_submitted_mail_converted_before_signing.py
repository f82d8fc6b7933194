"""A DKIM signature made at submission would break if a relay hop re-encoded the message later
(8-bit to a peer without 8BITMIME, lines over 998 octets). Submitted mail with a remote
recipient is therefore made 7-bit with short lines at intake, before it is signed and queued
(RFC 6376 §5.3): what is signed is what is sent. Mail that stays here (all recipients local)
and mail that came in on the MX port are stored as they came."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
import threading
import time
from collections.abc import Iterator

import pytest

from postroom.delivery.mime_downgrade import needs_downgrade
from tests.conftest import Server, ServerFactory, free_port, insecure
from tests.dnszone import LoopbackDNS
from tests.integration.test_remote_delivery import Sink
from tests.integration.test_sender_auth import _toml, dkim_results, publish, wait_signed

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


class ThreadedSink:
    """A Sink (see test_remote_delivery) on its own event loop, for a server in a subprocess."""

    def __init__(self, host: str, port: int, extensions: tuple[str, ...]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        start = Sink(host, port, extensions=extensions).start()
        self.sink = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)

    def stop(self) -> None:
        async def stop() -> None:
            await self.sink.stop()
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    server = LoopbackDNS()
    yield server
    server.stop()


def test_the_signature_survives_a_hop_without_8bitmime(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    port = free_port("127.0.0.2")
    hop = ThreadedSink("127.0.0.2", port, ("PIPELINING", "SIZE 10000000", "ENHANCEDSTATUSCODES"))
    try:
        srv = server_factory(
            domains=("a.test",), extra_toml=_toml(dns, f"[delivery]\nport = {port}\n")
        )
        srv.add_user("alice@a.test", "pw")
        srv.add_user("bob@a.test", "pw")
        dns.mx("b.test", 10, "mx.b.test")
        dns.a("mx.b.test", "127.0.0.2")
        publish(srv, dns, "a.test")
        wait_signed(srv, "alice@a.test", "bob@a.test", dns)  # it signs from now on
        with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
            c.starttls(context=insecure())
            c.login("alice@a.test", "pw")
            c.sendmail("alice@a.test", ["carol@b.test"], message().replace(b"bob@a", b"carol@b"))
        deadline = time.monotonic() + 30
        while not hop.sink.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        (sent,) = [m.data for m in hop.sink.messages]
        srv.stop()  # it QUITs the session it keeps open to the hop
    finally:
        hop.stop()
    assert sent.isascii()
    assert max(map(len, sent.split(b"\r\n"))) <= 998
    results = sorted(dkim_results(sent, dns))
    assert results == [("ed25519", True), ("rsa", True)], sent[:3000]
