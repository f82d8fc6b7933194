"""A user who logged in could submit ``Authentication-Results: mx.a.test; dmarc=pass
header.from=bank.test`` above a forged ``From: service@bank.test``, and the local recipient got
it as it was: only mail on the MX port lost such fields. No client writes results in our name
(RFC 8601 §5), logged in or not: they are now removed from submitted mail too, and on the MX
port with the checks off."""

from __future__ import annotations

import smtplib

from tests.conftest import ServerFactory, insecure


def test_submitted_results_in_our_name_are_removed(server_factory: ServerFactory) -> None:
    srv = server_factory()
    for user in ("alice@a.test", "bob@a.test"):
        srv.add_user(user, "pw")
    body = (
        b"Authentication-Results: mx.a.test; dmarc=pass header.from=bank.test\r\n"
        b"authentication-results: (x (y))\r\n\tMX.A.TEST.; dkim=pass header.d=bank.test\r\n"
        b"Authentication-Results: other.test; spf=none\r\n"
        b"From: Bank <service@bank.test>\r\nTo: bob@a.test\r\nSubject: x\r\n\r\n"
        b"Authentication-Results: mx.a.test; in the body, kept\r\n"
    )
    with smtplib.SMTP(srv.host, srv.ports["submission"], timeout=30) as c:
        c.starttls(context=insecure())
        c.login("alice@a.test", "pw")
        c.sendmail("alice@a.test", ["bob@a.test"], body)
    msg = srv.wait_messages("bob@a.test", 1)[0]
    head, _, rest = msg.partition(b"\r\n\r\n")
    fields = head.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ").split(b"\r\n")
    results = [f for f in fields if f.lower().startswith(b"authentication-results")]
    assert results == [b"Authentication-Results: other.test; spf=none"]
    assert rest == b"Authentication-Results: mx.a.test; in the body, kept\r\n"


def test_results_in_our_name_are_removed_with_the_checks_off(
    server_factory: ServerFactory,
) -> None:
    # With [auth] checks = false the MX port let them through: removing them is the border's
    # duty (RFC 8601 §5) whether or not it checks anything itself.
    srv = server_factory(services=("smtp",), extra_toml="[auth]\nchecks = false\n")
    srv.add_user("bob@a.test", "pw")
    body = (
        b"Authentication-Results: mx.a.test; dmarc=pass header.from=bank.test\r\n"
        b"Authentication-Results: other.test; spf=none\r\n"
        b"From: Bank <service@bank.test>\r\nTo: bob@a.test\r\nSubject: x\r\n\r\nx\r\n"
    )
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=30) as c:
        c.sendmail("service@bank.test", ["bob@a.test"], body)
    head = srv.wait_messages("bob@a.test", 1)[0].partition(b"\r\n\r\n")[0]
    results = [f for f in head.split(b"\r\n") if f.lower().startswith(b"authentication-results")]
    assert results == [b"Authentication-Results: other.test; spf=none"]
