"""A ``From:`` domain written in Unicode (``x@bänk.test``, SMTPUTF8) was compared as such with
the A-labels that SPF, DKIM and the configuration use: DMARC found the policy of
``xn--bnk-qla.test`` but no aligned SPF pass, so mail that passed got ``550 5.7.1``; and mail
that a user of a local IDN domain submitted was never DKIM-signed. RFC 7489 §6.6.1: the
author domain is converted to A-labels before anything else."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import pytest

from tests.conftest import ServerFactory, insecure
from tests.dnszone import LoopbackDNS

ALABEL = "xn--bnk-qla.test"  # bänk.test


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    server = LoopbackDNS("127.0.0.132")
    yield server
    server.stop()


def _toml(dns: LoopbackDNS) -> str:
    return f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "2s"\n'


def test_a_unicode_from_domain_aligns_with_its_a_label(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    srv = server_factory(extra_toml=_toml(dns))
    srv.add_user("bob@a.test", "pw")
    dns.txt(f"_dmarc.{ALABEL}", "v=DMARC1; p=reject")
    dns.txt(ALABEL, "v=spf1 ip4:127.0.0.0/8 -all")
    body = "From: <x@Bänk.test>\r\nTo: bob@a.test\r\nSubject: x\r\n\r\nhi\r\n".encode()
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30, local_hostname="c.test") as c:
        c.sendmail(f"x@{ALABEL}", ["bob@a.test"], body, mail_options=["SMTPUTF8"])
    msg = srv.wait_messages("bob@a.test", 1)[0]
    assert f"dmarc=pass (p=reject dis=none) header.from={ALABEL}".encode() in msg


def test_mail_from_a_local_idn_domain_is_signed(
    server_factory: ServerFactory, dns: LoopbackDNS
) -> None:
    srv = server_factory(domains=("bänk.test",), hostname="mx.a.test", extra_toml=_toml(dns))
    for user in ("alice", "bob"):
        srv.add_user(f"{user}@{ALABEL}", "pw")
    dns.load_master(srv.cli("dns", ALABEL).stdout)
    body = "From: <alice@bänk.test>\r\nTo: bob@bänk.test\r\nSubject: x\r\n\r\nhi\r\n".encode()
    deadline = time.monotonic() + 20
    sent = 0
    while time.monotonic() < deadline:  # the server looks for its keys in DNS meanwhile
        with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
            c.starttls(context=insecure())
            c.login(f"alice@{ALABEL}", "pw")
            c.sendmail(f"alice@{ALABEL}", [f"bob@{ALABEL}"], body, mail_options=["SMTPUTF8"])
        sent += 1
        last = srv.wait_messages(f"bob@{ALABEL}", sent)[-1]
        if last.count(b"DKIM-Signature:") == 2:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("never signed")
    assert f"d={ALABEL};".encode() in last
