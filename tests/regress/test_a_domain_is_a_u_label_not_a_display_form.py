"""Envelope and configured domains were taken through UTS 46's input mapping: fullwidth letters
(``\\uff4c.test``), a fullwidth or ideographic full stop between labels (``bücher。test``) reached
the local domain's mailboxes and passed as a sender's own address on submission, while the same
forms in a local part were refused (two i18n probes). RFC 5890 §2.3.2.1 and RFC 6531 §3.3 ask
for U-labels; only case and NFC are folded."""

from __future__ import annotations

import smtplib

import pytest

from postroom.address import normalise_domain
from tests.conftest import ServerFactory


@pytest.mark.parametrize(
    "name",
    [
        "l\uff0etest",
        "\uff4c.test",
        "\uff22\u00dc\uff23\uff28\uff25\uff32.test",
        "b\u00fccher\u3002test",
        "b\u00fccher\uff61test",
        "\ufb01le.test",  # a ligature
    ],
)
def test_compatibility_forms_are_not_domains(name: str) -> None:
    with pytest.raises(ValueError, match="not a U-label"):
        normalise_domain(name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("B\u00dcCHER.test", "xn--bcher-kva.test"),
        ("bu\u0308cher.test", "xn--bcher-kva.test"),  # NFD
        ("STRA\u1e9eE.test", "xn--strae-oqa.test"),  # capital sharp s
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        # Canonical equivalents whose NFC is another code point (a recheck probe: the first
        # version refused 1,057 of them): Greek with oxia, a Devanagari nukta letter, a CJK
        # compatibility ideograph; and the Thai and Lao AM that keyboards type (UTS 46 maps).
        ("\u03b5\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u1f79\u03c2.test", "xn--qxaegecap6byf.test"),
        ("\u0958\u0932\u092e.test", "xn--11b4cl3b.test"),
        ("\uf900.test", "xn--oh3a.test"),
        ("\u0e01\u0e33\u0e44\u0e23.test", "xn--12c2eyb1dyb.test"),
    ],
)
def test_case_and_nfc_are_folded(name: str, expected: str) -> None:
    assert normalise_domain(name) == expected


def test_a_fullwidth_spelling_of_a_local_domain_is_refused_at_rcpt(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(domains=("l.test",), services=("smtp",))
    srv.add_user("alice@l.test")
    with smtplib.SMTP(srv.host, srv.ports["smtp"], timeout=20) as c:
        c.ehlo("c.test")
        assert c.mail("p@example.org", ["SMTPUTF8"])[0] == 250
        code, _ = c.rcpt("alice@\uff4c.test")
        assert code // 100 == 5
        assert c.rcpt("alice@l.test")[0] == 250
