"""A message above ``[auth] check_max_size`` gets SPF checked only, and that check was not
bounded by ``[auth] check_timeout`` (which bounds all the lookups of every other message):
with a dead name server it waited the full ``[dns] timeout`` per lookup instead."""

from __future__ import annotations

import smtplib
import time

from tests.conftest import ServerFactory
from tests.dnszone import LoopbackDNS


def test_spf_of_a_large_message_gives_up_at_check_timeout(server_factory: ServerFactory) -> None:
    dns = LoopbackDNS("127.0.0.136")
    try:
        dns.timeout("bank.test")
        srv = server_factory(
            extra_toml=f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "6s"\n'
            '[auth]\ncheck_timeout = "1s"\ncheck_max_size = "1KB"\n'
        )
        srv.add_user("bob@a.test", "pw")
        body = b"From: <x@bank.test>\r\nSubject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"
        with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30, local_hostname="c.test") as c:
            c.ehlo()
            c.mail("x@bank.test")
            c.rcpt("bob@a.test")
            start = time.monotonic()
            code, _ = c.data(body)
            took = time.monotonic() - start
    finally:
        dns.stop()
    assert code == 250
    assert took < 4, took  # check_timeout (1 s), not the 6 s DNS timeout
    assert b"spf=temperror" in srv.wait_messages("bob@a.test", 1)[0]
