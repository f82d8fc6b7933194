"""An IPv6 address literal listed in ``domains`` was taken at RCPT and then sent out over SMTP
(to itself), never stored: the queue lower-cased the domain to ``[ipv6:...]``, which no longer
matched the ``[IPv6:...]`` of the config (v6e2e probe). An IPv4-mapped literal keeps its dotted
quad (RFC 5952 §5)."""

from __future__ import annotations

import smtplib

from postroom.address import normalise_domain
from tests.conftest import ServerFactory, wait_until


def test_mail_for_a_local_ipv6_literal_is_delivered_here(server_factory: ServerFactory) -> None:
    srv = server_factory(domains=("a.test", "[IPv6:::1]", "[127.0.0.1]"), services=("smtp",))
    srv.add_user("carol@[IPv6:::1]")
    srv.add_user("erin@[127.0.0.1]")
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        for rcpt in ("carol@[IPv6:::1]", "carol@[ipv6:0::1]", "erin@[127.0.0.1]"):
            c.sendmail("x@b.test", [rcpt], b"Subject: literal\r\n\r\nhi\r\n")
    mailbox = srv.data_dir / "mail" / "[IPv6:::1]" / "carol"
    wait_until(lambda: len(list((mailbox / "new").iterdir())) == 2, what="two copies for carol")
    wait_until(lambda: len(srv.messages("erin@[127.0.0.1]")) == 1, what="erin's copy")
    wait_until(lambda: srv.log.read_text().count("relay=local") == 3, what="three local lines")
    assert "status=deferred" not in srv.log.read_text()


def test_an_ipv4_mapped_literal_keeps_its_dotted_quad() -> None:
    assert normalise_domain("[IPv6:::FFFF:192.0.2.1]") == "[IPv6:::ffff:192.0.2.1]"
    assert normalise_domain("[ipv6:0:0:0:0:0:0:0:1]") == "[IPv6:::1]"
