"""Relaying with BDAT (RFC 3030) to a next hop that offers CHUNKING: a small message goes as one
``BDAT n LAST`` chunk, pipelined with MAIL and RCPT; a message over the client's limit goes
with DATA; both arrive as they were sent, with a dot at the start of a line left as it is in
the chunk and stuffed in DATA. Through the real server, a loopback DNS and a loopback sink."""

from __future__ import annotations

import smtplib

from postroom.smtp.client_engine import BDAT_MAX
from tests.conftest import ServerFactory, wait_until
from tests.smtpsink import relay_to_sink

HEAD = "From: alice@a.test\r\nTo: bob@b.test\r\nSubject: chunks\r\n\r\n"


def test_small_messages_go_with_bdat_and_large_ones_with_data(
    server_factory: ServerFactory,
) -> None:
    small = HEAD + "first line\r\n.a line with a dot\r\nlast\r\n"
    large = HEAD + ".dotted\r\n" + ("y" * 76 + "\r\n") * (BDAT_MAX // 78 + 1)
    with relay_to_sink(server_factory, ("CHUNKING", "8BITMIME")) as (srv, sink):
        for i, message in enumerate((small, large), 1):
            with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
                c.sendmail("alice@a.test", ["fwd@a.test"], message.encode())
            wait_until(lambda: len(sink.received) == i, 20, f"relayed message {i}")  # noqa: B023
        assert sink.ways == ["BDAT", "DATA"]
        by_bdat, by_data = sink.received
        assert by_bdat.endswith(small.encode())  # after our Received line; counted, not stuffed
        assert by_data.endswith(large.replace("\r\n.", "\r\n..").encode())  # stuffed
        assert srv.messages("alice@a.test") == []  # no bounce
