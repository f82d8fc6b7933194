"""The pure parts of sender authentication: Authentication-Results, DMARC records and
evaluation, the DNS record lines, the DKIM key life cycle."""

from __future__ import annotations

import asyncio
import email.errors
import email.policy
import json
import random
import time
from pathlib import Path
from typing import Any, cast

import pytest
import xmlschema
from hypothesis import example, given
from hypothesis import strategies as st

from postroom.auth import dmarc, keys, records, reports, results
from postroom.auth.dkim_verify import DkimResult
from postroom.auth.lookup import Answer, DnsCache
from postroom.auth.spf import SpfResult
from postroom.config import DNSConfig
from postroom.errors import KeysChanged, PostroomError
from tests.dnszone import LoopbackDNS


def test_strip_ours_removes_folded_and_commented_fields_only() -> None:
    msg = (
        b"Received: x\r\n"
        b"Authentication-Results: MX.A.TEST; spf=pass\r\n"
        b"Subject: hi\r\n"
        b"Authentication-Results: (c) mx.a.test.;\r\n\tdkim=pass\r\n"
        b"Authentication-Results: other.test; spf=fail\r\n"
        b'Authentication-Results: "mx.a.\\test"; dkim=pass\r\n'  # a quoted-pair: mx.a.test
        b'Authentication-Results: "mx.a.test"; dkim=pass\r\n'
        b"\r\nAuthentication-Results: mx.a.test; in the body\r\n"
    )
    out = results.strip_ours(msg, "mx.a.test")
    assert out == (
        b"Received: x\r\nSubject: hi\r\n"
        b"Authentication-Results: other.test; spf=fail\r\n"
        b"\r\nAuthentication-Results: mx.a.test; in the body\r\n"
    )


@given(st.binary(max_size=300))
def test_strip_ours_never_grows_and_keeps_the_body(data: bytes) -> None:
    msg = b"Authentication-Results: mx.a.test; x\r\nA: b\r\n\r\n" + data
    out = results.strip_ours(msg, "mx.a.test")
    assert out.endswith(b"\r\n\r\n" + data) and len(out) < len(msg)


def test_render_quotes_what_is_not_a_token() -> None:
    spf = SpfResult("pass", "a.test; dmarc=pass", "mailfrom")
    text = results.render("mx.b.test", spf, [], None).decode()
    assert 'smtp.mailfrom="a.test; dmarc=pass"' in text
    assert text.startswith("Authentication-Results: mx.b.test;\r\n\t")


@pytest.mark.parametrize(
    ("identity", "shown"),
    [
        ("@b.test", "@b.test"),  # RFC 8601 §2.2 pvalue: [ [ local-part ] "@" ] domain-name
        ("alice@mail.b.test", "alice@mail.b.test"),
        ("a.b+c@b.test", "a.b+c@b.test"),
        ("a=b@b.test", "a=b@b.test"),  # ("=" is atext)
        ("", None),  # no i=: no header.i
        # Not of that form: left out, not quoted (no ";" or spaces of a sender's in our field).
        ("x; dkim=pass header.d=paypal.com@b.test", None),
        ('x"; dkim=pass@b.test', None),
        ("a b@b.test", None),
        ("a@b@b.test", None),
        ("a..b@b.test", None),
        ("alice@b.test\n", None),
        ("x\r\nX-Evil: 1@b.test", None),
        ("\xe9@b.test", None),  # 8-bit: not into a header section that may be 7-bit
        ("\ufffd@b.test", None),
        ("\x00\x01\x7f", None),
        ("alice@b", None),  # (one label)
        ("a" * 250 + "@b.test", None),  # longer than any address
    ],
)
def test_header_i_is_the_auid_as_a_pvalue(identity: str, shown: str | None) -> None:
    """RFC 8601 §2.7.1: a DKIM result names the signature's i= (RFC 6376 §3.5) as header.i,
    after the other properties, which keep their order; only when it is an ASCII address of
    the pvalue form (§2.2)."""
    result = DkimResult("pass", "b.test", "sel", "rsa-sha256", "abcd", identity=identity)
    text = results.render("mx.a.test", None, [result], None).decode()
    head = "dkim=pass header.d=b.test header.s=sel header.a=rsa-sha256 header.b=abcd"
    if shown is None:
        assert f"{head}\r\n" in text and "header.i" not in text
    else:
        assert f"{head} header.i={shown}\r\n" in text


def test_a_long_reason_is_cut_at_a_words_end() -> None:
    why = "no answer for sel._domainkey.b.test IN TXT: Server failure, " * 3
    result = DkimResult("temperror", "b.test", "sel", "rsa-sha256", "", why)
    text = results.render("mx.b.test", None, [result], None)
    comment = text.decode().split("dkim=temperror (")[1].split(")")[0]
    assert len(comment) <= 120 and comment.endswith("...")
    assert why.startswith(comment.removesuffix("...") + " ")  # not cut inside a word


def test_parse_record() -> None:
    rec = dmarc.parse_record("v=DMARC1; p=reject; sp=none; pct=50; adkim=s; rua=mailto:a@b.test")
    assert rec is not None and (rec.p, rec.sp, rec.pct, rec.adkim, rec.aspf) == (
        "reject",
        "none",
        50,
        "s",
        "r",
    )
    assert dmarc.parse_record("v=spf1 -all") is None
    assert dmarc.parse_record("v=DMARC1; p=bogus") is None
    bad_p = dmarc.parse_record("v=DMARC1; p=bogus; rua=mailto:x@y.test")
    assert bad_p is not None and bad_p.p == "none"  # RFC 7489 §6.6.3
    # §6.6.3 step 6: a wrong sp is as a wrong p (it used to take p's value: reject).
    assert dmarc.parse_record("v=DMARC1; p=reject; sp=bogus") is None
    bad_sp = dmarc.parse_record("v=DMARC1; p=reject; sp=bogus; rua=mailto:x@y.test")
    assert bad_sp is not None and (bad_sp.p, bad_sp.sp) == ("none", "none")
    no_sp = dmarc.parse_record("v=DMARC1; p=quarantine")
    assert no_sp is not None and no_sp.sp == "quarantine"
    # The tag name is case-insensitive (RFC 5234 §2.3), the version exact (§6.4).
    upper = dmarc.parse_record("V = DMARC1; P=REJECT")
    assert upper is not None and upper.p == "reject"
    assert dmarc.parse_record("v=dmarc1; p=reject") is None
    assert dmarc.parse_record("v=DMARC10; p=reject") is None


@pytest.mark.parametrize(
    ("pct", "read"),
    [
        *[("0", 0), ("50", 50), ("100", 100), ("007", 7)],
        *[(bad, 100) for bad in ("-1", "-0", "101", "1000", "abc", "+50", "5.5", "", "\u0665")],
    ],
)
def test_a_pct_that_is_no_integer_0_to_100_is_the_default_100(pct: str, read: int) -> None:
    """RFC 7489 §6.3: pct is an integer 0-100, and a syntax error gives way to the default;
    -1 was clamped to 0, and p=reject applied to no failing mail."""
    rec = dmarc.parse_record(f"v=DMARC1; p=reject; pct={pct}")
    assert rec is not None and rec.pct == read


class Zone:
    """A DNS cache stand-in: TXT records by name (an absent name: NXDOMAIN)."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records

    async def query(self, name: str, rtype: str, fresh: bool = False) -> Answer:
        texts = self.records.get(name)
        if texts is None:
            return Answer("nxdomain")
        return Answer("ok", tuple((t.encode(),) for t in texts))


def _discover(zone: dict[str, list[str]]) -> dmarc.Policy:
    return asyncio.run(dmarc.discover(cast(Any, Zone(zone)), "sub.two.test"))


def test_discovery_falls_back_to_the_organizational_domain_only_when_nothing_claims_dmarc() -> None:
    parent = {"_dmarc.two.test": ["v=DMARC1; p=reject"]}
    found = _discover(parent)  # RFC 7489 §6.6.3 step 3: nothing at the From domain
    assert found.record is not None and (found.record.p, found.domain) == ("reject", "two.test")
    found = _discover({**parent, "_dmarc.sub.two.test": ["v=spf1 -all"]})  # step 2: discarded
    assert found.record is not None and found.domain == "two.test"
    for there in (
        ["v=DMARC1; p=none", "v=DMARC1; p=quarantine"],  # step 5: several records
        ["v=DMARC1; p=bogus"],  # step 6: a wrong p, no rua
    ):
        found = _discover({**parent, "_dmarc.sub.two.test": there})
        assert (found.record, found.domain) == (None, "sub.two.test"), there


def _policy(text: str, domain: str = "bank.test") -> dmarc.Policy:
    return dmarc.Policy(dmarc.parse_record(text), domain)


PAD = " (" + "x" * 1100 + ")"


@pytest.mark.parametrize(
    "value",
    [
        # The legacy parser glued what follows the address to its domain: bank.testx.evil.test,
        # whose organizational domain is the sender's own (dmarc=pass); readers show
        # ceo@bank.test.
        "ceo@bank.test x.evil.test",
        '"CEO" ceo@bank.test x.evil.test',
        "ceo@bank.test (c) x.evil.test",
        # It found no domain (permerror: delivered); readers show ceo@bank.test.
        "ceo@bank.test[",
        "ceo@bank.test\\",
        "ceo@bank.test a@evil.test",
        "<ceo@bank.test a@evil.test>",
        "ceo@bank.test [a@evil.test]",
        "<ceo@bank.test[a]>",
        "ceo@=?utf-8?q?bank.test?=",
        "ceo@bank\u3002test",  # an ideographic full stop, which UTS 46 maps to "."
        "ceo@\uff42ank.test",  # a fullwidth b
        # Nested comments: both parsers give up (RecursionError, which reached the session).
        "(" * 1000 + ")" * 1000 + " ceo@bank.test",
        "ceo@" + "(" * 1000 + ")" * 1000 + "bank.test",
        # Characters no display draws, which UTS 46 does not map (permerror, delivered).
        "CEO <ceo@bank.test\u200e>",
        "ceo@bank.test\u202e",
        "ceo@bank\u2066.test",
        "ceo@ba\u200dnk.test",
        "ceo@bank.test\U000e0020",
        "ceo@bank.=?utf-8?q?test?=",
        "ceo@bank\\.test",
        # Past the reader's parser's reach (a long comment), comments read both ways, and
        # encoded-words anywhere: the legacy parser glued or lost these.
        "ceo@bank.test(a)x.evil.test" + PAD,
        "ceo@bank.test(x) x.evil.test" + PAD,
        "ceo@(x)bank.test x.evil.test" + PAD,
        "ceo@bank.(x)test x.evil.test" + PAD,
        "ceo@(evil.test)bank.test x" + PAD,
        "ceo@(x)bank.test[" + PAD,
        "=?utf-8?q?ceo=40bank.test?= x.evil.test" + PAD,
        "ceo@=?utf-8*en?q?bank.test?=" + PAD,
        "ceo@=?utf-8?q?bank.test?=x" + PAD,
        # Characters that draw nothing and are no format character (nor mapped by UTS 46).
        "ceo@bank.test\u2800",
        "CEO <ceo@bank.test\u2800>",
        "ceo@bank.test\u2065",
        "ceo@bank.test\ufff0",
        "ceo@bank.test\U000e0002",
        "ceo@bank.test\U00016fe4",
        # An encoded-word for a local part, which a reader decodes (it looked plain).
        "=?utf-8?q?ceo=40bank.test?=@evil.test",
        "=?utf-8?b?Y2VvQGJhbmsudGVzdA==?=@evil.test",
        "CEO <=?utf-8?q?ceo=40bank.test?=@evil.test>",
        # Charsets Python does not know, and a space inside a word (past the reader's reach).
        "=?x-unknown?q?ceo=40bank.test?= x.evil.test" + PAD,
        "ceo@=?x-unknown?q?bank.test?=" + PAD,
        "=?utf-8?b?Y2VvQGJh bmsudGVzdA==?= x.evil.test" + PAD,
        # Decoding where no reader decodes hid the address: base64 that swallows it, and
        # parentheses that decode into a comment around it.
        "x=?x?b?ceo@bank.test a@evil.test?=",
        "x=?x?b?ceo@bank.test\\<a@evil.test>?=",
        "=?x?q?=28?=ceo@bank.test =?x?q?=29?=, a@evil.test",
        "=?x?q?=28?=ceo@bank.test =?x?b?KQ?= <a@evil.test>",
    ],
    ids=lambda value: value[:30],
)
def test_every_from_domain_a_reader_may_be_shown_is_judged(value: str) -> None:
    field = b"From: " + value.encode() + b"\r\n"
    assert "bank.test" in dmarc.from_domains(field)
    rng = random.Random(1)
    spf = SpfResult("pass", "evil.test", "mailfrom")
    policies = {"bank.test": _policy("v=DMARC1; p=reject")}
    for domain in dmarc.from_domains(field):
        policies.setdefault(domain, _policy("v=DMARC1; p=none"))
    verdict = dmarc.evaluate(dmarc.from_domains(field), policies, spf, [], rng)
    assert (verdict.result, verdict.disposition) == ("fail", "reject")


@pytest.mark.parametrize(
    "value",
    [
        '"jane@bank.test via list" <list@evil.test>',
        '"\'jane@bank.test\' via Group" <group@evil.test>, u1@evil.test, "x (y)" <u2@evil.test>',
        '"jane@bank.test via list" <list@evil.test>, '
        + ", ".join(f"u{i}@evil.test" for i in range(80)),
        "=?UTF-8?Q?J=C3=B6rg_Bank?= <jorg@evil.test>",
        "Dr. O'Doe <o@evil.test>",
        '"jane@bank.test" <jane@evil.test> (via web)',
    ],
    ids=lambda value: value[:30],
)
def test_a_plain_list_of_mailboxes_is_judged_by_its_addresses_alone(value: str) -> None:
    # RFC 7489 §3.1: the author is the address, not a display name that names another.
    assert set(dmarc.from_domains(b"From: " + value.encode() + b"\r\n")) == {"evil.test"}


def test_more_from_fields_than_are_read_make_the_message_unreadable() -> None:
    fields = b"".join(b"From: u%d@evil.test\r\n" % i for i in range(dmarc.MAX_FROM_FIELDS))
    assert not dmarc.from_unreadable(fields)
    assert dmarc.from_unreadable(fields + b"From: ceo@bank.test\r\n")


@pytest.mark.parametrize("unit", [" ", "\\", ",", '"', "(a)", "a@", "@a", "<a@b.test> "])
@pytest.mark.parametrize("size", [1000, 4000, 200_000])
def test_reading_a_from_field_takes_bounded_time_whatever_it_holds(unit: str, size: int) -> None:
    # A regular expression that backtracked took a minute of the event loop for 6 KB of
    # spaces, and the email package's parser seconds for 32 KB of backslashes or commas.
    value = (unit * (size // len(unit)) + "x").encode()
    dmarc._kept_field_domains.cache_clear()
    dmarc._head_domains.cache_clear()
    head = b"".join(b"From: %d%s\r\n" % (i, value) for i in range(dmarc.MAX_FROM_FIELDS))
    started = time.process_time()
    dmarc.from_domains(head)
    assert time.process_time() - started < 0.15
    assert dmarc.from_unreadable(head) == (size > dmarc.MAX_FROM_LENGTH)


_ATOM = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_+", min_size=1, max_size=12)
_LABEL = _ATOM.map(lambda a: "d" + a.strip("-_+"))  # (no address literal: not all digits)
_DOMAIN = st.lists(_LABEL, min_size=2, max_size=4).map(".".join)


_NAME = st.one_of(
    st.just(""),
    st.text("abcdefghijklmnopqrstuvwxyz ABC.'-=?_", max_size=20),
    st.text("abcdefghijklmnopqrstuvwxyz @,;:()<>.-", max_size=20).map(lambda t: f'"{t}"'),
)


_COMMENTS = st.sampled_from(["", " (via web)", "(x, y)", " ()"])


@given(st.lists(st.tuples(_ATOM, _DOMAIN, _NAME, st.booleans(), _COMMENTS), min_size=1, max_size=4))
@example([("0", "d0.d0", "", False, ""), ("0", "d0.d0", ".", False, "")])  # (see below)
def test_a_plain_list_is_read_alike_by_both_parsers(
    mailboxes: list[tuple[str, str, str, bool, str]],
) -> None:
    # The reader's parser is skipped for what _PLAIN_LIST matches: it must find the same.
    value = ", ".join(
        (f"{name} <{local}@{domain}>" if angle or name else f"{local}@{domain}") + comment
        for local, domain, name, angle, comment in mailboxes
    )
    if not dmarc._PLAIN_LIST.fullmatch(value):
        return
    read = dmarc.from_domains(b"From: " + value.encode() + b"\r\n")
    domains = [mailbox[1] for mailbox in mailboxes]
    assert read == domains, value
    try:  # (the email package fails on some: a display name that is only "." raises
        # AttributeError, or TypeError after a HeaderParseError; dmarc.py's use of it
        # suppresses every error for that reason)
        shown = email.policy.default.header_factory("From", value).addresses
    except (AttributeError, TypeError, email.errors.HeaderParseError):
        return
    assert [dmarc._shown_domains(a.domain)[0] for a in shown] == domains, value


def test_evaluate_alignment_and_policy() -> None:
    rng = random.Random(1)
    sub_spf = SpfResult("pass", "mail.bank.test", "mailfrom")
    ok = dmarc.evaluate_domain("bank.test", _policy("v=DMARC1; p=reject"), sub_spf, [], rng)
    assert ok.result == "pass" and ok.spf_aligned  # relaxed: same organizational domain
    strict = dmarc.evaluate_domain(
        "bank.test", _policy("v=DMARC1; p=reject; aspf=s"), sub_spf, [], rng
    )
    assert strict.result == "fail" and strict.disposition == "reject"
    dk = [DkimResult("pass", "evil.test", "s", "rsa-sha256", "x")]
    unaligned = dmarc.evaluate_domain("bank.test", _policy("v=DMARC1; p=quarantine"), None, dk, rng)
    assert unaligned.result == "fail" and unaligned.disposition == "quarantine"
    sub = dmarc.evaluate_domain(
        "x.bank.test", _policy("v=DMARC1; p=reject; sp=none"), None, [], rng
    )
    assert sub.result == "fail" and sub.disposition == "none"  # sp for subdomains
    # The comment said "p=none", which read as what bank.test publishes.
    header = results.render("mx.b.test", None, [], sub).decode()
    assert "dmarc=fail (p=reject sp=none dis=none) header.from=x.bank.test" in header
    own = results.render("mx.b.test", None, [], strict).decode()
    assert "dmarc=fail (p=reject dis=reject) header.from=bank.test" in own
    temp = dmarc.Policy(None, temporary="time-out")
    assert dmarc.evaluate_domain("bank.test", temp, None, [], rng).result == "temperror"


def test_pct_samples_with_the_next_milder_policy() -> None:
    rng = random.Random(7)
    outcomes = {
        dmarc.evaluate_domain(
            "bank.test", _policy("v=DMARC1; p=reject; pct=50"), None, [], rng
        ).disposition
        for _ in range(50)
    }
    assert outcomes == {"reject", "quarantine"}


def test_organizational_domain_uses_the_public_suffix_list() -> None:
    assert dmarc.organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert dmarc.organizational_domain("x.y.a.test") == "a.test"


def test_txt_strings_split_at_255_octets() -> None:
    parts = records.txt_strings("a" * 600)
    assert [len(p) - 2 for p in parts] == [255, 255, 90]
    line = records.master_line(records.DnsRecord("x.test.", "TXT", 60, 'say "hi"'))
    assert line == 'x.test.\t60\tIN\tTXT\t"say \\"hi\\""'
    # A cut inside a UTF-8 character keeps both halves, octet for octet (RFC 1035 §5.1 \DDD).
    cut = records.txt_strings("x" * 254 + "é")
    assert cut == ['"' + "x" * 254 + '\\195"', '"\\169"']


def test_key_life_cycle(tmp_path: Path) -> None:
    store = keys.LocalKeyStore(tmp_path)
    ring = keys.KeyRing(store, retire_after=100)
    first = ring.ensure("a.test", 0)
    assert {k.state for k in first} == {"pending"} and keys.signing_keys(first) == []
    for k in first:
        ring.confirm("a.test", k.selector, 10)
    active = keys.signing_keys(store.load("a.test"))
    assert {k.algorithm for k in active} == {"ed25519", "rsa"}
    rotated = ring.rotate("a.test", 86400 * 2)
    assert len(rotated) == 4
    assert keys.signing_keys(rotated) == active  # the new ones wait for DNS
    new_ed = next(k for k in rotated if k.state == "pending" and k.algorithm == "ed25519")
    after = ring.confirm("a.test", new_ed.selector, 86400 * 3)
    signing = keys.signing_keys(after)
    assert new_ed.selector in {k.selector for k in signing}
    old_ed = next(k for k in after if k.algorithm == "ed25519" and k.state == "retiring")
    assert old_ed.retire_at == 86400 * 3 + 100
    assert old_ed in keys.listed_keys(after, 86400 * 3 + 99)
    assert old_ed not in keys.listed_keys(after, 86400 * 3 + 100)
    left = ring.expire("a.test", 86400 * 3 + 100)
    assert old_ed.selector not in {k.selector for k in left}
    assert not (tmp_path / "dkim" / "a.test" / f"{old_ed.selector}.pem").exists()
    assert "PRIVATE" not in repr(left)


def test_a_withdrawn_key_retires_when_a_newer_one_of_its_algorithm_is_seen(tmp_path: Path) -> None:
    ring = keys.KeyRing(keys.LocalKeyStore(tmp_path), retire_after=100)
    old_ed, _old_rsa = ring.ensure("a.test", 0)
    for k in ring.store.load("a.test"):
        ring.confirm("a.test", k.selector, 1)
    new_ed = next(k for k in ring.rotate("a.test", 86400) if k.state == "pending")
    ring.withdraw("a.test", old_ed.selector)  # the admin swapped the records before we saw
    after = ring.confirm("a.test", new_ed.selector, 86401)
    old = next(k for k in after if k.selector == old_ed.selector)
    assert old.state == "retiring" and old.retire_at == 86501


def test_two_processes_making_keys_at_once_end_with_one_pair(tmp_path: Path) -> None:
    """``postroom dns`` and a starting server (or two CLIs) each made a first pair: the second
    save replaced the first, whose records one of them had printed, and their temporary files
    had one name (the loser exited with a raw ENOENT). A save now takes a lock and is refused
    when keys.json changed since it was read; ensure() then takes the pair already made."""
    server, cli = keys.LocalKeyStore(tmp_path), keys.LocalKeyStore(tmp_path)
    assert server.load("a.test") == cli.load("a.test") == []  # both look: none yet
    made = keys.KeyRing(server, 100).ensure("a.test", 0)
    taken = keys.KeyRing(cli, 100).ensure("a.test", 1)  # its own pair is refused
    assert {k.selector for k in taken} == {k.selector for k in made}
    folder = tmp_path / "dkim" / "a.test"
    assert sorted(p.name for p in folder.glob("*.pem")) == sorted(f"{k.selector}.pem" for k in made)
    stale = keys.LocalKeyStore(tmp_path)
    read = stale.load("a.test")  # and between its read and its save, another process rotates
    keys.KeyRing(cli, 100).rotate("a.test", 86400)
    (folder / ".ed20261201.pem.tmp").write_bytes(b"a save killed half way")
    with pytest.raises(KeysChanged):
        stale.save("a.test", read)
    assert len(keys.KeyRing(stale, 100).rotate("a.test", 86400 * 2)) == 2  # read again: done
    assert not list(folder.glob("*.tmp"))


def test_a_read_racing_a_save_reads_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read takes no lock: keys.json read just before a rotate replaced it names a key file
    the rotate then removed (2 reads in 54,207 failed so in a probe). It reads again."""
    store = keys.LocalKeyStore(tmp_path)
    made = keys.KeyRing(store, 100).ensure("a.test", 0)
    real, calls = store._load, []

    def racing(domain: str) -> list[keys.DkimKey]:
        calls.append(domain)
        if len(calls) == 1:
            raise FileNotFoundError("rsa19700101.pem")
        return real(domain)

    monkeypatch.setattr(store, "_load", racing)
    assert store.load("a.test") == made and len(calls) == 2


def test_a_selector_never_names_a_second_key(tmp_path: Path) -> None:
    """Rotating again drops the pending pair that DNS never showed, but not its names: they
    may be published already, or cached by resolvers."""
    ring = keys.KeyRing(keys.LocalKeyStore(tmp_path), retire_after=100)
    names = {k.selector: k.private_pem for k in ring.ensure("a.test", 0)}
    for _ in range(3):
        pending = [k for k in ring.rotate("a.test", 60) if k.state == "pending"]
        assert len(pending) == 2 and not {k.selector for k in pending} & set(names)
        names |= {k.selector: k.private_pem for k in pending}
    assert sorted(n for n in names if n.startswith("ed")) == [
        "ed19700101",
        "ed19700101b",
        "ed19700101c",
        "ed19700101d",
    ]
    assert len(set(names.values())) == len(names)  # every name its own key
    assert keys.new_selector("rsa", 0, ["rsa19700101c", "rsa19691231z"]) == "rsa19700101d"
    # One line from the CLI (a PostroomError), not a traceback.
    with pytest.raises(PostroomError, match="too many"):
        keys.new_selector("rsa", 0, ["rsa19700101z"])


class _Zone:
    """What records.check asks of a DnsCache, from a dict."""

    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        self.zone = zone

    async def query(self, name: str, rdtype: str, *, fresh: bool = False) -> Answer:
        found = self.zone.get((name.rstrip("."), rdtype), [])
        if rdtype == "MX":
            return Answer("ok", tuple((10, v) for v in found)) if found else Answer("nodata")
        return Answer("ok", tuple((v.encode(),) for v in found)) if found else Answer("nodata")


def test_dns_check_judges_records_as_a_receiver_would(tmp_path: Path) -> None:
    """A key record a verifier refuses (s=, h=, v=) is no published key, and two SPF or DMARC
    records spoil each other (RFC 7208 §4.5, RFC 7489 §6.6.3)."""
    key = keys.generate("ed25519", "ed1", 0)
    wanted = records.wanted("a.test", "mx.a.test", [key], "reject", ["mailto:dmarc@a.test"])
    good = {(r.name.rstrip("."), r.type): [r.value] for r in wanted}
    good[("a.test", "MX")] = ["mx.a.test"]

    def statuses(zone: dict[tuple[str, str], list[str]]) -> dict[str, str]:
        found = asyncio.run(records.check(cast(Any, _Zone(zone)), wanted))
        return {f"{f.record.type} {f.record.name}": f.status for f in found}

    assert set(statuses(good).values()) == {"ok"}
    dkim_name = "ed1._domainkey.a.test"
    p = key.public_b64()
    # RFC 6376 §3.6.1: s= is a list; one naming email serves (it stayed "different").
    listed = good | {(dkim_name, "TXT"): [f"v=DKIM1; k=ed25519; s=email:*; p={p}"]}
    assert statuses(listed)[f"TXT {dkim_name}."] == "ok"
    for bad in (
        f"v=DKIM1; k=ed25519; s=tlsrpt; p={p}",
        f"v=DKIM1; k=ed25519; h=sha1; p={p}",
        f"v=DKIM2; k=ed25519; p={p}",
    ):
        assert statuses(good | {(dkim_name, "TXT"): [bad]})[f"TXT {dkim_name}."] == "different"
    # Equal for every evaluator: names in any case, "+" the default qualifier (RFC 7208
    # §4.6.1-4.6.2), and the rua= address's case; these were "different".
    (spf,) = good[("a.test", "TXT")]
    assert spf == "v=spf1 mx -all"
    (dmarc_value,) = good[("_dmarc.a.test", "TXT")]
    shouted = dmarc_value.replace("dmarc@a.test", "DMARC@A.Test")
    same = {("a.test", "TXT"): ["V=SPF1 +MX  -all"], ("_dmarc.a.test", "TXT"): [shouted]}
    assert set(statuses(good | same).values()) == {"ok"}
    softer = good | {("a.test", "TXT"): ["v=spf1 mx ~all"]}
    assert statuses(softer)["TXT a.test."] == "different"
    for broken in ("v=dmarc1; p=reject", "v=DMARC1; p=none; rua=mailto:dmarc@a.test"):
        assert statuses(good | {("_dmarc.a.test", "TXT"): [broken]})["TXT _dmarc.a.test."] != "ok"
    two_spf = good | {("a.test", "TXT"): [*good[("a.test", "TXT")], "v=spf1 -all"]}
    assert statuses(two_spf)["TXT a.test."] == "different"
    two_dmarc = good | {("_dmarc.a.test", "TXT"): [*good[("_dmarc.a.test", "TXT")]] * 2}
    assert statuses(two_dmarc)["TXT _dmarc.a.test."] == "different"


SCHEMA = Path(__file__).resolve().parents[1] / "data" / "rfc7489-rua.xsd"


def _report_row(folder: Path, ip: str, **changes: object) -> dict[str, object]:
    """One row as :func:`reports.record` writes it."""
    record = dmarc.parse_record("v=DMARC1; p=reject; fo=1; rua=mailto:d@b.test")
    assert record is not None
    result = dmarc.DmarcResult(
        "fail", "b.test", "reject", "reject", record, "b.test", sampled_out=True
    )
    spf = SpfResult("softfail", "b.test", "mailfrom")
    dkim = [DkimResult("fail", "b.test", "", "rsa-sha256", "abc")]
    reports.record(folder, ip, "b.test", spf, dkim, result, 1000.0)
    row: dict[str, object] = json.loads((folder / reports.RECORDS).read_bytes().splitlines()[-1])
    return row | changes


def test_aggregate_report_is_valid_under_the_rfc7489_schema(tmp_path: Path) -> None:
    rows = [
        _report_row(tmp_path, "192.0.2.1"),
        _report_row(tmp_path, "2001:db8::1"),
        _report_row(tmp_path, "::ffff:192.0.2.7"),
        _report_row(tmp_path, "192.0.2.1", spf=None, dkim=[]),
        _report_row(tmp_path, "192.0.2.9", disp="none", sampled=False, local=True),
    ]
    del rows[0]["local"]  # a row written before the field was
    built = reports.build(rows, "mx.a.test", "postmaster@a.test", 2000, "r1")
    assert len(built) == 1
    xml = built[0].xml.decode()
    xmlschema.XMLSchema(str(SCHEMA)).validate(xml)
    assert "<source_ip>2001:0db8:0000:0000:0000:0000:0000:0001</source_ip>" in xml
    assert "<source_ip>192.0.2.7</source_ip>" in xml
    assert "<fo>1</fo>" in xml and "<type>sampled_out</type>" in xml
    # dmarc_enforce = false: delivered, and the report says why (RFC 7489 appendix C).
    assert xml.count("<type>local_policy</type>") == 1
    assert "<feedback>" in xml  # no namespace, as in the receivers' reports


def test_a_control_character_from_the_network_leaves_the_report_well_formed_xml(
    tmp_path: Path,
) -> None:
    """A DKIM selector with a control character (any sender may put one in a signature) was
    written into the XML as it came: not well-formed, so the domain owner's parser threw the
    whole report away, every other row with it."""
    dkim = [["b.test\x1b", "se\x01l", "fail"], ["b.test", "s\x00\ufffe", "fail"]]
    rows = [_report_row(tmp_path, "192.0.2.1", dkim=dkim, mfrom="b.test\x0b")]
    xml = reports.build(rows, "mx.a.test", "postmaster@a.test", 2000, "r1")[0].xml.decode()
    xmlschema.XMLSchema(str(SCHEMA)).validate(xml)
    assert "<selector>se?l</selector>" in xml and "<domain>b.test?</domain>" in xml
    assert "<selector>s??</selector>" in xml


def test_a_rua_address_whose_escapes_make_no_address_is_not_used() -> None:
    """%-escapes in a mailto: URI turned into a NUL, a TAB or a lone quote in the RCPT TO
    and the To: field of the report."""
    for bad in ("mailto:a%00b@s.test", "mailto:t%09x@s.test", "mailto:q%22@s.test", "mailto:@s"):
        assert reports.rua_address(bad) is None, bad
    assert reports.rua_address("mailto:%FF@s.test") is None  # (no UTF-8: was U+FFFD)
    assert reports.rua_address("mailto:D%2Bx@S.test!10m") == "D+x@s.test"
    assert reports.rua_address("mailto:r@b\u00fccher.test") == "r@xn--bcher-kva.test"


def test_a_report_to_a_utf8_address_names_it_as_it_is() -> None:
    """RFC 6532 §3.2: the To: of a report to ``ü@s.test`` was an encoded-word, which no
    addr-spec may hold (RFC 2047 §5); an ASCII one stays ASCII."""
    report = reports.Report("s.test", ("mailto:%C3%BC@s.test",), 0, 1, "1.x", b"<feedback/>")
    raw = reports.compose(report, "mx.a.test", "postmaster@a.test", ["\u00fc@s.test"], 2.0)
    assert "To: \u00fc@s.test\r\n".encode() in raw and b"=?utf-8?" not in raw
    plain = reports.compose(report, "mx.a.test", "postmaster@a.test", ["r@s.test"], 2.0)
    assert b"To: r@s.test\r\n" in plain and plain.isascii()


def test_report_rows_follow_the_file_when_it_is_taken_away(tmp_path: Path) -> None:
    _report_row(tmp_path, "192.0.2.1")
    first = reports.take(tmp_path, 1.0)
    assert [r["ip"] for r in first.rows] == ["192.0.2.1"]
    first.finish(keep=False)
    _report_row(tmp_path, "192.0.2.2")  # the writer's file was renamed: it opens a new one
    assert [r["ip"] for r in reports.take(tmp_path, 2.0).rows] == ["192.0.2.2"]


def test_a_row_that_is_not_well_formed_is_left_out_not_fatal(tmp_path: Path) -> None:
    """A row without its fields (damaged, an older format) made every run fail with a
    KeyError, for every domain, run after run (the rows were moved aside already)."""
    _report_row(tmp_path, "192.0.2.1")
    with (tmp_path / reports.RECORDS).open("ab") as f:
        f.write(b'{"pdomain":"x.test","t":1}\n[1]\n{"pdomain":"x.test","dkim":[[1]]}\n')
    good = json.loads((tmp_path / reports.RECORDS).read_bytes().splitlines()[0])
    for field, value in (("rua", [1]), ("t", 10**20), ("dkim", [[1, 2, 3]]), ("pct", -1)):
        with (tmp_path / reports.RECORDS).open("ab") as f:
            f.write(json.dumps(good | {field: value}).encode() + b"\n")
    _report_row(tmp_path, "192.0.2.2")
    taken = reports.take(tmp_path, 1.0)
    assert [r["ip"] for r in taken.rows] == ["192.0.2.1", "192.0.2.2"]
    assert taken.malformed == 7
    assert len(reports.build(taken.rows, "mx.a.test", "postmaster@a.test", 2, "r1")) == 1


def test_rua_size_limits_parse_as_rfc7489_says() -> None:
    assert reports.rua_limit("mailto:d@b.test!10m") == 10 << 20
    assert reports.rua_limit("mailto:d@b.test!1k") == 1024
    assert reports.rua_limit("mailto:d@b.test!500") == 500
    for no_limit in ("mailto:d@b.test", "mailto:d@b.test!", "mailto:d@b.test!10x", "m!1kk"):
        assert reports.rua_limit(no_limit) is None, no_limit


def _report(rua: str, domain: str = "shop.test") -> reports.Report:
    return reports.Report(domain, (rua,), 0, 1, "1.x.mx.a.test.0", b"<feedback/>")


def test_report_destinations_size_authorization_and_a_lookup_to_repeat() -> None:
    class Failing:
        async def query(self, name: str, rtype: str, fresh: bool = False) -> Answer:
            return Answer("error", error="SERVFAIL")

    async def where(zone: dict[str, list[str]] | None, rua: str, size: int = 100) -> Any:
        cache = Failing() if zone is None else Zone(zone)
        return await reports.destinations(cast(Any, cache), _report(rua), size)

    own = asyncio.run(where({}, "mailto:d@shop.test!1k"))  # same organization: no lookup
    assert own.addresses == ["d@shop.test"] and not own.later
    too_big = asyncio.run(where({}, "mailto:d@shop.test!1k", size=2000))
    assert too_big.addresses == [] and not too_big.later and "1024" in too_big.refused[0]
    ok = {"shop.test._report._dmarc.a.test": ["v=DMARC1"]}
    assert asyncio.run(where(ok, "mailto:r@a.test")).addresses == ["r@a.test"]
    unauthorized = asyncio.run(where({}, "mailto:r@a.test"))
    assert unauthorized.addresses == [] and not unauthorized.later
    dns_trouble = asyncio.run(where(None, "mailto:r@a.test"))  # §7.1: ask again later
    assert dns_trouble.addresses == [] and dns_trouble.later


def test_an_authorization_record_with_its_own_rua_on_the_same_host_replaces_the_policys() -> None:
    """RFC 7489 §7.1 step 8: a rua= in ``<domain>._report._dmarc.<host>`` replaces the
    policy's URI for that host, and only with URIs on that host. It was never read: the
    report went to the policy's address."""

    def where(auth: str, *rua: str, size: int = 100) -> reports.Destinations:
        zone = Zone({"shop.test._report._dmarc.e.test": [auth]})
        report = reports.Report("shop.test", rua, 0, 1, "1.x.mx.a.test.0", b"<feedback/>")
        return asyncio.run(reports.destinations(cast(Any, zone), report, size))

    policy = ("mailto:d@shop.test!1k", "mailto:rep@e.test")
    assert where("v=DMARC1; rua=mailto:other@e.test", *policy).addresses == [
        "d@shop.test",
        "other@e.test",
    ]
    assert where("v=DMARC1", *policy).addresses == ["d@shop.test", "rep@e.test"]
    assert where("v=DMARC1; RUA = mailto:other@e.test", *policy).addresses[1] == "other@e.test"
    # Another host may not be named: that override is not used (and logged).
    elsewhere = where("v=DMARC1; rua=mailto:x@evil.test", "mailto:rep@e.test")
    assert elsewhere.addresses == ["rep@e.test"] and "x@evil.test" in elsewhere.refused[0]
    mixed = where(
        "v=DMARC1; rua=mailto:x@evil.test, mailto:big@e.test!1k, mailto:b@E.test",
        "mailto:rep@e.test",
        size=2000,
    )
    assert mixed.addresses == ["b@e.test"] and len(mixed.refused) == 2
    # The override's own size limit counts, not the policy's.
    assert where("v=DMARC1; rua=mailto:o@e.test", "mailto:rep@e.test!1k", size=2000).addresses == [
        "o@e.test"
    ]


def test_report_rows_kept_for_the_next_run_and_one_run_at_a_time(tmp_path: Path) -> None:
    _report_row(tmp_path, "192.0.2.1")
    reports.take(tmp_path, 1.0).finish(keep=True)  # its report could not go out yet
    _report_row(tmp_path, "192.0.2.2")
    again = reports.take(tmp_path, 2.0)
    assert sorted(r["ip"] for r in again.rows) == ["192.0.2.1", "192.0.2.2"]
    assert again.malformed == 0  # (the kept file's first line names what it replaces)
    again.finish(keep=False)
    assert reports.take(tmp_path, 3.0).rows == []
    with reports.exclusive(tmp_path) as first, reports.exclusive(tmp_path) as second:
        assert first and not second
    with reports.exclusive(tmp_path) as again:
        assert again


def test_an_answer_through_a_cname_lasts_as_long_as_the_shortest_ttl() -> None:
    """A CNAME of TTL 1 to a record of TTL 3600: the record was kept an hour (a day at most),
    though the CNAME could point elsewhere a second later."""
    dns = LoopbackDNS()
    try:
        dns.cname("d.test", "t.test")
        dns.txt("t.test", "v=spf1 +all")
        dns.ttl("t.test", "TXT", 3600)
        now = [0.0]
        cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", dns.port),)), clock=lambda: now[0])

        async def twice() -> int:
            await cache.query("d.test", "TXT")
            now[0] = 2.0  # past the CNAME's TTL
            await cache.query("d.test", "TXT")
            return cache.queries

        assert asyncio.run(twice()) == 2
    finally:
        dns.stop()


def test_a_huge_answer_is_used_but_not_kept() -> None:
    """The cache is bounded in entries; a zone of huge TXT sets made each entry 92 KB."""
    dns = LoopbackDNS()
    try:
        for i in range(40):
            dns.txt("big.test", f"{i:03d}" + "x" * 250)
        dns.txt("small.test", "v=spf1 -all")
        cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", dns.port),)))

        async def ask() -> tuple[int, int]:
            sizes = [len((await cache.query(name, "TXT")).txt()) for name in ("big.test",) * 2]
            for _ in range(2):
                await cache.query("small.test", "TXT")
            return cache.queries, min(sizes)

        assert asyncio.run(ask()) == (3, 40)  # big asked each time (and used), small once
    finally:
        dns.stop()


def test_a_from_domain_that_is_no_domain_cannot_pass() -> None:
    # 'Bank <"victim@bank.example">' gave the domain 'bank.example"', looked up as written:
    # no policy, dmarc=none, and the bank's p=reject never applied (RFC 7489 §6.6.1).
    for field in (
        b'From: Bank <"victim@bank.example">\r\n',
        b'From: "Bank <victim@bank.example>\r\n',
        b"From: Bank <victim@bank.example\\>\r\n",
        b"From: x@[127.0.0.1]\r\n",  # an address literal: looked up as _dmarc.[127.0.0.1]
        b"From: x@[IPv6:2001:db8::1]\r\n",
    ):
        # (and the bank's own policy is judged too where a reader shows its domain)
        domains = dmarc.from_domains(field)
        assert "" in domains and set(domains) <= {"", "bank.example"}, field
    assert dmarc.from_domains(b"From: Bank <victim@Bank.Example.>\r\n") == ["bank.example"]


def test_a_report_run_killed_part_way_does_not_report_the_same_rows_again(tmp_path: Path) -> None:
    """A run queues one report per policy domain; killed after the first (kill -9 of the
    server or of ``dmarc report --now``), the next run sent that domain's rows again, under
    another Report-ID that no receiver can tell from a new report (kill9new probe: 160 rows
    reported 222 times). Now each domain is marked on disk once its report is queued."""
    import email
    import gzip
    import re

    from postroom.auth.service import SenderAuth
    from postroom.config import Config

    class Killed(BaseException):
        pass

    folder = tmp_path / "dmarc"
    folder.mkdir()
    template = _report_row(tmp_path / "elsewhere", "192.0.2.1")

    def add_rows(*domains: str) -> None:
        for domain in domains:  # with a rua in its own organization (no §7.1 lookup)
            row = template | {"pdomain": domain, "rua": [f"mailto:r@{domain}"]}
            with (folder / reports.RECORDS).open("ab") as out:
                out.write(json.dumps(row).encode() + b"\n")

    add_rows("b.test", "c.test", "d.test")
    cfg = Config(hostname="mx.a.test", domains=("a.test",), data_dir=tmp_path)
    auth = SenderAuth(cfg, cast(Any, Zone({})), keys.LocalKeyStore(tmp_path / "keys"))
    counted: list[tuple[str, int]] = []  # (policy domain, rows) of each report queued

    def queue_until(limit: int) -> Any:
        async def queue(sender: str, to: list[str], message: bytes) -> str:
            if len(counted) == limit:
                raise Killed
            parts = email.message_from_bytes(message).walk()
            gz = next(p.get_payload(decode=True) for p in parts if p.get_filename())
            xml = gzip.decompress(gz)
            domain = re.search(rb"<domain>(.*?)</domain>", xml)
            assert domain is not None
            rows = sum(int(n) for n in re.findall(rb"<count>(\d+)</count>", xml))
            counted.append((domain.group(1).decode(), rows))
            return f"Q{len(counted)}"

        return queue

    with pytest.raises(Killed):
        asyncio.run(auth.send_reports(queue_until(1)))
    add_rows("b.test")  # after the kill: the next report's
    assert asyncio.run(auth.send_reports(queue_until(99))) == 3
    assert counted == [("b.test", 1), ("b.test", 1), ("c.test", 1), ("d.test", 1)]
    assert asyncio.run(auth.send_reports(queue_until(99))) == 0
    assert not [p.name for p in folder.iterdir() if p.name.startswith("sending")]


def test_rows_kept_run_after_run_stay_in_one_file(tmp_path: Path) -> None:
    """A report that must wait (its authorization lookup keeps failing) kept every file taken
    and its marks, run after run: files and marks grew without end (recheck probe: 300 files,
    an 11 MB progress file). Now the rows left go to one file that replaces those taken, and
    a crash between writing it and removing them reports nothing twice."""
    template = _report_row(tmp_path / "elsewhere", "192.0.2.1")

    def add(domain: str) -> None:
        with (tmp_path / reports.RECORDS).open("ab") as out:
            out.write(json.dumps(template | {"pdomain": domain}).encode() + b"\n")

    for run in range(1, 6):
        add("waits.test")
        add("goes.test")
        taken = reports.take(tmp_path, float(run))
        assert sorted(r["pdomain"] for r in taken.rows) == ["goes.test"] + ["waits.test"] * run
        taken.mark("goes.test")
        taken.finish(keep=True)
        assert [p.name for p in tmp_path.glob("sending*")] == [f"sending-{run * 1000}-left.jsonl"]
    # A crash after the file of rows left was written, before the files it replaces went:
    add("goes.test")
    taken = reports.take(tmp_path, 6.0)
    taken.mark("goes.test")
    replaced = {name: (tmp_path / name).read_bytes() for name in taken.files}
    taken.finish(keep=True)
    for name, data in replaced.items():
        (tmp_path / name).write_bytes(data)
    again = reports.take(tmp_path, 7.0)
    assert sorted(r["pdomain"] for r in again.rows) == ["waits.test"] * 5
    again.finish(keep=False)
    assert not list(tmp_path.glob("sending*"))


def test_past_the_cap_the_oldest_rows_go_and_spare_files_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows past MAX_ROWS were the newest, silently: a domain whose report kept waiting
    filled the cap, and every other domain's new rows were lost (recheck2 probe). Now the
    oldest go, counted. The spare file of a write a crash cut short is removed."""
    monkeypatch.setattr(reports, "MAX_ROWS", 3)
    template = _report_row(tmp_path / "elsewhere", "192.0.2.1")

    def add(domain: str, count: int) -> None:
        with (tmp_path / reports.RECORDS).open("ab") as out:
            for n in range(count):
                row = template | {"pdomain": domain, "t": n}
                out.write(json.dumps(row).encode() + b"\n")

    add("waits.test", 3)
    reports.take(tmp_path, 1.0).finish(keep=True)
    add("ok.test", 2)
    (tmp_path / "sending-9-left.jsonl.tmp").write_bytes(b"{}")
    taken = reports.take(tmp_path, 2.0)
    assert [(r["pdomain"], r["t"]) for r in taken.rows] == [
        ("waits.test", 2),
        ("ok.test", 0),
        ("ok.test", 1),
    ]
    assert taken.dropped == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_a_utf8_report_address_gets_its_own_copy(tmp_path: Path) -> None:
    """A report to ``ü@b.test`` and ``r@b.test`` went in one message whose To: was UTF-8:
    the ASCII address's host, without SMTPUTF8, refused it (5.6.9; recheck probe)."""
    from postroom.auth.service import SenderAuth
    from postroom.config import Config
    from postroom.storage.local.queue import LocalQueue

    folder = tmp_path / "dmarc"
    folder.mkdir()
    row = _report_row(tmp_path / "elsewhere", "192.0.2.1") | {
        "rua": ["mailto:%C3%BC@b.test", "mailto:r@b.test", "mailto:s@b.test"]
    }
    (folder / reports.RECORDS).write_bytes(json.dumps(row).encode() + b"\n")
    cfg = Config(hostname="mx.a.test", domains=("a.test",), data_dir=tmp_path)
    auth = SenderAuth(cfg, cast(Any, Zone({})), keys.LocalKeyStore(tmp_path / "keys"))
    queued: list[tuple[list[str], bytes]] = []

    async def queue(sender: str, to: list[str], message: bytes) -> str:
        queued.append((to, message))
        return f"Q{len(queued)}"

    assert asyncio.run(auth.send_reports(queue)) == 1
    assert [to for to, _ in queued] == [["r@b.test", "s@b.test"], ["\u00fc@b.test"]]
    assert queued[0][1].isascii() and not queued[1][1].isascii()
    # The CLI's way into the queue carries it with SMTPUTF8 (RFC 6531 §3.4), as the server's.
    store = LocalQueue(tmp_path / "spool", "mx.a.test")
    queue_id = store.add_waiting("postmaster@a.test", ["\u00fc@b.test"], queued[1][1])
    assert store.deferred.load(queue_id).smtputf8
