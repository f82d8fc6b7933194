"""A message sent in BDAT chunks whose last octets are no CRLF (RFC 3030 lets a client do
that; DATA cannot: RFC 5321 §4.1.1.4) was stored as it came. POP3 then ended its last line for
the multi-line answer, and RETR sent 2 octets more than LIST and the ``+OK nn octets`` had
announced (RFC 1939 §5). The message now gets its final CRLF at the end of the last chunk."""

from __future__ import annotations

import poplib
import socket

from tests.conftest import Server, ServerFactory, first_line, insecure, wait_until


def test_pop3_sends_exactly_the_octets_it_lists(server_factory: ServerFactory) -> None:
    srv: Server = server_factory(services=("smtp", "pop3s"))
    srv.add_user("alice@a.test", "pw")
    body = b"Subject: chunks\r\n\r\nthe last line has no line end"
    with socket.create_connection((srv.host, srv.ports["smtp"]), timeout=20) as s:
        assert first_line(s).startswith(b"220 ")
        s.sendall(
            b"EHLO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<alice@a.test>\r\n"
            + b"BDAT %d LAST\r\n" % len(body)
            + body
            + b"QUIT\r\n"
        )
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert b"\r\n250 2.0.0 OK: queued as " in out, out
    wait_until(lambda: srv.files("alice@a.test"), what="the delivery")
    assert srv.messages("alice@a.test")[0].endswith(body + b"\r\n")

    pop = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=insecure(), timeout=20)
    pop.user("alice@a.test")
    pop.pass_("pw")
    _resp, listing, _ = pop.list()
    size = int(listing[0].split()[1])
    resp, lines, _octets = pop.retr(1)
    assert resp == b"+OK %d octets" % size
    # poplib strips each line's CRLF: put them back to count the octets that came.
    assert sum(len(line) + 2 for line in lines) == size
    pop.quit()
