"""The SMTP policy with a fake services object: who may send what to whom, and the one hand-off
of a finished message to the queue."""

from __future__ import annotations

import asyncio
import email
import logging
import zlib
from pathlib import Path
from typing import Any

import pytest

from postroom import config as config_mod
from postroom.address import Address
from postroom.errors import TemporaryStorageError
from postroom.queue.envelope import Envelope
from postroom.smtp.commands import Mail, Rcpt
from postroom.smtp.policy import SmtpPolicy
from postroom.storage.interfaces import MessageDraft
from postroom.storage.local.queue import Draft, SpareBodies
from postroom.wire import replies
from postroom.wire.replies import Reply


class Accounts:
    def __init__(self) -> None:
        self.users = {"alice@a.test", "x@r.test"}

    def user_exists(self, key: str) -> bool:
        return key in self.users

    def credential(self, key: str) -> str | None:
        return f"hash of {key}" if key in self.users else None

    def resolve(self, key: str) -> list[str] | None:
        found = self.expand(key)
        return [key] if found is None and key.startswith("postmaster@") else found

    def expand(self, key: str, max_depth: int = 10) -> list[str] | None:
        return {
            "alice@a.test": ["alice@a.test"],
            "team@a.test": ["alice@a.test", "x@r.test"],
            "one@a.test": ["alice@a.test"],
            "info@a.test": ["alice@a.test", "x@r.test"],
        }.get(key)

    def owns(self, user_key: str, sender_key: str) -> bool:
        return user_key == sender_key


class Handed:
    """The intake: records what it was handed and answers as told."""

    def __init__(self) -> None:
        self.got: list[tuple[Envelope, bytes]] = []
        self.answer: Reply | None = None

    async def accept(self, envelope: Envelope, draft: MessageDraft) -> Any:
        assert isinstance(draft, Draft)
        body, _file, _crc = draft.finish()
        self.got.append((envelope, body))
        if self.answer is not None:
            return self.answer

        class Accepted:
            queue_id = envelope.id

        return Accepted()


class Queue:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def draft(self, queue_id: str, sender: str, make_prefix: Any = None) -> Draft:
        return Draft(SpareBodies(self.tmp, None), queue_id, sender, make_prefix, 1000)


def policy(tmp_path: Path, port: str = "smtp") -> tuple[SmtpPolicy, Handed]:
    services: Any = type("Services", (), {})()
    services.cfg = config_mod.from_dict(
        {"hostname": "mx.a.test", "domains": ["a.test"], "data_dir": str(tmp_path)}
    )
    services.accounts = Accounts()
    services.queue = Queue(tmp_path)
    services.intake = Handed()
    services.log = logging.getLogger("test-policy")
    services.tls = None
    services.sender_auth = None
    p = SmtpPolicy(services, port, "192.0.2.1", tls=False)  # type: ignore[arg-type]
    p.helo = "client.r.test"
    return p, services.intake


def transaction(p: SmtpPolicy, *rcpts: str, data: bytes) -> Reply:
    assert p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK
    for r in rcpts:
        local, _, domain = r.partition("@")
        p.on_rcpt(Rcpt(Address(local, domain)))
    p.on_data_start()
    for i in range(0, len(data), 7):  # in pieces, a CRLF split across two now and then
        p.on_data(data[i : i + 7])
    return asyncio.run(p.on_message_end())


def finish(p: SmtpPolicy) -> None:
    """A small message for the transaction begun: DATA, its lines, the end of data."""
    p.on_data_start()
    p.on_data(b"Subject: x\r\n\r\ny\r\n")
    asyncio.run(p.on_message_end())


def test_mx_port_takes_local_users_aliases_postmaster_and_refuses_relay(tmp_path: Path) -> None:
    p, _intake = policy(tmp_path)
    assert p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK
    assert p.on_rcpt(Rcpt(Address("alice", "a.test"))) == replies.RECIPIENT_OK
    assert p.on_rcpt(Rcpt(Address("nobody", "a.test"))) == replies.USER_UNKNOWN
    assert p.on_rcpt(Rcpt(Address("Postmaster", "a.test"))) == replies.RECIPIENT_OK
    assert p.on_rcpt(Rcpt(Address("bob", "r.test"))) == replies.RELAY_DENIED
    assert p.on_rcpt(Rcpt(Address("team", "a.test"))) == replies.RECIPIENT_OK
    # Each final address once (alice via the alias too), the remote alias target kept.
    assert [r.address for r in p.txn.recipients] == [
        "alice@a.test",
        "postmaster@a.test",
        "x@r.test",
    ]


def test_a_recipient_named_twice_gets_every_notice_either_rcpt_asked_for(
    tmp_path: Path,
) -> None:
    # RFC 3461 §4.1: NOTIFY is per RCPT. The second naming of a final address was dropped
    # whole: NEVER then FAILURE sent no bounce, and the order of the RCPTs decided.
    p, _intake = policy(tmp_path)
    assert p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK

    def rcpt(local: str, notify: str | None) -> None:
        params = {"NOTIFY": notify} if notify else {}
        assert p.on_rcpt(Rcpt(Address(local, "a.test"), params)) == replies.RECIPIENT_OK

    rcpt("alice", "NEVER")
    rcpt("team", "FAILURE")  # alice again, and x@r.test
    rcpt("alice", "SUCCESS")
    # The alias's own SUCCESS is answered by its "expanded" notice (RFC 3461 §6.2.7.3),
    # not passed on to its members: they get NEVER from it, which adds nothing.
    rcpt("team", "SUCCESS")
    rcpt("postmaster", None)
    rcpt("postmaster", "NEVER")  # adds nothing: the first stays as it was
    notify = {r.address: r.notify for r in p.txn.recipients}
    assert notify == {
        "alice@a.test": ["SUCCESS", "FAILURE"],
        "x@r.test": ["FAILURE"],
        "postmaster@a.test": None,
    }


def test_a_recipient_named_directly_after_an_alias_is_reported_as_named(tmp_path: Path) -> None:
    """A probe: RCPT team@ (reaching alice) then RCPT alice@ NOTIFY=SUCCESS: the success
    notice said ``Original-Recipient: rfc822; team@a.test``, though the RCPT that asked for
    it named alice (RFC 3464 §2.3.1). Named directly once, it is reported as so named."""
    p, _intake = policy(tmp_path)
    assert p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK
    assert p.on_rcpt(Rcpt(Address("team", "a.test"))) == replies.RECIPIENT_OK
    assert p.on_rcpt(Rcpt(Address("alice", "a.test"), {"NOTIFY": "SUCCESS"})) == (
        replies.RECIPIENT_OK
    )
    assert p.on_rcpt(Rcpt(Address("team", "a.test"))) == replies.RECIPIENT_OK  # changes nothing
    alice = next(r for r in p.txn.recipients if r.address == "alice@a.test")
    assert (alice.original, alice.orcpt) == (None, None)
    assert alice.notify == ["SUCCESS", "FAILURE", "DELAY"]
    x = next(r for r in p.txn.recipients if r.address == "x@r.test")
    assert x.original == "team@a.test"


@pytest.mark.parametrize(
    ("first", "second", "reported"),
    [
        # (local part, NOTIFY, ORCPT) of each RCPT; (original, ORCPT) the reports name
        (
            ("one", "SUCCESS", "rfc822;F7"),
            ("alice", None, "rfc822;B7"),
            ("one@a.test", "rfc822;F7"),
        ),
        (("alice", "NEVER", None), ("alice", "SUCCESS", "rfc822;B3"), (None, "rfc822;B3")),
        (("alice", None, "rfc822;A1"), ("team", None, "rfc822;T1"), (None, "rfc822;A1")),
        (("team", None, "rfc822;T2"), ("alice", None, None), (None, None)),
    ],
)
def test_the_rcpt_a_report_answers_names_the_recipient(
    tmp_path: Path,
    first: tuple[str, str | None, str | None],
    second: tuple[str, str | None, str | None],
    reported: tuple[str | None, str | None],
) -> None:
    """A re-probe: after the rule above, alice named directly took the report's name from an
    alias RCPT that alone asked for success (the success notice named the wrong ORCPT)."""
    p, _intake = policy(tmp_path)
    assert p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK
    for local, notify, orcpt in (first, second):
        params = {k: v for k, v in (("NOTIFY", notify), ("ORCPT", orcpt)) if v}
        assert p.on_rcpt(Rcpt(Address(local, "a.test"), params)) == replies.RECIPIENT_OK
    alice = next(r for r in p.txn.recipients if r.address == "alice@a.test")
    assert (alice.original, alice.orcpt) == reported


def test_an_alias_of_several_addresses_owes_one_expanded_notice(tmp_path: Path) -> None:
    # RFC 3461 §6.2.7.3: NOTIFY=SUCCESS for an alias of several addresses is answered by one
    # "expanded" notice for the alias, and its members do not get SUCCESS. It was passed on
    # to each: one "delivered" per mailbox, and a "relayed" or a remote DSN per remote one.
    p, intake = policy(tmp_path)
    assert p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK
    params = {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;team@a.test"}
    assert p.on_rcpt(Rcpt(Address("team", "a.test"), params)) == replies.RECIPIENT_OK
    finish(p)
    ((envelope, _body),) = intake.got
    assert [(r.address, r.notify) for r in envelope.recipients] == [
        ("alice@a.test", ["FAILURE"]),
        ("x@r.test", ["FAILURE"]),
    ]
    (report,) = envelope.reports
    assert (report.recipients, report.actions) == ([], [])
    assert report.expanded == [("team@a.test", "rfc822;team@a.test")]
    # An alias of one address forwards (§6.2.7.2 of the same RFC): NOTIFY goes on whole.
    # And no notice is ever owed to the null sender (RFC 3461 §6.2), nor SUCCESS passed on.
    for sender, rcpt_to in ((Address("x", "r.test"), "one"), (None, "team")):
        assert p.on_mail(Mail(sender)) == replies.SENDER_OK
        params = {"NOTIFY": "SUCCESS"}
        assert p.on_rcpt(Rcpt(Address(rcpt_to, "a.test"), params)) == replies.RECIPIENT_OK
        finish(p)
        envelope, _body = intake.got[-1]
        assert envelope.reports == []
        if sender is not None:
            assert [r.notify for r in envelope.recipients] == [["SUCCESS"]]
        else:
            assert [r.notify for r in envelope.recipients] == [["NEVER"], ["NEVER"]]


def test_every_alias_of_several_addresses_gets_its_notice_whoever_else_names_its_members(
    tmp_path: Path,
) -> None:
    # RFC 3461 §6.2.7.3: the "expanded" notice borrowed a member to carry the alias's name.
    # With none free (each named before: by its own RCPT, by another alias of the same
    # members) no notice was owed and SUCCESS went to the members whole, one "delivered"
    # under another alias's name; and one alias spelled two ways was two aliases.
    p, intake = policy(tmp_path, port="submission")
    p.auth_user = "x@r.test"
    assert p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK
    for local, domain, params in (
        ("alice", "a.test", {"NOTIFY": "NEVER"}),
        ("x", "r.test", {"NOTIFY": "NEVER"}),
        ("Team", "a.test", {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;Team@a.test"}),
        ("team", "a.test", {"NOTIFY": "SUCCESS"}),  # the same alias: no second notice
        ("info", "a.test", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;info@a.test"}),
    ):
        assert p.on_rcpt(Rcpt(Address(local, domain), params)) == replies.RECIPIENT_OK
    finish(p)
    ((envelope, _body),) = intake.got
    assert [(r.address, r.notify) for r in envelope.recipients] == [
        ("alice@a.test", ["FAILURE"]),
        ("x@r.test", ["FAILURE"]),
    ]
    (report,) = envelope.reports
    assert report.expanded == [
        ("Team@a.test", "rfc822;Team@a.test"),
        ("info@a.test", "rfc822;info@a.test"),
    ]


def test_the_finished_message_is_handed_off_once_in_lf_with_our_trace(tmp_path: Path) -> None:
    p, intake = policy(tmp_path)
    reply = transaction(p, "alice@a.test", data=b"Subject: hi\r\n\r\nline\r\n")
    ((envelope, body),) = intake.got
    assert reply.code == 250 and envelope.id in str(reply)
    assert envelope.sender == "x@r.test" and [r.address for r in envelope.recipients] == [
        "alice@a.test"
    ]
    assert body.startswith(b"Return-Path: <x@r.test>\nReceived: from client.r.test ([192.0.2.1])\n")
    assert body.endswith(b"\nSubject: hi\n\nline\n") and b"\r" not in body


@pytest.mark.parametrize(("extended", "protocol"), [(True, b"ESMTP"), (False, b"SMTP")])
def test_the_received_field_names_helo_as_smtp(
    tmp_path: Path, extended: bool, protocol: bytes
) -> None:
    p, intake = policy(tmp_path)
    p.extended = extended  # RFC 3848: "SMTP" after HELO, "ESMTP" after EHLO
    transaction(p, "alice@a.test", data=b"Subject: hi\r\n\r\nline\r\n")
    ((_envelope, body),) = intake.got
    assert b"\tby mx.a.test (postroom) with " + protocol + b" id " in body


def test_the_queues_refusal_is_the_reply(tmp_path: Path) -> None:
    p, intake = policy(tmp_path)
    intake.answer = replies.STORAGE_FULL
    assert transaction(p, "alice@a.test", data=b"Subject: x\r\n\r\ny\r\n") == replies.STORAGE_FULL


def test_too_many_received_headers_are_refused_before_the_hand_off(tmp_path: Path) -> None:
    p, intake = policy(tmp_path)
    loop = b"Received: from a by b; x\r\n" * 100 + b"\r\nbody\r\n"
    assert transaction(p, "alice@a.test", data=loop) == replies.TOO_MANY_HOPS
    assert intake.got == []
    # RFC 5321 §6.3: the threshold "SHOULD" be large, "normally at least 100" (ours counted).
    hops = b"Received: from a by b; x\r\n" * 98 + b"\r\nbody\r\n"
    assert transaction(p, "alice@a.test", data=hops) != replies.TOO_MANY_HOPS


def test_a_spilled_drafts_head_is_its_header_section_not_its_body(tmp_path: Path) -> None:
    """The header checks read a large message's header section, not up to a MiB of its
    body file; a header section that does not end within the limit is read up to it."""
    header, body = b"Subject: hi\r\n\r\n", b"x" * 98 + b"\r\n"
    spares = SpareBodies(tmp_path, None)
    draft = Draft(spares, "Q1", "s@r.test", lambda head: b"", 1000)
    for _ in range(1000):  # 100 KB: past the in-memory limit, in a body file
        draft.write(header if _ == 0 else body)
    assert draft.fresh  # spilled
    assert draft.head(1002) == b"Subject: hi\n\n"
    endless = Draft(spares, "Q2", "s@r.test", lambda head: b"", 1000)
    for _ in range(1000):
        endless.write(b"X-Long: " + b"y" * 90 + b"\r\n")
    assert endless.fresh and len(endless.head(1002)) == 1002
    draft.abort()
    endless.abort()


@pytest.mark.parametrize("lines", [3, 1000], ids=["in memory", "in a body file"])
def test_prepended_fields_go_on_top_without_changing_the_rest(tmp_path: Path, lines: int) -> None:
    """Authentication results and DKIM signatures go above the trace fields; the body file of
    a large message is moved up in place and its CRC follows (what the journal checks)."""
    body = b"Subject: hi\r\n\r\n" + (b"x" * 98 + b"\r\n") * lines
    draft = Draft(SpareBodies(tmp_path, None), "Q1", "s@r.test", lambda h: b"Received: r\n", 1000)
    draft.write(body)
    assert draft.fresh == (lines > 3)
    draft.prepend(b"Authentication-Results: mx; spf=pass\r\nX-Two: 2\r\n")
    expected = b"Authentication-Results: mx; spf=pass\r\nX-Two: 2\r\nReceived: r\r\n" + body
    assert draft.whole() == expected
    assert draft.size == len(b"Return-Path: <s@r.test>\n") + len(expected) - expected.count(b"\n")
    stored, path, crc = draft.finish()
    if path:
        with open(path, "rb") as f:
            stored = f.read()
        assert zlib.crc32(stored) == crc
    assert stored == b"Return-Path: <s@r.test>\n" + expected.replace(b"\r\n", b"\n")


def test_submission_without_login_says_what_is_missing(tmp_path: Path) -> None:
    """RFC 3207 §4: where AUTH needs TLS first, MAIL is told to STARTTLS; under TLS (or with
    no TLS configured at all) it is told to log in."""
    p, _intake = policy(tmp_path, port="submission")
    assert p.on_mail(Mail(Address("x", "a.test"))) == replies.AUTH_REQUIRED  # no TLS here
    p.services.tls = object()  # a TLS context exists: STARTTLS would make AUTH available
    assert p.on_mail(Mail(Address("x", "a.test"))) == replies.MUST_STARTTLS
    p.tls = True
    assert p.on_mail(Mail(Address("x", "a.test"))) == replies.AUTH_REQUIRED


def test_a_session_whose_account_was_deleted_sends_no_more(tmp_path: Path) -> None:
    # A session logged in before `user del` went on relaying (as itself, or as <>) until it
    # ended: deleting a stolen account did not stop it.
    p, intake = policy(tmp_path, port="submission")
    p.tls, p.auth_user = True, "alice@a.test"
    assert p.on_mail(Mail(Address("alice", "a.test"))) == replies.SENDER_OK
    p.services.accounts.users.discard("alice@a.test")
    assert p.on_mail(Mail(Address("alice", "a.test"))) == replies.ACCOUNT_GONE
    assert p.on_mail(Mail(None)) == replies.ACCOUNT_GONE
    assert not intake.got


def test_a_session_whose_account_was_made_again_or_given_a_new_password_sends_no_more(
    tmp_path: Path,
) -> None:
    # user del then user add (a new password): the thief's open session sent again.
    p, intake = policy(tmp_path, port="submission")
    p.tls = True
    accounts = p.services.accounts
    p.authenticated("Alice@A.test", "PLAIN")
    assert p.on_mail(Mail(Address("alice", "a.test"))) == replies.SENDER_OK
    accounts.credential = lambda key: "the hash of a new password"
    assert p.on_mail(Mail(Address("alice", "a.test"))) == replies.ACCOUNT_GONE
    assert not intake.got


def submitted(tmp_path: Path, data: bytes) -> bytes:
    """``data`` submitted by alice to a remote recipient, as handed to the queue (LF)."""
    p, intake = policy(tmp_path, port="submission")
    p.tls, p.auth_user = True, "alice@a.test"
    assert p.on_mail(Mail(Address("alice", "a.test"))) == replies.SENDER_OK
    assert p.on_rcpt(Rcpt(Address("bob", "r.test"))) == replies.RECIPIENT_OK
    p.on_data_start()
    p.on_data(data)
    assert asyncio.run(p.on_message_end()).code == 250
    ((_envelope, body),) = intake.got
    return body


def test_a_submission_without_a_header_section_gets_its_mime_fields_in_the_header(
    tmp_path: Path,
) -> None:
    """Made 7-bit at intake, a message with no header section gains MIME fields: they are
    its header then, not body lines after the blank line our fields once ended with."""
    body = submitted(tmp_path, "h\u00e9llo, no header here\r\n\r\nsecond\r\n".encode())
    msg = email.message_from_bytes(body)
    assert msg["MIME-Version"] == "1.0" and msg["Date"] and msg["Message-ID"]
    assert msg.get_payload(decode=True) == "h\u00e9llo, no header here\n\nsecond\n".encode()


def test_date_and_message_id_are_added_once_and_only_when_missing(tmp_path: Path) -> None:
    """RFC 5322 §4.5: "Date :" is a Date field (it went out twice); a body line of a message
    without a header section is none (it kept ours from being added)."""
    obsolete = submitted(
        tmp_path, b"Date : Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID : <a@b>\r\n\r\nx\r\n"
    )
    assert obsolete.lower().count(b"\ndate") == 1 and obsolete.lower().count(b"message-id") == 1
    headless = submitted(
        tmp_path, b"hello there\r\nDate: in body\r\nMessage-ID: in body\r\n\r\nmore\r\n"
    )
    head = headless.split(b"\n\n", 1)[0]
    assert b"\nDate: " in head and b"\nMessage-ID: <" in head


def test_a_submission_without_from_gets_the_sender_as_from(tmp_path: Path) -> None:
    """RFC 5322 §3.6: From is required; mailutils' mail sends none, and such mail went out
    without one (and unsigned: nothing to sign). One present is left alone."""
    msg = email.message_from_bytes(submitted(tmp_path, b"Subject: x\r\n\r\nbody\r\n"))
    assert msg.get_all("From") == ["<alice@a.test>"]
    msg = email.message_from_bytes(submitted(tmp_path, b"FROM: A <alice@a.test>\r\n\r\nbody\r\n"))
    assert msg.get_all("From") == ["A <alice@a.test>"]


def test_a_header_line_that_is_no_field_ends_the_header_of_a_submission(tmp_path: Path) -> None:
    """RFC 6409 §8, as Postfix's cleanup: the empty line goes before it. Done before the 7-bit
    conversion and before our fields are made, so that the conversion, our fields, the signer
    and every verifier see one header: the signer once ended it there alone, and the MIME
    fields the conversion had put above became body text (review)."""
    data = "Subject: disk\r\nDisk report\r\nDate: in body\r\nFrom: x@y.test\r\n\r\nusage \u00e9\r\n"
    msg = email.message_from_bytes(submitted(tmp_path, data.encode()))
    assert msg["Subject"] == "disk" and msg["MIME-Version"] == "1.0"
    assert msg["From"] == "<alice@a.test>" and msg["Date"] != "in body"
    text = msg.get_payload(decode=True)
    assert text == "Disk report\nDate: in body\nFrom: x@y.test\n\nusage \u00e9\n".encode()
    # Mail that stays here is mended too, and nothing else is done to it.
    p, intake = policy(tmp_path / "local", port="submission")
    p.tls, p.auth_user = True, "alice@a.test"
    assert p.on_mail(Mail(Address("alice", "a.test"))) == replies.SENDER_OK
    assert p.on_rcpt(Rcpt(Address("alice", "a.test"))) == replies.RECIPIENT_OK
    p.on_data_start()
    p.on_data(data.encode())
    assert asyncio.run(p.on_message_end()).code == 250
    ((_envelope, body),) = intake.got
    assert body.endswith(
        b"Subject: disk\n\nDisk report\nDate: in body\nFrom: x@y.test\n\nusage \xc3\xa9\n"
    )


def test_a_step_that_fails_unexpectedly_refuses_the_message_for_now(tmp_path: Path) -> None:
    """A bug or a message no step foresaw, at the end of DATA: 451 and the session goes on
    (it was a crash of the session, which left the client with no answer at all)."""
    p, intake = policy(tmp_path)

    class Broken:
        async def end_of_data(self, *_args: object, **_kw: object) -> Reply | None:
            raise RecursionError("maximum recursion depth exceeded")

    p.services.sender_auth = Broken()
    assert transaction(p, "alice@a.test", data=b"Subject: hi\r\n\r\nx\r\n") == replies.LOCAL_ERROR
    assert intake.got == [] and p.txn.draft is None
    p.services.sender_auth = None
    assert transaction(p, "alice@a.test", data=b"Subject: hi\r\n\r\nx\r\n").code == 250


def test_received_names_a_lone_recipient_unless_its_address_is_utf8(tmp_path: Path) -> None:
    """A UTF-8 address in our Received field alone made an ASCII message unfit for a hop
    without SMTPUTF8 (5.6.9); "for" is optional (RFC 5321 §4.4)."""
    p, intake = policy(tmp_path)
    transaction(p, "alice@a.test", data=b"Subject: hi\r\n\r\nx\r\n")
    assert b"\tfor <alice@a.test>;" in intake.got[0][1]
    p.services.accounts.expand = lambda key, max_depth=10: (
        ["alice@a.test"] if key.startswith("j") else None
    )
    assert p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK
    assert p.on_rcpt(Rcpt(Address("j\u00f6ran", "a.test"))) == replies.RECIPIENT_OK
    p.on_data_start()
    p.on_data(b"Subject: hi\r\n\r\nx\r\n")
    assert asyncio.run(p.on_message_end()).code == 250
    assert b" for <" not in intake.got[1][1] and intake.got[1][1].isascii()


def test_sender_auth_learns_the_size_the_client_sent_before_the_conversion(
    tmp_path: Path,
) -> None:
    """[auth] check_max_size is about the message as sent: the 7-bit conversion of submitted
    mail that leaves makes UTF-8 text threefold, and a third of the limit went out unsigned."""
    p, _intake = policy(tmp_path, port="submission")
    seen: list[tuple[int, object]] = []

    class Recording:
        async def end_of_data(self, message: Any, **kw: object) -> Reply | None:
            seen.append((message.size, kw["received_size"]))
            return None

    p.services.sender_auth = Recording()
    p.tls, p.auth_user = True, "alice@a.test"
    assert p.on_mail(Mail(Address("alice", "a.test"))) == replies.SENDER_OK
    assert p.on_rcpt(Rcpt(Address("bob", "r.test"))) == replies.RECIPIENT_OK
    p.on_data_start()
    p.on_data(
        b"Subject: hi\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + b"\xc3\xa9" * 3000
    )
    assert asyncio.run(p.on_message_end()).code == 250
    ((converted, received),) = seen
    assert isinstance(received, int) and converted > 2 * received > 12000


def test_a_message_whose_client_left_during_its_checks_is_not_queued(tmp_path: Path) -> None:
    """A client that left while the checks waited (a queue of costly messages before it) got
    its message delivered: it never saw the 250, sends it again, and it arrives twice."""
    p, intake = policy(tmp_path)
    assert p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK
    assert p.on_rcpt(Rcpt(Address("alice", "a.test"))) == replies.RECIPIENT_OK
    p.on_data_start()
    p.on_data(b"Subject: x\r\n\r\ny\r\n")
    assert asyncio.run(p.on_message_end(lambda: True)).code == 451
    assert intake.got == []
    finish_ok = p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK
    assert finish_ok and p.on_rcpt(Rcpt(Address("alice", "a.test"))) == replies.RECIPIENT_OK
    p.on_data_start()
    p.on_data(b"Subject: x\r\n\r\ny\r\n")
    assert asyncio.run(p.on_message_end(lambda: False)).code == 250
    assert len(intake.got) == 1


def test_an_account_store_that_cannot_be_read_now_refuses_for_now(tmp_path: Path) -> None:
    """RCPT on a damaged account store ended the session with a traceback."""
    p, _intake = policy(tmp_path)

    def damaged(_key: str) -> list[str] | None:
        raise TemporaryStorageError("the account store: file is not a database")

    p.services.accounts.resolve = damaged
    assert p.on_mail(Mail(Address("x", "r.test"))) == replies.SENDER_OK
    assert p.on_rcpt(Rcpt(Address("alice", "a.test"))).code == 451
    assert p.on_rcpt(Rcpt(Address("bob", "r.test"))) == replies.RELAY_DENIED  # goes on
