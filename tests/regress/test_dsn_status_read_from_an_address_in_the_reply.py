"""A bounce's ``Status:`` was the first "digit.digit.digit" found anywhere in the stored reply,
so a server's ``550 Client host [10.4.5.6] blocked`` (no enhanced code) bounced with
``Status: 4.5.6``: a transient class for a permanent refusal, made up from an IP address
(a ``550 4.7.1 ...`` whose mismatched code the client rightly ignores went the same way).
Only the enhanced code right after the reply code counts, and only with the reply's class
(RFC 3463 §2); otherwise a 5xx is 5.0.0."""

from __future__ import annotations

import email
import time
from typing import Any

import pytest

from postroom.delivery.advice import advise
from postroom.delivery.dsn import build_dsn
from postroom.queue.envelope import Recipient
from postroom.queue.runner import _dsn_recipient


def bounce_status(last_error: str) -> tuple[str, str]:
    """(Status, Diagnostic-Code) of the bounce the runner makes for this stored reply."""
    queued = Recipient("bob@b.test", status="bounced", last_error=last_error, remote_mta="mx.b")
    raw = build_dsn(
        hostname="mx.a.test",
        sender="alice@a.test",
        recipients=[_dsn_recipient(queued, "failed", time.time())],
        original=b"Subject: hi\r\n\r\nhi\r\n",
        arrival=time.time(),
        now=time.time(),
    )
    report: Any = email.message_from_bytes(raw)
    _per_message, block = report.get_payload()[1].get_payload()
    return str(block["Status"]), " ".join(str(block["Diagnostic-Code"]).split())


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        ("550 Client host [10.4.5.6] blocked", "5.0.0"),
        ("554 rejected by 5.9.100.1, see https://example.test/4.2.2", "5.0.0"),
        ("550 4.7.1 class does not match the reply code", "5.0.0"),
        ("550 5.7.1 rejected from [10.4.5.6]", "5.7.1"),
        ("550-5.1.1 no such user", "5.1.1"),
    ],
)
def test_status_is_the_replys_own_code_or_its_class(reply: str, status: str) -> None:
    got, diagnostic = bounce_status(reply)
    assert got == status
    assert diagnostic == f"smtp; {reply}"


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        ("451 4.4.1 connect to mx.b.test[10.5.5.5]:25: Connection refused", "4.4.1"),
        ("421 connection closed by 10.4.5.6", "4.4.7"),  # gave out at max_queue_time
        ("4.4.7 delivery time expired", "4.4.7"),
        ("550 5.1.10 domain accepts no mail (null MX, RFC 7505)", "5.1.10"),
    ],
)
def test_codes_of_temporary_errors_that_gave_out_are_kept(reply: str, status: str) -> None:
    assert bounce_status(reply)[0] == status


def test_advice_is_not_read_out_of_an_address_either() -> None:
    # 4.2.2 read out of the address gave "the recipient's mailbox is full" in the bounce.
    assert advise("550 Client host [10.4.2.2] blocked", "a.test") is None
    hint = advise("552 4.2.2 mailbox full", "a.test")  # mismatched class: the words still count
    assert hint is not None and hint.cause == "mailbox_full"
    assert advise("452 4.2.2 over quota", "a.test") is not None
