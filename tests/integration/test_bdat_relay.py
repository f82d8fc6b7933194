"""Relaying with BDAT (RFC 3030) to a next hop that offers CHUNKING: a small message goes as one
``BDAT n LAST`` chunk, pipelined with MAIL and RCPT; a message over the client's limit goes
with DATA; both arrive as they were sent, with a dot at the start of a line left as it is in
the chunk and stuffed in DATA. Through the real server, a loopback DNS and a loopback sink."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from postroom.smtp.client_engine import BDAT_MAX
from tests.conftest import Server, ServerFactory, wait_until
from tests.dnszone import LoopbackDNS
from tests.smtpsink import smtp_sink

HEAD = "From: alice@a.test\r\nTo: bob@b.test\r\nSubject: chunks\r\n\r\n"


@pytest.fixture
def relay(server_factory: ServerFactory) -> Iterator[tuple[Server, Any]]:
    """A server whose fwd@a.test goes to bob@b.test, at a sink that offers CHUNKING."""
    dns = LoopbackDNS()
    with smtp_sink(extensions=("CHUNKING", "8BITMIME")) as sink:
        dns.mx("b.test", 10, "mx.b.test")
        dns.a("mx.b.test", "127.0.0.1")
        srv = server_factory(
            services=("smtp",),
            extra_toml=(
                f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "3s"\n'
                f'[delivery]\nport = {sink.server_address[1]}\nconnect_timeout = "3s"\n'
            ),
        )
        srv.add_user("alice@a.test", "alice-pw")
        srv.cli("alias", "add", "fwd@a.test", "bob@b.test")
        yield srv, sink
    dns.stop()


def test_small_messages_go_with_bdat_and_large_ones_with_data(relay: tuple[Server, Any]) -> None:
    srv, sink = relay
    small = HEAD + "first line\r\n.a line with a dot\r\nlast\r\n"
    large = HEAD + ".dotted\r\n" + ("y" * 76 + "\r\n") * (BDAT_MAX // 78 + 1)
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.sendmail("alice@a.test", ["fwd@a.test"], small.encode())
    wait_until(lambda: sink.received, 20, "the small message")
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.sendmail("alice@a.test", ["fwd@a.test"], large.encode())
    wait_until(lambda: len(sink.received) == 2, 20, "the large message")
    assert sink.ways == ["BDAT", "DATA"]
    by_bdat, by_data = sink.received
    assert by_bdat.endswith(small.encode())  # after our Received line; counted, not stuffed
    assert by_data.endswith(large.replace("\r\n.", "\r\n..").encode())  # stuffed
    assert srv.messages("alice@a.test") == []  # no bounce
