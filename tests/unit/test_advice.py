"""delivery/advice.py: the table of causes an admin can fix, and the bounce text that uses it."""

from __future__ import annotations

import pytest

from postroom.delivery.advice import advise, sender_domain
from postroom.delivery.dsn import Action, DsnRecipient, build_dsn

GMAIL_526 = (
    "550 5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail "
    "requires all senders to authenticate with either SPF or DKIM."
)


@pytest.mark.parametrize(
    ("reply", "cause", "command"),
    [
        (GMAIL_526, "sender_auth", "postroom dns a.test --check"),
        ("550 5.7.23 SPF validation failed", "sender_auth", "postroom dns a.test --check"),
        (
            "550 5.7.1 Email rejected per DMARC policy for a.test",
            "sender_auth",
            "postroom dns a.test --check",
        ),
        (
            "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
            "blocklist",
            None,
        ),
        ("550 5.7.1 IP 192.0.2.1 is listed at bl.example", "blocklist", None),
        (
            "550 5.7.25 The IP address sending this message does not have a PTR record",
            "reverse_dns",
            None,
        ),
        ("530 5.7.10 Must issue a STARTTLS command first", "tls_required", None),
        ("550 5.7.0 TLS required for this domain", "tls_required", None),
        # Our own refusals under tls_verify_domains: not the receiving server's demand.
        ("451 4.7.5 TLS required but not offered", "tls_verify", None),
        (
            "451 4.7.5 TLS with mx.b.test[192.0.2.1] failed: certificate verify failed",
            "tls_verify",
            None,
        ),
        ("552 5.2.2 Mailbox full", "mailbox_full", None),
        ("452 4.2.2 The email account that you tried to reach is over quota", "mailbox_full", None),
        (
            "450 4.2.0 <bob@b.test>: Recipient address rejected: Greylisted, see "
            "http://postgrey.schweikert.ch/",
            "greylisting",
            "postroom queue flush",
        ),
        ("451 4.7.1 Please try again later", "greylisting", "postroom queue flush"),
    ],
)
def test_causes_an_admin_can_fix(reply: str, cause: str, command: str | None) -> None:
    hint = advise(reply, "a.test")
    assert hint is not None
    assert (hint.cause, hint.command) == (cause, command)


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "",
        "550 5.1.1 <bob@b.test>: Recipient address rejected: User unknown",
        "550 5.1.1 recipient not listed in public Name & Address Book",
        "530 5.7.0 Authentication required",  # a relay asking for SMTP AUTH, not SPF
        "451 4.4.1 connect to mx.b.test[192.0.2.1]:25: Connection refused",
        "554 5.4.6 mail for this domain loops back to myself",
    ],
)
def test_other_refusals_give_no_advice(reply: str | None) -> None:
    assert advise(reply, "a.test") is None


def test_sender_domain() -> None:
    assert sender_domain("Alice@A.Test", "mx.a.test") == "a.test"
    assert sender_domain("", "mx.a.test") == "mx.a.test"


def test_bounce_names_the_command() -> None:
    report = build_dsn(
        hostname="mx.a.test",
        sender="alice@a.test",
        recipients=[
            DsnRecipient(
                "bob@gmail.test",
                "failed",
                "5.7.26",
                remote_mta="mx.gmail.test",
                diagnostic=GMAIL_526,
            )
        ],
        original=b"Subject: hi\r\n\r\nbody\r\n",
        arrival=0.0,
        now=1.0,
    ).decode()
    human = report.split("Content-Description: Delivery report")[0]
    assert "postroom dns a.test --check" in human.replace("\r\n    ", " ")
    assert "SPF" in human


def test_bounce_without_a_known_cause_has_no_advice() -> None:
    report = build_dsn(
        hostname="mx.a.test",
        sender="alice@a.test",
        recipients=[DsnRecipient("bob@b.test", "failed", "5.1.1", diagnostic="550 5.1.1 no")],
        original=b"Subject: hi\r\n\r\nbody\r\n",
        arrival=0.0,
        now=1.0,
    ).decode()
    assert "What this means" not in report


def test_a_final_bounce_does_not_say_the_queue_retries() -> None:
    """Greylisting's advice ("the queue retries by itself", ``queue flush``) fits a delay
    report; in the bounce sent when the message gave out at max_queue_time it was wrong."""

    def report(action: Action) -> str:
        return build_dsn(
            hostname="mx.a.test",
            sender="alice@a.test",
            recipients=[
                DsnRecipient(
                    "bob@b.test",
                    action,
                    "4.7.1",
                    remote_mta="mx.b.test",
                    diagnostic="451 4.7.1 greylisted, try later",
                )
            ],
            original=b"Subject: hi\r\n\r\nbody\r\n",
            arrival=0.0,
            now=1.0,
        ).decode()

    assert "retries by itself" in report("delayed")
    assert "retries by itself" not in report("failed")
    assert "queue flush" not in report("failed")
