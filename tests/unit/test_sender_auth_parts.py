"""The pure parts of sender authentication: Authentication-Results, DMARC records and
evaluation, the DNS record lines, the DKIM key life cycle."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from postroom.auth import dmarc, keys, records, results
from postroom.auth.dkim_verify import DkimResult
from postroom.auth.spf import SpfResult


def test_strip_ours_removes_folded_and_commented_fields_only() -> None:
    msg = (
        b"Received: x\r\n"
        b"Authentication-Results: MX.A.TEST; spf=pass\r\n"
        b"Subject: hi\r\n"
        b"Authentication-Results: (c) mx.a.test.;\r\n\tdkim=pass\r\n"
        b"Authentication-Results: other.test; spf=fail\r\n"
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


def _policy(text: str, domain: str = "bank.test") -> dmarc.Policy:
    return dmarc.Policy(dmarc.parse_record(text), domain)


def test_evaluate_alignment_and_policy() -> None:
    rng = random.Random(1)
    sub_spf = SpfResult("pass", "mail.bank.test", "mailfrom")
    ok = dmarc.evaluate(["bank.test"], _policy("v=DMARC1; p=reject"), sub_spf, [], rng)
    assert ok.result == "pass" and ok.spf_aligned  # relaxed: same organizational domain
    strict = dmarc.evaluate(["bank.test"], _policy("v=DMARC1; p=reject; aspf=s"), sub_spf, [], rng)
    assert strict.result == "fail" and strict.disposition == "reject"
    dk = [DkimResult("pass", "evil.test", "s", "rsa-sha256", "x")]
    unaligned = dmarc.evaluate(["bank.test"], _policy("v=DMARC1; p=quarantine"), None, dk, rng)
    assert unaligned.result == "fail" and unaligned.disposition == "quarantine"
    sub = dmarc.evaluate(["x.bank.test"], _policy("v=DMARC1; p=reject; sp=none"), None, [], rng)
    assert sub.result == "fail" and sub.disposition == "none"  # sp for subdomains
    assert (
        dmarc.evaluate(["a.test", "b.test"], _policy("v=DMARC1; p=reject"), None, [], rng).result
        == "permerror"
    )
    temp = dmarc.Policy(None, temporary="time-out")
    assert dmarc.evaluate(["bank.test"], temp, None, [], rng).result == "temperror"


def test_pct_samples_with_the_next_milder_policy() -> None:
    rng = random.Random(7)
    outcomes = {
        dmarc.evaluate(
            ["bank.test"], _policy("v=DMARC1; p=reject; pct=50"), None, [], rng
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
