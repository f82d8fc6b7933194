"""Sessions the stop's deadline found still busy ended with the process, without a reply or
a line: a POP3 client not reading a large RETR, a client that pipelined commands and read none
of the replies, and a message whose checks still waited on DNS (the default `[dns] timeout`,
10 s, outlasts the stop's 8 s). Each is ended at the deadline now, saying so, and its
`disconnect` is logged; the message being checked gets a 451 (it is not queued: the client
sends it again), then the stop's 421. A TLS handshake the stop closes is not put on the
client. (ops, recheck2 and recheck3 probes) Those lines named no service (``postroom[PID]``).
"""

from __future__ import annotations

import socket
import time

from tests.conftest import ServerFactory
from tests.dnszone import LoopbackDNS
from tests.integration.test_pop3 import retr_of_16_mb


def test_the_stop_ends_each_busy_session_with_its_line(server_factory: ServerFactory) -> None:
    dns = LoopbackDNS()
    dns.timeout("slow.test")  # its SPF record never comes
    try:
        toml = f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
        s = server_factory(services=("pop3s", "smtp", "submissions"), extra_toml=toml)
        retr, _f, _msg = retr_of_16_mb(s, "ida@a.test")
        pipelined = socket.socket()
        pipelined.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        pipelined.connect(("127.0.0.1", s.ports["smtp"]))
        pipelined.sendall(b"HELP\r\n" * 5000)
        checked = socket.create_connection(("127.0.0.1", s.ports["smtp"]))
        reader = checked.makefile("rb")
        reader.readline()
        checked.sendall(
            b"EHLO c.test\r\nMAIL FROM:<x@slow.test>\r\nRCPT TO:<ida@a.test>\r\nDATA\r\n"
        )
        for _ in range(30):  # EHLO's lines, MAIL's and RCPT's 250, then DATA's 354
            if reader.readline().startswith(b"354"):
                break
        else:
            raise AssertionError("no 354")
        checked.sendall(b"Subject: x\r\n\r\nx\r\n.\r\n")
        handshaking = socket.create_connection(("127.0.0.1", s.ports["submissions"]))
        time.sleep(0.5)  # the writes stall, the checks wait, the handshake waits
        assert s.stop() == 0
        assert reader.readline().startswith(b"451 4.3.2 ")
        assert reader.readline().startswith(b"421 4.3.2 ")
    finally:
        dns.stop()
    for sock in (retr, pipelined, checked, handshaking):
        sock.close()
    text = s.log.read_text()
    # Each tagged with its service, as the session's other lines are.
    assert "/pop3s[" in _line(text, "POP3 with 127.0.0.1: cut off by the stop before its answer")
    assert " postroom/smtpd[" in _line(text, "SMTP with 127.0.0.1: cut off by the stop while its")
    ended = text.count(": disconnect from ")
    assert ended == text.count(": connect from ") and ended > 3, text
    stopping = text[text.index("shutting down") :]  # (before it: the start's own probes)
    assert "TLS handshake with [127.0.0.1] failed: closed by the server's stop" in stopping
    assert "closed by the client" not in stopping
    assert len(list((s.maildir("ida@a.test") / "new").iterdir())) == 1  # nothing deleted


def _line(text: str, part: str) -> str:
    return next(line for line in text.splitlines() if part in line)
