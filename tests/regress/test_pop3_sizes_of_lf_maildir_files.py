"""POP3 over Maildir files with LF line ends: CRLF on the wire, and LIST/STAT exact.

Maildir files are stored with LF (as postroom now writes them, and Postfix and Dovecot do),
named ``,S=<file size>,W=<size with CRLF>``. RETR must send CRLF, and LIST, STAT and the RETR
answer's octet count must be the octets RETR sends (RFC 1939 §5, §11), for LF files, for
older CRLF files and for files from tools that name no ``,W=``; TOP cuts in the right place.
"""

from __future__ import annotations

import poplib
from pathlib import Path

import pytest

from tests.conftest import Server, ServerFactory, insecure

LF = b"Subject: lf\nFrom: a@b.test\n\n.starts with a dot\nline two\n\nlast\n"
CRLF = LF.replace(b"\n", b"\r\n")


@pytest.fixture
def srv(server_factory: ServerFactory) -> Server:
    s = server_factory(services=("pop3s",))
    s.add_user("alice@a.test", "pw")
    return s


def put(box: Path, name: str, data: bytes) -> None:
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    (box / "new" / name).write_bytes(data)


def test_lf_crlf_and_unnamed_files_have_exact_sizes_and_go_out_as_crlf(srv: Server) -> None:
    box = srv.maildir("alice@a.test")
    put(box, f"1700000001.M1.h,S={len(LF)},W={len(CRLF)}", LF)  # postroom, Dovecot
    put(box, f"1700000002.M2.h,S={len(CRLF)},W={len(CRLF)}", CRLF)  # older postroom files
    put(box, f"1700000003.M3.h,S={len(LF)}", LF)  # Courier: no W=, measured
    put(box, "1700000004.M4.h", LF + b"no final line end")  # no size at all
    pop = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=insecure(), timeout=20)
    pop.user("alice@a.test")
    pop.pass_("pw")
    _resp, listing, _ = pop.list()
    sizes = [int(line.split()[1]) for line in listing]
    count, total = pop.stat()
    assert count == 4 and total == sum(sizes)
    for number, size in enumerate(sizes, 1):
        resp, lines, _octets = pop.retr(number)
        # poplib unstuffs and strips the CRLFs; the answer's own count must be the LIST size.
        assert resp.split()[1] == str(size).encode()
        sent = b"".join(line + b"\r\n" for line in lines)
        assert len(sent) == size, number
        assert sent.startswith(b"Subject: lf\r\nFrom: a@b.test\r\n\r\n.starts with a dot\r\n")
    _resp, top, _ = pop.top(1, 1)
    assert top == [b"Subject: lf", b"From: a@b.test", b"", b".starts with a dot"]
    pop.quit()


def test_retr_on_the_wire_is_crlf_and_dot_stuffed(srv: Server) -> None:
    box = srv.maildir("alice@a.test")
    put(box, f"1700000001.M1.h,S={len(LF)},W={len(CRLF)}", LF)
    pop = poplib.POP3_SSL(srv.host, srv.ports["pop3s"], context=insecure(), timeout=20)
    pop.user("alice@a.test")
    pop.pass_("pw")
    pop._putcmd("RETR 1")  # type: ignore[attr-defined]
    assert pop._getresp().startswith(b"+OK")  # type: ignore[attr-defined]
    raw = b""
    while not raw.endswith(b"\r\n.\r\n"):
        raw += pop.file.readline()
    assert raw == CRLF.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    pop.quit()
