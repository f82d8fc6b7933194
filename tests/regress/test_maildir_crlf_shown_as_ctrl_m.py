"""Maildir files end their lines with LF (mutt showed ``^M`` on every header line when they
kept the wire's CRLF), and their names carry Dovecot's ``,S=`` (file size) and ``,W=`` (size
with CRLF line ends) exactly, for DATA, BDAT in several chunks, and a message large enough
to go through a body file."""

from __future__ import annotations

import smtplib
import socket

from postroom.storage.local import maildir
from tests.conftest import ServerFactory


def test_maildir_files_have_lf_line_ends_and_exact_sizes(server_factory: ServerFactory) -> None:
    srv = server_factory(domains=("a.test",), services=("smtp",))
    srv.add_user("alice@a.test")
    big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 300
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.sendmail("x@r.test", ["alice@a.test"], b"Subject: data\r\n\r\nline one\r\nline two\r\n")
        c.sendmail("x@r.test", ["alice@a.test"], big)
    with socket.create_connection((srv.host, srv.ports["smtp"]), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        # The CRLF of a line split across two chunks, and a chunk that ends in CR.
        s.sendall(
            b"EHLO c\r\nMAIL FROM:<x@r.test>\r\nRCPT TO:<alice@a.test>\r\n"
            b"BDAT 11\r\nSubject: b\r"
            b"BDAT 12 LAST\r\n\n\r\nchunked\r\nQUIT\r\n"
        )
        assert f.read().count(b"250 ") == 5
    files = srv.files("alice@a.test")
    assert len(files) == 3
    for path in files:
        data = path.read_bytes()
        assert b"\r" not in data, path.name
        assert data.startswith(b"Return-Path: <x@r.test>\n")
        assert maildir.name_field(path.name, "S") == len(data)
        assert maildir.name_field(path.name, "W") == len(data) + data.count(b"\n")
    assert any(p.read_bytes().endswith(b"\nSubject: b\n\nchunked\n") for p in files)
