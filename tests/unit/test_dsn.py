"""RFC 3464 bounces: built by hand, read back with the stdlib email package."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
from dataclasses import replace
from typing import Any

import pytest

from postroom.delivery.dsn import (
    DsnRecipient,
    build_dsn,
    failure_status,
    format_date,
    xtext_decode,
    xtext_encode,
)

ORIGINAL = (
    b"From: Alice <alice@a.test>\r\nTo: bob@b.test\r\nSubject: lunch?\r\n"
    b"Message-ID: <m1@a.test>\r\n\r\nSee you at noon.\r\n"
)
NOW = dt.datetime(2024, 3, 1, 12, 0, 5, tzinfo=dt.UTC)
ARRIVAL = dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def failed(rcpt: str = "bob@b.test", **kw: object) -> DsnRecipient:
    args: dict[str, object] = {
        "remote_mta": "mx.b.test",
        "diagnostic": "550 5.1.1 <bob@b.test>: no such user",
        "last_attempt": NOW,
    }
    args.update(kw)
    return DsnRecipient(rcpt, "failed", "5.1.1", **args)  # type: ignore[arg-type]


def report(**kw: Any) -> bytes:
    """``build_dsn`` with this file's defaults (one failed recipient of ORIGINAL, alice's
    message) and the arguments given."""
    args: dict[str, Any] = {
        "hostname": "mx.a.test",
        "sender": "alice@a.test",
        "recipients": [failed()],
        "original": ORIGINAL,
        "arrival": ARRIVAL,
        "now": NOW,
    }
    return build_dsn(**(args | kw))


def parse(raw: bytes) -> Any:
    return email.message_from_bytes(raw)


def status_blocks(msg: Any) -> list[Any]:
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


def test_failure_report_parses() -> None:
    raw = report(envid="ID+2B1", queue_id="Q1")
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF everywhere
    assert raw.isascii()
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "MAILER-DAEMON@mx.a.test"
    assert msg["To"] == "<alice@a.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"] == "Fri, 01 Mar 2024 12:00:05 +0000"
    assert msg["Message-ID"].endswith("@mx.a.test>")
    assert msg["In-Reply-To"] == "<m1@a.test>"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert "bob@b.test" in parts[0].get_payload()
    per_msg, per_rcpt = status_blocks(msg)
    assert per_msg["Reporting-MTA"] == "dns; mx.a.test"
    assert per_msg["Original-Envelope-Id"] == "ID+1"
    assert per_msg["Arrival-Date"] == "Fri, 01 Mar 2024 12:00:00 +0000"
    # RFC 3464 §2.2's order: Original-Envelope-Id first, extension fields last.
    assert list(per_msg)[:3] == ["Original-Envelope-Id", "Reporting-MTA", "Arrival-Date"]
    assert list(per_msg)[-1].startswith("X-")
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@b.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.b.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@b.test>: no such user"
    headers = email.message_from_string(parts[2].get_payload())
    assert headers["Subject"] == "lunch?"
    assert headers["Message-ID"] == "<m1@a.test>"
    assert "See you at noon" not in raw.decode()


def test_ret_full_returns_the_message() -> None:
    raw = report(ret="FULL")
    msg = parse(raw)
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "lunch?"
    assert inner.get_payload().strip() == "See you at noon."


def test_ret_full_too_large_returns_headers_only() -> None:
    big = ORIGINAL + b"x" * 5000 + b"\r\n"
    raw = report(original=big, ret="FULL", full_limit=1000)
    assert parse(raw).get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_several_recipients_orcpt_and_delay() -> None:
    later = NOW + dt.timedelta(days=5)
    recipients = [
        failed(original_recipient="rfc822;Bob+2BX@b.test"),
        DsnRecipient(
            "carol@b.test",
            "delayed",
            "4.4.1",
            remote_mta=None,
            diagnostic="connect to mx.b.test: Connection refused",
            last_attempt=NOW.timestamp(),
            will_retry_until=later,
        ),
    ]
    raw = report(recipients=recipients, arrival=ARRIVAL.timestamp())
    _, bob, carol = status_blocks(parse(raw))
    assert bob["Original-Recipient"] == "rfc822; Bob+X@b.test"
    assert carol["Action"] == "delayed"
    assert carol["Status"] == "4.4.1"
    assert carol["Remote-MTA"] is None
    assert carol["Will-Retry-Until"] == format_date(later)


def test_success_report_never_returns_the_body() -> None:
    raw = report(
        recipients=[DsnRecipient("bob@b.test", "relayed", "2.0.0", remote_mta="mx.b.test")],
        ret="FULL",
    )
    msg = parse(raw)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert status_blocks(msg)[1]["Action"] == "relayed"
    human = msg.get_payload()[0].get_payload()
    assert "<bob@b.test>: relayed (2.0.0)\r\n    host mx.b.test took it\r\n" in human


def test_an_expired_recipient_is_told_that_the_server_gave_up() -> None:
    expired = failed(diagnostic="451 4.4.1 connection timed out")
    raw = report(recipients=[replace(expired, status="4.4.1")])
    human = parse(raw).get_payload()[0].get_payload()
    assert "I gave up" in human and "451 4.4.1 connection timed out" in human
    assert "I gave up" not in parse(report(recipients=[failed()])).get_payload()[0].get_payload()


def test_hostile_diagnostic_cannot_inject_fields() -> None:
    evil = "550 no\r\nAction: delivered\r\n\r\n--boundary\r\nX-Evil: 1"
    raw = report(recipients=[failed(diagnostic=evil)])
    blocks = status_blocks(parse(raw))
    assert len(blocks) == 2
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["X-Evil"] is None
    assert "X-Evil: 1" in blocks[1]["Diagnostic-Code"]


def test_long_diagnostic_is_folded() -> None:
    long = "550 5.7.1 " + " ".join(["word"] * 100)
    raw = report(recipients=[failed(diagnostic=long)])
    assert max(len(line) for line in raw.split(b"\r\n")) <= 100
    got = status_blocks(parse(raw))[1]["Diagnostic-Code"]
    assert " ".join(got.split()) == f"smtp; {long}"


def test_a_word_longer_than_a_line_is_cut() -> None:
    """RFC 5322 §2.1.1: no line over 998 octets, even when a peer's reply holds a longer word."""
    long = "550 5.1.1 " + "x" * 1500 + " end"
    raw = report(recipients=[failed(diagnostic=long)])
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    got = status_blocks(parse(raw))[1]["Diagnostic-Code"]
    got = " ".join(got.split())
    assert got.startswith("smtp; 550 5.1.1 xxx") and got.endswith("x... end")


def test_utf8_recipient_uses_global_types() -> None:
    raw = report(recipients=[failed("bøb@b.test")])
    msg = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    # RFC 6522 §3: report-type is the subtype of the second part.
    assert msg.get_param("report-type") == "global-delivery-status"
    parts = list(msg.iter_parts())
    assert parts[1].get_content_type() == "message/global-delivery-status"
    assert "utf-8; bøb@b.test" in raw.decode()


def test_utf8_header_section_goes_back_as_global_headers() -> None:
    # ASCII addresses, a UTF-8 Subject: the 7-bit text/rfc822-headers would be wrong (RFC 6533 §3).
    original = ORIGINAL.replace(b"lunch?", "déjeuner ?".encode())
    headers_only = parse(report(original=original)).get_payload()[2]
    assert headers_only.get_content_type() == "message/global-headers"
    whole = parse(report(original=original, ret="FULL")).get_payload()[2]
    assert whole.get_content_type() == "message/global"
    assert parse(report()).get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_boundary_not_in_content() -> None:
    first = report(message_id="fixed@x")
    boundary = parse(first).get_boundary()
    assert boundary
    evil = ORIGINAL.replace(b"Subject: lunch?", b"Subject: --" + boundary.encode())
    raw = report(original=evil, message_id="fixed@x")
    msg = parse(raw)
    assert msg.get_boundary() != boundary
    assert len(msg.get_payload()) == 3


def test_refuses_null_sender() -> None:
    with pytest.raises(ValueError, match="null sender"):
        report(sender="")


def test_bad_status_is_our_bug() -> None:
    with pytest.raises(ValueError, match="status"):
        report(recipients=[DsnRecipient("b@b.test", "failed", "550")])


def test_a_peers_malformed_status_code_is_none_and_the_bounce_goes_out() -> None:
    # "450 45.1.1" passed as a code ("45" in "245"), "550 5.1.1000" too (any digits): the
    # DSN builder refused it as our own bug, and the bounce was never sent (RFC 3463 §2).
    from postroom.wire.replies import parse_status, status_of

    for reply, status in (
        ("450 45.1.1 mailbox busy", "4.4.7"),
        ("550 5.1.1000 no such user", "5.0.0"),
        ("550 24.0.0 odd", "5.0.0"),
        ("550 5.1.1 no such user", "5.1.1"),
        ("452 4.2.22 full", "4.2.22"),
    ):
        assert failure_status(reply) == status, reply
        rcpt = DsnRecipient("b@b.test", "failed", failure_status(reply), diagnostic=reply)
        report(recipients=[rcpt])
    assert parse_status("45.1.1 x") == ("", "45.1.1 x") and status_of("550 5.1.1000 x") == ""


def test_deterministic() -> None:
    assert report() == report()


def test_xtext_decode() -> None:
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    # Each "+XX" is an octet: escaped UTF-8 is read back as UTF-8, not one character per octet.
    assert xtext_decode("u+C3+BC") == "u\u00fc"
    assert xtext_decode("bad+40orig+C3+BC@x.test") == "bad@orig\u00fc@x.test"
    assert xtext_decode("+FF") == "\ufffd"


def test_xtext_round_trip() -> None:
    for value in ("ab+c3@x.test", "a=b@x.test", "j\u00f6rg@x.test", "sp ace@x.test"):
        assert xtext_decode(xtext_encode(value)) == value
    assert xtext_encode("ab+c3=@x.test") == "ab+2Bc3+3D@x.test"


def test_a_utf8_original_recipient_in_xtext_keeps_its_characters() -> None:
    """RFC 6533 §3: an ORCPT (or an alias named by us) with UTF-8 in xtext is shown as it
    reads, in a message/global-delivery-status part, never with "?" for its characters."""
    rcpt = failed(original_recipient="utf-8;j" + xtext_encode("\u00f6") + "ran@a.test")
    raw = report(recipients=[rcpt])
    msg = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    assert list(msg.iter_parts())[1].get_content_type() == "message/global-delivery-status"
    assert "Original-Recipient: utf-8; j\u00f6ran@a.test" in raw.decode()
