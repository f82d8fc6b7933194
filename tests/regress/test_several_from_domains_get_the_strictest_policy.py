"""A message whose ``From:`` named a second domain (``From: <x@shop.test>, <service@bank.test>``,
or a second From field) got DMARC ``permerror`` and was delivered, even when one of the
domains was forged and said ``p=reject``: adding an address was enough to get past DMARC.
RFC 7489 §6.6.1: each From domain is checked and the strictest policy of those that fail
applies."""

from __future__ import annotations

import random
import smtplib
from collections.abc import Iterator

import pytest

from postroom.auth import dmarc
from postroom.auth.spf import SpfResult
from tests.conftest import ServerFactory
from tests.dnszone import LoopbackDNS


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    server = LoopbackDNS("127.0.0.133")
    yield server
    server.stop()


@pytest.mark.parametrize(
    "from_fields",
    [
        b"From: <x@shop.test>, Bank <service@bank.test>\r\n",
        b"From: <x@shop.test>\r\nFrom: Bank <service@bank.test>\r\n",
    ],
    ids=["one-field", "two-fields"],
)
def test_a_forged_second_from_domain_is_refused(
    server_factory: ServerFactory, dns: LoopbackDNS, from_fields: bytes
) -> None:
    srv = server_factory(extra_toml=f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "2s"\n')
    srv.add_user("bob@a.test", "pw")
    dns.txt("shop.test", "v=spf1 ip4:127.0.0.0/8 -all")  # the sender's own domain passes
    dns.txt("_dmarc.shop.test", "v=DMARC1; p=none")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    body = from_fields + b"Sender: <x@shop.test>\r\nTo: bob@a.test\r\nSubject: x\r\n\r\nhi\r\n"
    with (
        smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30, local_hostname="c.test") as c,
        pytest.raises(smtplib.SMTPDataError) as refused,
    ):
        c.sendmail("x@shop.test", ["bob@a.test"], body)
    assert refused.value.smtp_code == 550 and refused.value.smtp_error.startswith(b"5.7.1")
    # Both domains aligned: delivered.
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30, local_hostname="c.test") as c:
        c.sendmail("x@shop.test", ["bob@a.test"], body.replace(b"bank.test", b"shop.test"))
    msg = srv.wait_messages("bob@a.test", 1)[0]
    assert b"dmarc=pass" in msg


def test_the_strictest_failing_policy_applies() -> None:
    rng = random.Random(1)
    policies = {
        "shop.test": dmarc.Policy(dmarc.parse_record("v=DMARC1; p=quarantine"), "shop.test"),
        "bank.test": dmarc.Policy(dmarc.parse_record("v=DMARC1; p=reject"), "bank.test"),
        "none.test": dmarc.Policy(None),
    }
    spf = SpfResult("pass", "shop.test", "mailfrom")
    both = dmarc.evaluate(["shop.test", "bank.test"], policies, spf, [], rng)
    assert (both.result, both.from_domain, both.disposition) == ("fail", "bank.test", "reject")
    spf = SpfResult("fail", "x.test", "mailfrom")
    worst = dmarc.evaluate(["bank.test", "shop.test", "bank.test"], policies, spf, [], rng)
    assert (worst.from_domain, worst.disposition) == ("bank.test", "reject")
    # Without a failure, a domain without an address part or a policy is not a pass.
    spf = SpfResult("pass", "shop.test", "mailfrom")
    assert dmarc.evaluate(["shop.test", ""], policies, spf, [], rng).result == "permerror"
    assert dmarc.evaluate(["shop.test", "none.test"], policies, spf, [], rng).result == "none"
    assert dmarc.evaluate(["shop.test"], policies, spf, [], rng).result == "pass"
    assert dmarc.evaluate([], policies, spf, [], rng).result == "permerror"
