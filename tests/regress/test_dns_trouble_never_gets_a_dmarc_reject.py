"""A DMARC ``p=reject`` domain whose SPF record or DKIM key could not be looked up (a DNS
time-out) got ``550 5.7.1``: the missing result counted as a failure, so a passing DNS problem
refused mail for good. Such a result is now DMARC ``temperror`` (the message is delivered with
it), unless another aligned result settles it."""

from __future__ import annotations

import random
import smtplib
from collections.abc import Iterator

import pytest

from postroom.auth import dmarc
from postroom.auth.dkim_verify import DkimResult
from postroom.auth.spf import SpfResult
from tests.conftest import Server, ServerFactory
from tests.dnszone import LoopbackDNS

REJECT = dmarc.Policy(dmarc.parse_record("v=DMARC1; p=reject"), "bank.test")


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    server = LoopbackDNS("127.0.0.131")
    yield server
    server.stop()


def _send(srv: Server, body: bytes) -> None:
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30, local_hostname="client.test") as c:
        c.sendmail("service@bank.test", ["bob@a.test"], body)


@pytest.mark.parametrize("dead", ["spf", "dkim"])
def test_a_dns_time_out_is_never_a_dmarc_reject(
    server_factory: ServerFactory, dns: LoopbackDNS, dead: str
) -> None:
    srv = server_factory(
        extra_toml=f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "1s"\n'
        '[auth]\ncheck_timeout = "3s"\n'
    )
    srv.add_user("bob@a.test", "pw")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    head = b"From: <service@bank.test>\r\nTo: bob@a.test\r\nSubject: x\r\n"
    if dead == "spf":
        dns.timeout("bank.test")  # SPF unknown; no signature
        body = head + b"\r\nhello\r\n"
    else:
        dns.txt("bank.test", "v=spf1 -all")  # SPF fails; the signature's key is unknown
        dns.timeout("sel._domainkey.bank.test")
        body = (
            b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=bank.test; s=sel;\r\n"
            b"\th=from; bh=AAAA; b=AAAA\r\n" + head + b"\r\nhello\r\n"
        )
    _send(srv, body)  # no 550
    msg = srv.wait_messages("bob@a.test", 1)[0]
    assert b"dmarc=temperror" in msg


def test_temporary_errors_of_aligned_results_only() -> None:
    rng = random.Random(1)
    spf_temp = SpfResult("temperror", "bank.test", "mailfrom")
    assert dmarc.evaluate_domain("bank.test", REJECT, spf_temp, [], rng).result == "temperror"
    dkim_temp = [DkimResult("temperror", "bank.test", "sel", "rsa-sha256", "x")]
    spf_fail = SpfResult("fail", "bank.test", "mailfrom")
    assert (
        dmarc.evaluate_domain("bank.test", REJECT, spf_fail, dkim_temp, rng).result == "temperror"
    )
    # Not aligned: even a pass would not have helped, so the fail stands.
    other = [DkimResult("temperror", "evil.test", "sel", "rsa-sha256", "x")]
    failed = dmarc.evaluate_domain("bank.test", REJECT, spf_fail, other, rng)
    assert failed.result == "fail" and failed.disposition == "reject"
    # An aligned pass settles it whatever else is unknown.
    dkim_pass = [DkimResult("pass", "bank.test", "sel", "rsa-sha256", "x")]
    assert dmarc.evaluate_domain("bank.test", REJECT, spf_temp, dkim_pass, rng).result == "pass"


def test_a_dead_key_is_a_temperror_for_its_own_signature_only(
    server_factory: ServerFactory, dns: LoopbackDNS, rsa_signer: tuple[bytes, bytes]
) -> None:
    """The keys of all signatures were fetched as one job, cancelled whole at check_timeout:
    a key whose DNS never answered made every signature a temperror, also the aligned one
    whose key came back at once, so DMARC passed no more."""
    import dkim

    srv = server_factory(
        extra_toml=f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "3s"\n'
        '[auth]\ncheck_timeout = "1s"\n'
    )
    srv.add_user("bob@a.test", "pw")
    pem, record = rsa_signer
    dns.txt("good._domainkey.bank.test", record.decode())
    dns.timeout("dead._domainkey.other.test")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    dns.txt("bank.test", "v=spf1 -all")
    message = b"From: <service@bank.test>\r\nTo: bob@a.test\r\nSubject: x\r\n\r\nhello\r\n"
    signed = dkim.sign(message, b"good", b"bank.test", pem, include_headers=[b"from"])
    signed = dkim.sign(signed + message, b"dead", b"other.test", pem) + signed + message
    _send(srv, signed)
    msg = srv.wait_messages("bob@a.test", 1)[0]
    assert b"header.d=bank.test" in msg and b"dmarc=pass" in msg, msg[:600]
