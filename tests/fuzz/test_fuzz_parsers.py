"""Fuzzing the parsers that see network bytes, with hypothesis.

The budget is bounded for CI (``POSTROOM_FUZZ_EXAMPLES``, default 3,000 per target, well under
a minute in all); a long run is ``POSTROOM_FUZZ_EXAMPLES=200000 pytest tests/fuzz`` (see
docs/fuzzing.md). Each target may only return a value or raise its documented error.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom import address
from postroom.delivery.dsn import DsnRecipient, build_dsn
from postroom.errors import AddressError
from postroom.smtp import commands
from postroom.wire.replies import Reply

EXAMPLES = int(os.environ.get("POSTROOM_FUZZ_EXAMPLES", "3000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VERBS = st.sampled_from(
    [
        b"EHLO ",
        b"HELO ",
        b"MAIL FROM:",
        b"RCPT TO:",
        b"BDAT ",
        b"AUTH ",
        b"DATA",
        b"VRFY ",
        b"NOOP ",
        b"STARTTLS",
        b"",
    ]
)
PATHY = st.text(alphabet=st.sampled_from(list('<>@."\\ :,[]=+aZ0\u00e9\x00')), max_size=60)


@FUZZ
@given(VERBS, st.one_of(st.binary(max_size=200), PATHY.map(str.encode)), st.booleans())
def test_command_parser(verb: bytes, rest: bytes, utf8: bool) -> None:
    try:
        cmd = commands.parse(verb + rest, smtputf8=utf8)
    except commands.CommandError as exc:
        # A refusal; one that ends the session (a BDAT without a size) with a 421.
        assert isinstance(exc.reply, Reply)
        assert exc.reply.code == 421 if exc.fatal else exc.reply.code >= 500
        assert exc.fatal == commands.is_bdat(verb + rest)
        return
    assert cmd is not None


@FUZZ
@given(PATHY, st.booleans(), st.booleans())
def test_path_parser(text: str, utf8: bool, null: bool) -> None:
    try:
        addr = address.parse_path(text, utf8=utf8, allow_null=null)
    except AddressError:
        return
    if addr is None:
        assert text == "<>" and null
        return
    # Whatever parses renders to something that parses to the same mailbox.
    again = address.parse_mailbox(str(addr), utf8=True)
    assert again.domain == addr.domain
    assert len(addr.local.encode()) <= address.MAX_LOCAL_PART


@FUZZ
@given(st.text(max_size=80))
def test_safe_local_part_never_escapes(text: str) -> None:
    try:
        local = address.safe_local_part(text)
    except AddressError:
        return
    assert "/" not in local and not local.startswith(".") and ".." not in local
    assert "\x00" not in local


@FUZZ
@given(st.binary(max_size=3000), st.sampled_from([None, "FULL", "HDRS"]), st.text(max_size=40))
def test_dsn_builder_survives_any_original(
    original: bytes, ret: str | None, diagnostic: str
) -> None:
    import email

    report = build_dsn(
        hostname="mx.a.test",
        sender="alice@a.test",
        recipients=[DsnRecipient("bob@b.test", "failed", "5.1.1", diagnostic=diagnostic)],
        original=original,
        arrival=0.0,
        now=1.0,
        ret=ret,
    )
    msg = email.message_from_bytes(report)
    assert msg.get_content_type() == "multipart/report"
    assert msg["To"] in ("alice@a.test", "<alice@a.test>")
