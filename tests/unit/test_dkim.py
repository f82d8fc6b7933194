"""DKIM signing and verification without sockets: our signatures verify with dkimpy's own
verifier and with ours, and ours refuses what RFC 6376 and RFC 8301 say to refuse."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, cast

import dkim
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.auth import dkim_canon, dkim_sign, dkim_verify, helper, keys, results
from postroom.auth.lookup import Answer, DnsCache
from postroom.auth.service import SenderAuth, Verdict, publishes
from postroom.config import Config, DNSConfig, Duration, Size
from tests.dnszone import LoopbackDNS

MESSAGE = (
    b"From: Alice <alice@a.test>\r\nTo: bob@b.test\r\nSubject: hello\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m1@a.test>\r\n\r\n"
    b"Hello Bob,\r\n\r\nthe body.\r\n"
)


@pytest.fixture(scope="module")
def key_pair() -> tuple[keys.DkimKey, keys.DkimKey]:
    now = time.time()
    return keys.generate("ed25519", "ed1", now), keys.generate("rsa", "rsa1", now)


def _signed(key_pair: tuple[keys.DkimKey, keys.DkimKey], message: bytes = MESSAGE) -> bytes:
    signers = [dkim_sign.SigningKey("a.test", k.selector, k.private_key()) for k in key_pair]
    return dkim_sign.sign(message, signers, int(time.time())) + message


def _unchecked(head: bytes) -> list[dkim_verify.DkimResult]:
    """The signatures of ``head`` as results of signatures left unchecked (neutral)."""
    sigs = dkim_verify.signatures(head)
    return [dkim_verify.DkimResult("neutral", **dkim_verify.names_of(s)) for s in sigs]


def _zone(*pairs: tuple[str, str]) -> dict[str, Answer]:
    return {f"{sel}._domainkey.a.test": Answer("ok", ((rec.encode(),),)) for sel, rec in pairs}


def _records(key_pair: tuple[keys.DkimKey, keys.DkimKey]) -> dict[str, Answer]:
    return _zone(*((k.selector, k.record()) for k in key_pair))


def _results(message: bytes, zone: dict[str, Answer]) -> list[tuple[str, str]]:
    return [(r.algorithm, r.result) for r in dkim_verify.verify(message, zone)]


def test_both_signatures_pass_with_ours_and_with_dkimpy(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    message = _signed(key_pair)
    zone = _records(key_pair)
    assert sorted(_results(message, zone)) == [("ed25519-sha256", "pass"), ("rsa-sha256", "pass")]

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return zone[name.decode().rstrip(".")].txt()[0]

    d = dkim.DKIM(message)
    assert d.verify(idx=0, dnsfunc=dnsfunc) and d.verify(idx=1, dnsfunc=dnsfunc)


def test_a_changed_body_or_signed_header_fails(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    message = _signed(key_pair)
    zone = _records(key_pair)
    body_changed = message.replace(b"the body.", b"the b0dy.")
    assert {r for _, r in _results(body_changed, zone)} == {"fail"}
    subject_changed = message.replace(b"Subject: hello", b"Subject: hellO")
    assert {r for _, r in _results(subject_changed, zone)} == {"fail"}
    # A second From field added on top breaks it (From is over-signed).
    added = b"From: mallory@evil.test\r\n" + message
    assert {r for _, r in _results(added, zone)} == {"fail"}
    # So does one in the obsolete form (RFC 5322 §4.5.3): it was taken for an mbox "From "
    # line, skipped, and the signature passed while DMARC read the added From.
    added = b"From : mallory@evil.test\r\n" + message
    assert {r for _, r in _results(added, zone)} == {"fail"}
    # An unsigned field in obsolete syntax (RFC 5322 §4.5.3) breaks nothing: it made every
    # signature a permerror, and p=reject refused the message.
    obsolete = message.replace(b"To: bob", b"X-Obs : 1\r\nTo: bob", 1)
    assert {r for _, r in _results(obsolete, zone)} == {"pass"}
    # White space changes survive relaxed canonicalization.
    relaxed = message.replace(b"Subject: hello", b"Subject:   hello ")
    assert {r for _, r in _results(relaxed, zone)} == {"pass"}


def test_a_from_in_the_obsolete_form_is_signed_and_over_signed(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    message = MESSAGE.replace(b"From: ", b"From : ", 1)
    assert message != MESSAGE
    signed = _signed(key_pair, message)
    assert b"h=from:from:" in signed.replace(b"\r\n\t", b"")
    zone = _records(key_pair)
    assert {r for _, r in _results(signed, zone)} == {"pass"}
    assert {r for _, r in _results(b"From: x@a.test\r\n" + signed, zone)} == {"fail"}


def _simple_signed(key: keys.DkimKey, head: bytes, body: bytes) -> bytes:
    """``head`` + ``body`` under a c=simple/simple RSA signature of h=from:from:to:subject,
    made by hand from RFC 6376 §3.7 (our signer makes relaxed ones only)."""
    body_hash = base64.b64encode(hashlib.sha256(body).digest())
    tags = (
        b" v=1; a=rsa-sha256; c=simple/simple; d=a.test; s=" + key.selector.encode()
        + b"; h=from:from:to:subject; bh=" + body_hash + b"; b="
    )  # fmt: skip
    data = head + b"DKIM-Signature:" + tags  # the fields in h= order, bottom up: here as they are
    private = cast(rsa.RSAPrivateKey, key.private_key())
    b = base64.b64encode(private.sign(data, padding.PKCS1v15(), hashes.SHA256()))
    return b"DKIM-Signature:" + tags + b + b"\r\n" + head + b"\r\n" + body


@pytest.mark.parametrize("subject", [b"Subject: hello\r\n", b"Subject : hello\r\n"])
def test_under_simple_a_field_is_selected_by_its_name_whatever_space_before_its_colon(
    key_pair: tuple[keys.DkimKey, keys.DkimKey], subject: bytes
) -> None:
    # RFC 5322 §4.5.3, RFC 6376 §5.4.2: "From :" is a From under c=simple too. It was selected
    # by no h= entry: one added on top of a message whose signature over-signs From passed
    # (and DMARC read it), and a signed "Subject :" failed.
    _ed, rsa_key = key_pair
    head = b"From: Alice <alice@a.test>\r\nTo: bob@b.test\r\n" + subject
    signed = _simple_signed(rsa_key, head, b"Hello Bob,\r\n")
    zone = _records(key_pair)
    assert _results(signed, zone) == [("rsa-sha256", "pass")]
    for added in (b"From: ", b"From : ", b"From\t: "):
        forged = added + b"Mallory <ceo@a.test>\r\n" + signed
        assert _results(forged, zone) == [("rsa-sha256", "fail")], added


def test_keys_that_cannot_vouch_for_mail_give_permerror(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    ed, rsa_key = key_pair
    message = _signed(key_pair)
    p_ed = ed.public_b64()
    p_rsa = rsa_key.public_b64()
    cases = {
        "revoked": ("v=DKIM1; k=ed25519; p=", "v=DKIM1; k=rsa; p="),
        "not for email": (f"v=DKIM1; k=ed25519; s=tlsrpt; p={p_ed}", f"s=tlsrpt; p={p_rsa}"),
        "no sha256": (f"k=ed25519; h=sha1; p={p_ed}", f"h=sha1; p={p_rsa}"),
        "swapped k=": (f"k=rsa; p={p_ed}", f"k=ed25519; p={p_rsa}"),
        "bad version": (f"v=DKIM2; k=ed25519; p={p_ed}", f"v=DKIM2; p={p_rsa}"),
    }
    for label, (ed_record, rsa_record) in cases.items():
        zone = _zone(("ed1", ed_record), ("rsa1", rsa_record))
        assert {r for _, r in _results(message, zone)} == {"permerror"}, label


def test_small_rsa_keys_and_rsa_sha1_never_pass() -> None:
    big = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = big.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )

    def record(key: rsa.RSAPublicKey) -> str:
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "v=DKIM1; p=" + base64.b64encode(der).decode()

    sha256 = dkim.sign(MESSAGE, b"big", b"a.test", pem, include_headers=[b"from"])
    sha1 = dkim.sign(
        MESSAGE, b"big", b"a.test", pem, include_headers=[b"from"], signature_algorithm=b"rsa-sha1"
    )
    zone = _zone(("big", record(big.public_key())))
    assert _results(sha256 + MESSAGE, zone) == [("rsa-sha256", "pass")]
    assert _results(sha1 + MESSAGE, zone) == [("rsa-sha1", "permerror")]  # RFC 8301 §3.1
    # RFC 8301 §3.2: a key under 1024 bits verifies nothing (any odd 768-bit modulus will do:
    # it is refused before it is used).
    small = rsa.RSAPublicNumbers(65537, (1 << 767) | 0x1234567).public_key()
    assert _results(sha256 + MESSAGE, _zone(("big", record(small)))) == [
        ("rsa-sha256", "permerror")
    ]


def test_a_signature_without_from_or_with_a_subdomain_i_under_t_s_is_a_permerror(
    rsa_signer: tuple[bytes, bytes],
) -> None:
    pem, record = rsa_signer
    p = record.partition(b"p=")[2].decode()
    # RFC 6376 §6.1.1: a signature that leaves From out vouches for no author (dkimpy will
    # not make one: its h= is edited; refused before any key is used, whatever b= says).
    signed = dkim.sign(MESSAGE, b"k", b"a.test", pem, include_headers=[b"from", b"to"])
    no_from = re.sub(rb"h=[^;]*;", b"h=to;", signed, count=1)
    assert no_from != signed
    results = dkim_verify.verify(no_from + MESSAGE, _zone(("k", f"v=DKIM1; p={p}")))
    assert [(r.result, r.reason) for r in results] == [("permerror", "From field not signed")]
    # RFC 6376 §3.6.1 t=s: i= must be in d= itself, not in a subdomain of it.
    sub = dkim.sign(MESSAGE, b"k", b"a.test", pem, identity=b"@sub.a.test")
    same = dkim.sign(MESSAGE, b"k", b"a.test", pem, identity=b"alice@a.test")
    for flags, signed, result in (
        ("y:s", sub, "permerror"),
        ("s", same, "pass"),
        ("y", sub, "pass"),
    ):
        zone = _zone(("k", f"v=DKIM1; t={flags}; p={p}"))
        assert _results(signed + MESSAGE, zone) == [("rsa-sha256", result)], flags


def test_a_pending_key_counts_as_published_only_by_a_record_that_verifies_it(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    # A record with the key's p= but the wrong k= made it sign (and retire the good key),
    # although no verifier could check its signatures.
    ed, rsa_key = key_pair
    p_ed = ed.public_b64()
    assert publishes(ed.record().encode(), ed) and publishes(rsa_key.record().encode(), rsa_key)
    assert publishes(f"v=DKIM1; t=y; k=ed25519; p={p_ed[:10]} {p_ed[10:]}".encode(), ed)
    for record in (
        f"v=DKIM1; k=rsa; p={p_ed}",  # the wrong type
        f"v=DKIM1; k=ed25519; s=tlsrpt; p={p_ed}",  # not for email
        f"v=DKIM1; k=ed25519; p={rsa_key.public_b64()}",  # another key
        rsa_key.record(),
    ):
        assert not publishes(record.encode(), ed), record


def test_a_key_whose_s_lists_email_among_other_services_verifies_and_is_published(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    """RFC 6376 §3.6.1: s= is a colon-separated list (FWS around the colons), unknown types
    ignored. "email:*" was compared as one value: a valid key was a permerror, and a new key
    of ours published so stayed pending for ever."""
    ed, rsa_key = key_pair
    message = _signed(key_pair)
    for services in ("email:*", "* : email", "tlsrpt:email", "x-new :*"):
        ed_record = f"v=DKIM1; k=ed25519; s={services}; p={ed.public_b64()}"
        rsa_record = f"v=DKIM1; k=rsa; s={services}; p={rsa_key.public_b64()}"
        zone = _zone(("ed1", ed_record), ("rsa1", rsa_record))
        assert {r for _, r in _results(message, zone)} == {"pass"}, services
        assert publishes(ed_record.encode(), ed) and publishes(rsa_record.encode(), rsa_key)
    for services in ("tlsrpt:x-new", "emails", "e:mail"):
        ed_record = f"v=DKIM1; k=ed25519; s={services}; p={ed.public_b64()}"
        rsa_record = f"v=DKIM1; k=rsa; s={services}; p={rsa_key.public_b64()}"
        zone = _zone(("ed1", ed_record), ("rsa1", rsa_record))
        assert {r for _, r in _results(message, zone)} == {"permerror"}, services
        assert not publishes(ed_record.encode(), ed), services


def test_missing_or_failed_keys(key_pair: tuple[keys.DkimKey, keys.DkimKey]) -> None:
    message = _signed(key_pair)
    assert {r for _, r in _results(message, {})} == {"temperror"}  # not fetched
    failed = {n: Answer("error", error="SERVFAIL") for n in _records(key_pair)}
    assert {r for _, r in _results(message, failed)} == {"temperror"}
    absent = {n: Answer("nxdomain") for n in _records(key_pair)}
    assert {r for _, r in _results(message, absent)} == {"permerror"}
    garbled = message.replace(b"a=rsa-sha256", b"a=rsa-sha512")
    assert ("rsa-sha512", "permerror") in _results(garbled, _records(key_pair))


def test_helper_jobs_round_trip_and_refuse_garbage(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    signers = [dkim_sign.SigningKey("a.test", k.selector, k.private_key()) for k in key_pair]
    header = helper.run_sign(helper.encode_sign(MESSAGE, signers, 1700000000))
    assert header == dkim_sign.sign(MESSAGE, signers, 1700000000)  # both are deterministic
    message = header + MESSAGE
    zone = _records(key_pair)
    sigs = dkim_verify.signatures(message[: message.find(b"\r\n\r\n") + 2])
    chosen = dkim_verify.choose(sigs, lambda _domain: False)
    done = helper.decode_verify(helper.run_verify(helper.encode_verify(message, zone, chosen)))
    assert done == dkim_verify.verify(message, zone)
    assert {r.result for r in done} == {"pass"}
    frame = helper.answer(7, helper.VERIFY, b"not marshal")
    assert frame[:9] == helper._FRAME.pack(7, helper.FAILED, len(frame) - 9)


def test_a_verification_the_helper_gave_up_on_is_not_done_here_and_refused_for_now(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    """Done here, a job that took the helper TIMEOUT would hold the event loop as long; taken
    for dkim=temperror, it let a forged From under p=reject through (a queue of costly
    messages held the helper): the message gets 451, and its sender tries again."""

    class LateHelper:
        async def verify(self, *_args: object) -> list[dkim_verify.DkimResult]:
            raise helper.HelperTimedOut("late")

    cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", 9),)))
    cfg = Config(hostname="mx.b.test", domains=("b.test",))
    cfg = dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, check_timeout=Duration(1)))
    auth = SenderAuth(cfg, cache, cast(keys.KeyStore, None), helper=cast(Any, LateHelper()))
    signed = _signed(key_pair, MESSAGE)
    reply = asyncio.run(
        auth.end_of_data(
            _Submitted(signed), port="smtp", auth_user=None, client_ip="192.0.2.1",
            helo="c.test", sender="alice@a.test",
        )
    )  # fmt: skip
    assert reply is not None and reply.code == 451


async def _helper_on(child: socket.socket) -> helper.DkimHelper:
    """A DkimHelper whose child is the test, at the other end of ``child``'s socketpair."""
    _transport, answers = await asyncio.get_running_loop().create_connection(
        helper._Answers, sock=child
    )
    dkim_helper = helper.DkimHelper()
    dkim_helper._answers = answers
    return dkim_helper


async def _slow_child(sock: socket.socket, jobs: int, pause: float) -> None:
    """A DKIM helper child that answers each of ``jobs`` jobs ``pause`` seconds after the last."""
    reader, writer = await asyncio.open_connection(sock=sock)
    buf, answered = bytearray(), 0
    while answered < jobs:
        buf += await reader.read(1 << 16)
        for job_id, _kind, _payload in helper.frames(buf):
            await asyncio.sleep(pause)
            writer.write(helper._FRAME.pack(job_id, helper.DONE, 2) + b"ok")
            answered += 1
    writer.close()


def test_a_job_waiting_behind_slow_ones_is_not_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper does its jobs in turn: a job is late when the helper answers nothing for
    TIMEOUT, not when the jobs before it took that long (a queue of costly messages timed out
    the one behind them, and a forged From under p=reject came through as dkim=temperror)."""
    monkeypatch.setattr(helper, "TIMEOUT", 0.5)

    async def run() -> list[bytes]:
        ours, theirs = socket.socketpair()
        dkim_helper = await _helper_on(ours)

        # Each job 0.3 s after the last: the fourth waits 1.2 s.
        answering = asyncio.ensure_future(_slow_child(theirs, 4, 0.3))
        jobs = [dkim_helper._call(helper.SIGN, b"job") for _ in range(4)]
        done = await asyncio.gather(*jobs)
        await answering
        return done

    assert asyncio.run(run()) == [b"ok"] * 4


def test_a_helper_that_answers_nothing_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(helper, "TIMEOUT", 0.3)

    async def run() -> float:
        ours, theirs = socket.socketpair()
        dkim_helper = await _helper_on(ours)
        started = time.monotonic()
        with pytest.raises(helper.HelperTimedOut):
            await dkim_helper._call(helper.SIGN, b"job")
        theirs.close()
        return time.monotonic() - started

    assert 0.3 <= asyncio.run(run()) < 2


def test_a_signature_the_helper_did_not_make_in_time_is_made_here() -> None:
    """A hung helper: the message went out unsigned after the helper's time-out (and failed
    DMARC); our own signature is of bounded cost, so it is made in the server instead."""

    class HungHelper:
        async def sign(self) -> bytes:
            raise helper.HelperTimedOut("late")

    auth = SenderAuth.__new__(SenderAuth)
    auth._helper = cast(helper.DkimHelper, HungHelper())
    auth._run_blocking = None
    header = asyncio.run(
        auth._dkim_job(
            100, lambda h: cast(HungHelper, h).sign(), lambda: b"DKIM-Signature: x\r\n", None
        )
    )
    assert header == b"DKIM-Signature: x\r\n"


def test_signing_a_line_of_spaces_takes_linear_time(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    """An authenticated user's hostile body: dkimpy's relaxed body step is quadratic here."""
    message = MESSAGE + b" " * 2_000_000 + b"x\r\n"
    started = time.monotonic()
    signed = _signed(key_pair, message)
    assert time.monotonic() - started < 5
    assert {r for _, r in _results(signed, _records(key_pair))} == {"pass"}


def test_a_long_domain_is_never_folded_inside_d(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    """RFC 6376 §3.5: d= is a domain-name, with no FWS in it. A d= longer than a line was
    broken with CRLF TAB inside the name, and no verifier (ours neither) passed the mail."""
    domain = "a" * 60 + "." + "b" * 34 + ".test"
    assert len(domain) == 100
    message = MESSAGE.replace(b"alice@a.test", f"alice@{domain}".encode())
    signers = [dkim_sign.SigningKey(domain, k.selector, k.private_key()) for k in key_pair]
    signed = dkim_sign.sign(message, signers, int(time.time())) + message
    assert signed.count(f"d={domain};".encode()) == 2  # each d= whole on one line
    assert max(len(line) for line in signed.split(b"\r\n")) <= 998
    zone = {
        f"{k.selector}._domainkey.{domain}": Answer("ok", ((k.record().encode(),),))
        for k in key_pair
    }
    assert sorted(_results(signed, zone)) == [("ed25519-sha256", "pass"), ("rsa-sha256", "pass")]

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return zone[name.decode().rstrip(".")].txt()[0]

    d = dkim.DKIM(signed)
    assert d.verify(idx=0, dnsfunc=dnsfunc) and d.verify(idx=1, dnsfunc=dnsfunc)


def _signed_as_written(pem: bytes, value: bytes, message: bytes = MESSAGE) -> bytes:
    """``message`` with a relaxed/relaxed RSA signature by ``pem`` whose DKIM-Signature
    value is ``value`` as written (right after the colon), ``{bh}`` and ``{b}`` filled in:
    for tag lists neither our signer nor dkimpy's writes. h= must be from:to:subject."""
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, rsa.RSAPrivateKey)
    headers, body = dkim_canon.split_message(message)
    body_hash = hashlib.sha256(dkim_canon.canonical_body(b"relaxed", body)).digest()
    value = value.replace(b"{bh}", base64.b64encode(body_hash))
    canonical = dkim_canon.canonical_headers(Relaxed, headers)
    unsigned = (b"DKIM-Signature", value.replace(b"{b}", b"") + b"\r\n")
    include = [b"from", b"to", b"subject"]
    data = dkim_canon.signed_header_data(Relaxed, canonical, include, unsigned)
    signature = base64.b64encode(key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
    return b"DKIM-Signature:" + value.replace(b"{b}", signature) + b"\r\n" + message


TAGS = b"v=1; a=rsa-sha256; c=relaxed/relaxed; d=a.test; s=k; h=from:to:subject; bh={bh}"


def test_q_may_list_other_query_methods_beside_dns_txt(rsa_signer: tuple[bytes, bytes]) -> None:
    """RFC 6376 §3.5 q=: a colon-separated list, unrecognized methods ignored; a list was a
    permerror (and mail under p=reject refused)."""
    pem, record = rsa_signer
    zone = _zone(("k", record.decode()))
    plain = _signed_as_written(pem, b" " + TAGS + b"; b={b}")
    assert dkim.DKIM(plain).verify(dnsfunc=lambda *_a, **_k: record)  # the helper signs right
    for q in (b"dns/txt", b"dns/txt:other/x", b"other/x : dns/txt", b"DNS/TXT"):
        signed = _signed_as_written(pem, b" " + TAGS + b"; q=" + q + b"; b={b}")
        assert _results(signed, zone) == [("rsa-sha256", "pass")], q
    for q in (b"other/x", b"dns", b"dns/txt/x:dns"):
        signed = _signed_as_written(pem, b" " + TAGS + b"; q=" + q + b"; b={b}")
        assert _results(signed, zone) == [("rsa-sha256", "permerror")], q


def test_a_b_tag_written_first_right_after_the_colon_is_not_signed(
    rsa_signer: tuple[bytes, bytes],
) -> None:
    """RFC 6376 §3.7: b= is hashed empty wherever it stands. "DKIM-Signature:b=..." (no space
    after the colon, b= first, RFC 6376 §3.2: tags in any order) kept its value in the hashed
    data, and a valid signature failed."""
    pem, record = rsa_signer
    zone = _zone(("k", record.decode()))
    spaced = _signed_as_written(pem, b" b={b}; " + TAGS)
    assert dkim.DKIM(spaced).verify(dnsfunc=lambda *_a, **_k: record)
    assert _results(spaced, zone) == [("rsa-sha256", "pass")]
    tight = _signed_as_written(pem, b"b={b}; " + TAGS)
    assert _results(tight, zone) == [("rsa-sha256", "pass")]
    assert _results(tight.replace(b"Subject: hello", b"Subject: hullo"), zone) == [
        ("rsa-sha256", "fail")
    ]


def _check_inbound(dns: LoopbackDNS, tmp_path: Path, message: bytes) -> tuple[Verdict, int]:
    """The server's checks of ``message`` with DNS from ``dns``: the verdict and the number
    of lookups they made."""
    cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", dns.port),)))
    auth = SenderAuth(Config(hostname="mx.b.test"), cache, keys.LocalKeyStore(tmp_path))
    head = message[: message.find(b"\r\n\r\n") + 2]
    verdict = asyncio.run(auth.verify(head, lambda: message, "192.0.2.1", "c.test", ""))
    return verdict, cache.queries


@pytest.mark.parametrize("signer", ["a.test", "news.a.test"])
@pytest.mark.parametrize("others", [10, 12])
def test_the_signature_aligned_with_from_is_checked_below_ten_others(
    tmp_path: Path, signer: str, others: int
) -> None:
    """RFC 6376 §6.1 lets a verifier check only some signatures, but not by header order
    alone: the author's signature (d= aligned with From, RFC 7489 §3.1.1) under ten others
    (forwarders', or any added on the way) was never checked, and DMARC failed (p=reject:
    the mail was refused)."""
    now = time.time()
    author, forwarder = keys.generate("ed25519", "ed1", now), keys.generate("ed25519", "s", now)
    message = dkim_sign.sign(
        MESSAGE, [dkim_sign.SigningKey(signer, "ed1", author.private_key())], int(now)
    )
    message += MESSAGE
    dns = LoopbackDNS()
    try:
        dns.txt(f"ed1._domainkey.{signer}", author.record())
        dns.txt("_dmarc.a.test", "v=DMARC1; p=reject")
        for i in range(others):
            domain = f"fwd{i}.test"
            dns.txt(f"s._domainkey.{domain}", forwarder.record())
            fwd = dkim_sign.SigningKey(domain, "s", forwarder.private_key())
            message = dkim_sign.sign(message, [fwd], int(now)) + message
        verdict, _ = _check_inbound(dns, tmp_path, message)
    finally:
        dns.stop()
    assert verdict.dmarc is not None
    assert (verdict.dmarc.result, verdict.dmarc.dkim_aligned) == ("pass", True)
    checked = [(r.domain, r.result) for r in verdict.dkim]
    assert len(checked) == dkim_verify.MAX_SIGNATURES
    # In header order (RFC 8601 results in the order the signatures stand): the author's last.
    forwarders = [(f"fwd{i}.test", "pass") for i in reversed(range(others))]
    assert checked == [*forwarders[:9], (signer, "pass")]
    header = results.render("mx.b.test", verdict.spf, verdict.dkim, verdict.dmarc).decode()
    assert f"dkim=pass header.d={signer} header.s=ed1" in header
    assert header.index("header.d=fwd") < header.index(f"header.d={signer}")


def test_a_signatures_i_is_its_results_header_i(rsa_signer: tuple[bytes, bytes]) -> None:
    """The i= tag (the AUID, RFC 6376 §3.5) goes into the result, also through the helper
    process, and into Authentication-Results as header.i (RFC 8601 §2.7.1), decoded from
    dkim-quoted-printable; a signature without i= has none."""
    pem, record = rsa_signer
    zone = _zone(("k", record.decode()))
    with_i = dkim.sign(MESSAGE, b"k", b"a.test", pem, identity=b"alice@a.test") + MESSAGE
    domain_only = dkim.sign(MESSAGE, b"k", b"a.test", pem) + MESSAGE  # dkimpy adds i=@a.test
    (result,) = dkim_verify.verify(with_i, zone)
    assert (result.result, result.identity) == ("pass", "alice@a.test")
    done = helper.decode_verify(helper.run_verify(helper.encode_verify(with_i, zone, [0])))
    assert done == [result]
    header = results.render("mx.b.test", None, done, None).decode()
    assert "dkim=pass header.d=a.test header.s=k header.a=rsa-sha256 header.b=" in header
    assert " header.i=alice@a.test\r\n" in header
    (domain,) = dkim_verify.verify(domain_only, zone)
    assert (domain.result, domain.identity) == ("pass", "@a.test")
    assert " header.i=@a.test\r\n" in results.render("mx.b.test", None, [domain], None).decode()
    head = b"DKIM-Signature: v=1; d=a.test; s=k; i=jo=3Dn.x@a.test\r\n"
    head += b"DKIM-Signature: v=1; d=a.test; s=k\r\n"
    encoded, plain = _unchecked(head)
    assert (encoded.identity, plain.identity) == ("jo=n.x@a.test", "")
    rendered = results.render("mx.b.test", None, [encoded, plain], None).decode()
    assert " header.i=jo=n.x@a.test;\r\n" in rendered and rendered.count("header.i") == 1


@pytest.mark.parametrize(
    "encoded",
    [
        b"x=3B=20dkim=3Dpass=20header.d=3Dpaypal.com@a.test",  # a result of its own
        b"x=3Bdkim=3Dpass@a.test",
        b"a=20b@a.test",
        b"x=0D=0AX-Evil:=201@a.test",
        b"=C3=A9@a.test",  # 8-bit, into a header section that may be 7-bit
        b"=FF=FE@a.test",
        b"=22x=22@a.test",
        b"=00=01=0D=0A=7F",  # only controls
    ],
)
def test_an_i_that_decodes_to_no_address_gives_no_header_i(encoded: bytes) -> None:
    """i= is dkim-quoted-printable (RFC 6376 §2.11): decoded, it may hold ";", spaces, "=",
    line ends and 8-bit octets. A signer of its own domain must not put ``x; dkim=pass
    header.d=paypal.com`` into our field (as a quoted string, naive readers take it for a
    result of ours) nor 8-bit into it: only an address (RFC 8601 §2.2 pvalue) is header.i."""
    head = b"DKIM-Signature: v=1; a=rsa-sha256; d=a.test; s=k; b=abcd; i=" + encoded + b"\r\n"
    (result,) = _unchecked(head)
    assert result.identity  # decoded, kept in the result
    rendered = results.render("mx.b.test", None, [result], None)
    assert b"header.i" not in rendered
    assert rendered.endswith(b"header.s=k header.a=rsa-sha256 header.b=abcd\r\n")
    assert rendered.isascii() and rendered.count(b";") == 1 and rendered.count(b"\n") == 2


def test_choose_takes_the_aligned_signatures_first_then_the_others_in_order() -> None:
    sigs = [{b"d": f"x{i}.test".encode()} for i in range(30)] + [{b"s": b"no-d"}]
    sigs[3][b"d"] = sigs[20][b"d"] = sigs[25][b"d"] = b"A.test"
    chosen = dkim_verify.choose(sigs, lambda domain: domain == "a.test")
    assert chosen == [0, 1, 2, 3, 4, 5, 6, 7, 20, 25]
    assert dkim_verify.choose(sigs, lambda _domain: False) == list(range(10))
    assert dkim_verify.choose(sigs[:3], lambda _domain: True) == [0, 1, 2]


@pytest.mark.parametrize("junk_domain", ["junk{i}.test", "a.test"])
def test_a_flood_of_signature_fields_is_read_and_checked_only_up_to_the_limits(
    key_pair: tuple[keys.DkimKey, keys.DkimKey], tmp_path: Path, junk_domain: str
) -> None:
    """10,000 DKIM-Signature fields (of other domains, or claiming the From domain's, each
    with its own selector): at most MAX_SIGNATURE_FIELDS are read and MAX_SIGNATURES keys
    looked up, whatever their domains."""
    junk = b"".join(
        b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=%s; s=s%d;\r\n"
        b"\th=from:to; bh=AAAA; b=AAAA\r\n" % (junk_domain.format(i=i).encode(), i)
        for i in range(10_000)
    )
    message = junk + _signed(key_pair)  # the author's two signatures: 10,001st and 10,002nd
    head = message[: message.find(b"\r\n\r\n") + 2]
    assert len(dkim_verify.signatures(head)) == dkim_verify.MAX_SIGNATURE_FIELDS
    dns = LoopbackDNS()
    try:
        dns.txt("_dmarc.a.test", "v=DMARC1; p=reject")
        started = time.monotonic()
        verdict, lookups = _check_inbound(dns, tmp_path, message)
        took = time.monotonic() - started
    finally:
        dns.stop()
    assert len(verdict.dkim) == dkim_verify.MAX_SIGNATURES
    assert {r.result for r in verdict.dkim} == {"permerror"}  # no key: none fetched for 11th+
    # The keys, the DMARC policy (the From domain is its organizational domain: one name) and
    # SPF of the HELO name (no sender): nothing more.
    assert lookups <= dkim_verify.MAX_SIGNATURES + 2
    assert took < 10
    assert verdict.dmarc is not None and verdict.dmarc.result == "fail"  # beyond what is read


def test_a_signing_key_whose_record_left_dns_stops_signing_until_it_is_back(
    tmp_path: Path,
) -> None:
    # Once seen, a key went on signing after its record was removed (or revoked): every
    # receiver then failed its signatures. Only DNS lacking it at every look for MISSING_FOR
    # withdraws it (a zone change reaches each server of the zone in its time); a failed
    # lookup changes nothing; a revoked key retires at once.
    store = keys.LocalKeyStore(tmp_path)
    ring = keys.KeyRing(store, retire_after=100)
    ed, rsa_key = ring.ensure("a.test", 0)
    ed_name, rsa_name = (f"{k.selector}._domainkey.a.test" for k in (ed, rsa_key))
    dns = LoopbackDNS()
    try:
        dns.txt(ed_name, ed.record())
        dns.txt(rsa_name, rsa_key.record())
        cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", dns.port),), timeout=Duration(1)))
        now = [1000.0]
        cfg = Config(hostname="mx.a.test", domains=("a.test",))
        auth = SenderAuth(cfg, cache, store, clock=lambda: now[0])

        def signing() -> set[str]:
            return {k.selector for k in keys.signing_keys(store.load("a.test"))}

        def recheck_at(when: float) -> set[str]:
            now[0] = when
            asyncio.run(auth.recheck_active("a.test"))
            return signing()

        asyncio.run(auth.look_for_pending("a.test"))
        both = {ed.selector, rsa_key.selector}
        assert signing() == both
        dns.timeout(ed_name)  # no answer: nothing is known
        assert recheck_at(1000) == both
        dns.dead.clear()
        dns.remove(ed_name)
        assert recheck_at(1100) == both  # the first look without it
        dns.txt(ed_name, ed.record())
        assert recheck_at(1200) == both  # back: the count starts again
        dns.remove(ed_name)
        assert recheck_at(1300) == both
        assert recheck_at(1500) == both
        assert recheck_at(1600) == {rsa_key.selector}  # lacking since 1300: withdrawn
        assert [k.withdrawn for k in store.load("a.test")] == [True, False]
        dns.remove(rsa_name)
        dns.txt(rsa_name, "v=DKIM1; k=rsa; p=")  # revoked: retired at once, listed no more
        assert recheck_at(1700) == set()
        old_rsa = next(k for k in store.load("a.test") if k.selector == rsa_key.selector)
        assert old_rsa.state == "retiring" and old_rsa not in keys.listed_keys([old_rsa], 1700)

        # A withdrawn key is looked for by the periodic look only, not by each message.
        queries = cache.queries
        message = _Submitted(b"From: alice@a.test\r\nSubject: x\r\n\r\nhi\r\n")
        for _ in range(3):
            now[0] += 10  # more than RECHECK apart
            _submit(auth, message)
        assert cache.queries == queries and b"DKIM-Signature" not in message.data
        dns.txt(ed_name, ed.record())
        asyncio.run(auth.look_for_pending("a.test"))
        assert signing() == {ed.selector}
        # A withdrawn key signed lately: a rotation retires it (listed a while), not drops it.
        ring.withdraw("a.test", ed.selector)
        rotated = ring.rotate("a.test", 50)
        old_ed = next(k for k in rotated if k.selector == ed.selector)
        assert old_ed.state == "retiring" and old_ed.retire_at == 150
        assert old_ed in keys.listed_keys(rotated, 149)
    finally:
        dns.stop()


def test_the_pending_keys_are_looked_for_side_by_side(tmp_path: Path) -> None:
    """One lookup after the other: a slow answer for the first key left the second
    unconfirmed when the signing's wait for DNS ran out, and the first message after the
    records were published was signed with one key (contract probe)."""
    store = keys.LocalKeyStore(tmp_path)
    ring = keys.KeyRing(store, retire_after=100)
    made = ring.ensure("a.test", 0)
    dns = LoopbackDNS()
    try:
        for key in made:
            dns.txt(f"{key.selector}._domainkey.a.test", key.record())
        cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", dns.port),), timeout=Duration(1)))
        cfg = Config(hostname="mx.a.test", domains=("a.test",))
        auth = SenderAuth(cfg, cache, store, clock=lambda: 1000.0)
        asking = 0
        most = 0
        real = auth._record_of

        async def slow(domain: str, key: keys.DkimKey) -> Answer:
            nonlocal asking, most
            asking += 1
            most = max(most, asking)
            await asyncio.sleep(0.2)
            try:
                return await real(domain, key)
            finally:
                asking -= 1

        auth._record_of = slow  # type: ignore[method-assign]
        asyncio.run(auth.look_for_pending("a.test"))
        assert most == 2
        assert {k.selector for k in keys.signing_keys(store.load("a.test"))} == {
            k.selector for k in made
        }
    finally:
        dns.stop()


def _submit(auth: SenderAuth, message: _Submitted, received_size: int | None = None) -> None:
    """``message`` submitted by alice: what the end of DATA on port 587 does to it."""
    asyncio.run(
        auth.end_of_data(
            message,
            port="submission",
            auth_user="alice@a.test",
            client_ip="",
            helo="",
            sender="",
            received_size=received_size,
        )
    )


class _Submitted:
    """A submitted message as the SMTP policy hands it to SenderAuth (CRLF)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def head(self, limit: int) -> bytes:
        return self.data[:limit]

    def whole(self) -> bytes:
        return self.data

    def prepend(self, fields: bytes) -> None:
        self.data = fields + self.data

    def replace(self, data: bytes) -> None:
        self.data = data


def test_a_submitted_from_in_the_obsolete_form_is_mended_before_it_is_signed(
    tmp_path: Path,
) -> None:
    # "From :" was signed as it came: our verifier passed it, while dkimpy and OpenDKIM see
    # no From field there and failed both signatures (and DMARC with them).
    store = keys.LocalKeyStore(tmp_path)
    ring = keys.KeyRing(store, retire_after=100)
    pair = ring.ensure("a.test", 0)
    for key in pair:
        ring.confirm("a.test", key.selector, 1)
    zone = {f"{k.selector}._domainkey.a.test": k.record().encode() for k in pair}
    cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", 9),)))
    auth = SenderAuth(Config(hostname="mx.a.test", domains=("a.test",)), cache, store)
    body = b"\r\nHello : the body keeps its own spacing.\r\n"
    message = _Submitted(b"From : Alice <alice@a.test>\r\nSubject\t: hi\r\nTo: b@b.test\r\n" + body)
    _submit(auth, message)
    assert message.data.endswith(
        b"From: Alice <alice@a.test>\r\nSubject: hi\r\nTo: b@b.test\r\n" + body
    )
    d = dkim.DKIM(message.data)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return zone[name.decode().rstrip(".")]

    assert d.verify(idx=0, dnsfunc=dnsfunc) and d.verify(idx=1, dnsfunc=dnsfunc)


def test_large_submissions_are_signed_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each message being signed is held in memory several times over: 30 submissions of
    24 MB at once took a worker to 922 MB (recheck probe). From SIGN_TURN_SIZE on, they take
    turns, as large messages being verified on the MX port do; small ones never wait."""
    from postroom.auth import service

    monkeypatch.setattr(service, "SIGN_TURN_SIZE", 1000, raising=False)
    store = keys.LocalKeyStore(tmp_path)
    auth = SenderAuth(
        Config(hostname="mx.a.test", domains=("a.test",)),
        store=store,
        cache=DnsCache(DNSConfig(nameservers=(("127.0.0.1", 9),))),
    )
    busy = peak = 0

    async def sign(message: Any) -> None:
        nonlocal busy, peak
        busy += 1
        peak = max(peak, busy)
        await asyncio.sleep(0.05)
        busy -= 1

    monkeypatch.setattr(auth, "_sign", sign)

    async def main(size: int) -> None:
        messages = [_Submitted(b"From: alice@a.test\r\n\r\n" + b"x" * size) for _ in range(4)]
        await asyncio.gather(
            *(
                auth.end_of_data(
                    m, port="submission", auth_user="alice@a.test", client_ip="", helo="", sender=""
                )
                for m in messages
            )
        )

    asyncio.run(main(2000))
    assert peak == 1
    busy = peak = 0
    asyncio.run(main(10))
    assert peak == 4


def test_a_header_the_signer_cannot_read_goes_unsigned_not_refused(tmp_path: Path) -> None:
    """A header line that is no field made the signer raise, and the submission got 451 4.3.0
    for ever (bytesdiff probe). The policy ends the header section there before signing
    (test_policy); should a header still be unreadable, the message goes unsigned."""
    store = keys.LocalKeyStore(tmp_path)
    ring = keys.KeyRing(store, retire_after=100)
    for key in ring.ensure("a.test", 0):
        ring.confirm("a.test", key.selector, 1)
    cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", 9),)))
    auth = SenderAuth(Config(hostname="mx.a.test", domains=("a.test",)), cache, store)
    data = b"From: alice@a.test\r\nSubject: disk\r\nDisk usage is 93%\r\n\r\ntext\r\n"
    message = _Submitted(data)
    _submit(auth, message)
    assert message.data == data


@pytest.mark.parametrize(
    "damage",
    [b"[1]", b"{garbage", b"", b'[{"selector": "x"}]', b"pem", b"retire_at", b"state", b"created"],
)
def test_keys_that_cannot_be_read_refuse_submission_for_now_and_leave_reports_unsigned(
    tmp_path: Path, damage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged keys.json (or key file) raised a TypeError or KeyError on every message
    (451 with a traceback that named no file), failed every DSN, and stopped the start."""
    store = keys.LocalKeyStore(tmp_path)
    ring = keys.KeyRing(store, retire_after=100)
    for key in ring.ensure("a.test", 0):
        ring.confirm("a.test", key.selector, 1)
    folder = tmp_path / "dkim" / "a.test"
    if damage == b"pem":
        next(folder.glob("*.pem")).write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    elif damage in (b"retire_at", b"state", b"created"):  # edited by hand
        entries = json.loads((folder / "keys.json").read_bytes())
        entries[0][damage.decode()] = "soon"
        (folder / "keys.json").write_text(json.dumps(entries))
    else:
        (folder / "keys.json").write_bytes(damage)
    cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", 9),)))
    cfg = Config(hostname="mx.a.test", domains=("a.test",))
    auth = SenderAuth(cfg, cache, keys.LocalKeyStore(tmp_path))
    with caplog.at_level(logging.ERROR, logger="postroom"):
        auth.ensure_keys()  # logged, not raised: the server starts
        message = _Submitted(b"From: alice@a.test\r\nSubject: hi\r\n\r\ntext\r\n")
        reply = asyncio.run(
            auth.end_of_data(
                message, port="submission", auth_user="alice@a.test", client_ip="", helo="",
                sender="",
            )
        )  # fmt: skip
        assert reply is not None and reply.code == 451
        assert auth.sign_own(b"From: MAILER-DAEMON@mx.a.test\r\n\r\nx\r\n") == b""
    assert str(folder) in caplog.text and "Traceback" not in caplog.text
    with pytest.raises(keys.KeysUnreadable):
        auth.records("a.test")  # `postroom dns`: one line, no traceback


def test_keys_gone_from_under_the_server_are_not_made_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Made again by a reload, they took the selectors' names DNS still published for the
    old keys, and mail went out unsigned, with nothing in the log."""
    store = keys.LocalKeyStore(tmp_path)
    cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", 9),)))
    auth = SenderAuth(Config(hostname="mx.a.test", domains=("a.test",)), cache, store)
    auth.ensure_keys()
    made = sorted(p.name for p in (tmp_path / "dkim" / "a.test").iterdir())
    shutil.rmtree(tmp_path / "dkim")
    with caplog.at_level(logging.ERROR, logger="postroom"):
        auth.ensure_keys()  # the reload
    assert not (tmp_path / "dkim" / "a.test").exists() and made
    assert "gone from the key store" in caplog.text


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"From: alice@a.test",
                b"Subject: x",
                b" folded",
                b"\tfolded",
                b"X-A : obs",
                b"Disk usage 93%",
                b"X Space: 1",
                b": empty",
                b"X-W\xc3\xa9ird: 1",
                b"From alice Mon Jan 1",
                b":x: y",
                b"",
                b"text",
                b"Date: now",
            ]
        ),
        max_size=12,
    )
)
def test_a_submission_ended_where_the_policy_ends_it_is_one_the_signer_reads(
    lines: list[bytes],
) -> None:
    """The policy's rule (mime_downgrade.fields_end) and the signer's parser agree: whatever
    the header, once mended, split_message takes it."""
    from postroom.delivery.mime_downgrade import fields_end
    from postroom.smtp.policy import _submission_form

    data = b"\r\n".join(lines) + b"\r\n\r\nbody\r\n"
    mended = _submission_form(data, leaves=False)
    if fields_end(mended) == 0 and not mended.startswith(b"\r\n"):
        mended = b"\r\n" + mended  # no header section: our fields on top end with the empty line
    dkim_canon.split_message(b"Received: by us\r\n" + mended)


def test_a_key_is_found_among_other_txt_records_at_its_name(
    key_pair: tuple[keys.DkimKey, keys.DkimKey],
) -> None:
    """RFC 6376 §3.6.1 v=: a record that starts with another version is discarded, and of
    several key records (§6.1.2) the one that verifies counts. Only the first was read: an SPF
    record served before the key made a good signature a permerror."""
    message = _signed(key_pair)
    ed = key_pair[0]
    other = keys.generate("ed25519", "ed1", time.time()).record().encode()
    for extra in (b"v=spf1 -all", b" v = DKIM2; p=AAAA", other):
        for order in ((extra, ed.record().encode()), (ed.record().encode(), extra)):
            zone = _records(key_pair)
            zone["ed1._domainkey.a.test"] = Answer("ok", tuple((r,) for r in order))
            got = dict(_results(message, zone))
            assert got == {"ed25519-sha256": "pass", "rsa-sha256": "pass"}, order
    zone = _records(key_pair)
    zone["ed1._domainkey.a.test"] = Answer("ok", ((b"v=spf1 -all",),))
    zone["rsa1._domainkey.a.test"] = Answer("ok", ((other,),))
    assert sorted(_results(message, zone)) == [
        ("ed25519-sha256", "permerror"),  # no key record left
        ("rsa-sha256", "permerror"),  # the only record is a key of another kind
    ]
    zone["ed1._domainkey.a.test"] = Answer("ok", ((other,),))
    assert dict(_results(message, zone))["ed25519-sha256"] == "fail"  # another key
    for order in ((other, b"v=DKIM1; p="), (b"v=DKIM1; p=", other)):  # and a revoked one
        zone["ed1._domainkey.a.test"] = Answer("ok", tuple((r,) for r in order))
        assert dict(_results(message, zone))["ed25519-sha256"] == "fail", order


def test_an_x_not_after_t_is_a_permerror(rsa_signer: tuple[bytes, bytes]) -> None:
    """RFC 6376 §3.5 x=: the value MUST be greater than t=; equal to it was taken."""
    pem, record = rsa_signer
    zone = _zone(("k", record.decode()))
    now = int(time.time())
    for t, x, want in ((now, now + 1, "pass"), (now, now, "permerror")):
        signed = _signed_as_written(pem, b" " + TAGS + b"; t=%d; x=%d; b={b}" % (t, x))
        assert _results(signed, zone) == [("rsa-sha256", want)], (t, x)


def test_an_l_larger_than_the_body_is_a_permerror(rsa_signer: tuple[bytes, bytes]) -> None:
    """RFC 6376 §3.5 l=: it MUST NOT be larger than the canonical body (OpenDKIM refuses it
    too); one that covers the body exactly passes, and so does text added below it."""
    pem, record = rsa_signer
    zone = _zone(("k", record.decode()))
    _headers, body = dkim_canon.split_message(MESSAGE)
    length = len(dkim_canon.canonical_body(b"relaxed", body))
    exact = _signed_as_written(pem, b" " + TAGS + b"; l=%d; b={b}" % length)
    assert _results(exact, zone) == [("rsa-sha256", "pass")]
    assert _results(exact + b"added below\r\n", zone) == [("rsa-sha256", "pass")]
    over = _signed_as_written(pem, b" " + TAGS + b"; l=%d; b={b}" % (length + 1))
    assert _results(over, zone) == [("rsa-sha256", "permerror")]


def test_check_max_size_is_read_against_the_size_the_client_sent(tmp_path: Path) -> None:
    """A submission the 7-bit conversion made larger than check_max_size is signed all the
    same (it left unsigned, and failed DMARC, without a word); one sent larger is not."""
    store = keys.LocalKeyStore(tmp_path)
    ring = keys.KeyRing(store, retire_after=100)
    for key in ring.ensure("a.test", 0):
        ring.confirm("a.test", key.selector, 1)
    cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", 9),)))
    cfg = Config(hostname="mx.a.test", domains=("a.test",))
    cfg = dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, check_max_size=Size(1000)))
    auth = SenderAuth(cfg, cache, store)
    for received, signed in ((900, True), (1001, False)):
        message = _Submitted(b"From: alice@a.test\r\nSubject: hi\r\n\r\n" + b"=C3=A9" * 300)
        _submit(auth, message, received)
        assert message.data.count(b"DKIM-Signature:") == (2 if signed else 0), received


def test_header_b_tells_every_signature_apart() -> None:
    """RFC 6008: header.b is the start of b=, long enough to tell the signatures apart; two
    whose b= began alike were both "header.b=kBeFtP1Q", one pass and one fail (dkimsig
    probe)."""
    alike = [
        dkim_verify.DkimResult("fail", "b.test", "k", "rsa-sha256", "kBeFtP1QxyzA" + "A" * 40),
        dkim_verify.DkimResult("pass", "b.test", "k", "rsa-sha256", "kBeFtP1QxyzB" + "A" * 40),
        dkim_verify.DkimResult("pass", "c.test", "k", "rsa-sha256", "zzzzzzzzzz"),
    ]
    rendered = results.render("mx.a.test", None, alike, None).decode()
    assert "header.b=kBeFtP1QxyzA;" in rendered and "header.b=kBeFtP1QxyzB;" in rendered
    assert "header.b=zzzzzzzz\r\n" in rendered  # (8: no other starts so)
    single = results.render("mx.a.test", None, alike[:1], None).decode()
    assert "header.b=kBeFtP1Q\r\n" in single
    # A copy of a real RSA-4096 signature with one character changed far in: told apart
    # still (it was cut at 255 when written), each value on a line of its own under 998.
    real = "A" * 600 + "xyz" + "B" * 81
    forged = "A" * 600 + "xyQ" + "B" * 81
    pair = [
        dkim_verify.DkimResult("fail", "b.test", "k", "rsa-sha256", forged),
        dkim_verify.DkimResult("pass", "b.test", "k", "rsa-sha256", real),
    ]
    text = results.render("mx.a.test", None, pair, None).decode()
    assert f"header.b={'A' * 600}xyQ;" in text and f"header.b={'A' * 600}xyz\r\n" in text
    assert max(map(len, text.split("\r\n"))) <= 998
    # Identical copies are each told from the real one (the neighbour pass lengthened only
    # the copy next to it: the other showed 8 characters, the real one's start too), and no
    # line is over 998 whatever the starts and an i= after them (recheck4 probe).
    copies = [pair[0], pair[0], pair[1], pair[0]]
    text = results.render("mx.a.test", None, copies, None).decode()
    assert text.count(f"header.b={'A' * 600}xyQ") == 3
    far = "A" * 1300
    long_i = "x" * 60 + "@" + "d" * 60 + "." + "e" * 60 + ".test"
    lookalike = [
        dkim_verify.DkimResult("fail", "b.test", "k", "rsa-sha256", far + "1", identity=long_i),
        dkim_verify.DkimResult("fail", "b.test", "k", "rsa-sha256", far + "2", identity=long_i),
    ]
    text = results.render("mx.a.test", None, lookalike, None).decode()
    assert max(map(len, text.split("\r\n"))) <= 998 and f"header.i={long_i}" in text


def test_header_b_costs_the_same_whatever_the_values() -> None:
    """Ten b= values alike but for their last characters: each longer start was compared
    again pair by pair, and a message of 874 KB held an event loop 45 s (recheck3 probe).
    b= is kept up to MAX_B, and the starts come from one sort."""
    import time

    head = b"".join(
        b"DKIM-Signature: v=1; a=rsa-sha256; d=a.test; s=k; b="
        + b"A" * 400_000
        + str(i).encode()
        + b"\r\n"
        for i in range(10)
    )
    started = time.monotonic()
    found = _unchecked(head)
    rendered = results.render("mx.b.test", None, found, None)
    assert time.monotonic() - started < 2
    assert all(len(r.b) <= dkim_verify.MAX_B for r in found) and rendered.isascii()


def test_a_selector_that_is_no_name_is_left_out_and_named_as_the_fault() -> None:
    """s= in Latin-1: its octets, decoded one by one, put U+FFFD (8-bit) into our own header,
    and the reason said "no d= or s=" (dkimsig probe)."""
    head = b"DKIM-Signature: v=1; a=rsa-sha256; d=a.test; s=s\xe9l; b=abcd\r\n"
    (result,) = dkim_verify.verify(head + b"\r\nhi\r\n", {})
    rendered = results.render("mx.b.test", None, [result], None)
    assert rendered.isascii() and b"header.s" not in rendered
    assert b"dkim=permerror (d= or s= is not a domain name) header.d=a.test" in rendered


def test_a_d_in_u_labels_is_looked_up_at_its_a_labels(rsa_signer: tuple[bytes, bytes]) -> None:
    """RFC 8616 §4: in an internationalized message d= (and s=) SHOULD be U-labels; the key
    is published at the A-label name. Such a signature was a permerror ("not an ASCII
    name"), and mail signed so was refused under p=reject (inbound probe)."""
    pem, record = rsa_signer
    tags = TAGS.replace(b"d=a.test; s=k", "d=bücher.test; s=sél".encode())
    message = "From: jö@bücher.test\r\nTo: b@b.test\r\nSubject: ü\r\n\r\nhi\r\n".encode()
    signed = _signed_as_written(pem, b" " + tags + b"; b={b}", message)
    zone = {"xn--sl-bja._domainkey.xn--bcher-kva.test": Answer("ok", ((record,),))}
    (result,) = dkim_verify.verify(signed, zone)
    assert (result.result, result.domain, result.selector) == (
        "pass",
        "xn--bcher-kva.test",
        "xn--sl-bja",
    )
    rendered = results.render("mx.b.test", None, [result], None)
    assert b"dkim=pass header.d=xn--bcher-kva.test header.s=xn--sl-bja" in rendered
    # i= and d= compared as A-labels, whichever form each is in (recheck2 probe: raw bytes).
    for d, i in (
        ("bücher.test", "u@xn--bcher-kva.test"),
        ("xn--bcher-kva.test", "u@bücher.test"),
        ("BÜCHER.test", "u@sub.bücher.test"),
        ("bücher.test", "u@bu\u0308cher.test"),  # NFD
    ):
        tags = TAGS.replace(b"d=a.test; s=k", f"d={d}; s=sél; i={i}".encode())
        signed = _signed_as_written(pem, b" " + tags + b"; b={b}", message)
        (result,) = dkim_verify.verify(signed, zone)
        assert result.result == "pass", (d, i, result.reason)
    tags = TAGS.replace(b"d=a.test; s=k", "d=bücher.test; s=sél; i=u@xbücher.test".encode())
    signed = _signed_as_written(pem, b" " + tags + b"; b={b}", message)
    assert dkim_verify.verify(signed, zone)[0].result == "permerror"
    # A fullwidth or ideographic-stop spelling is no U-label: not mapped onto the domain
    # (a recheck probe: d=\uff42\u00fc\uff43\uff48\uff45\uff52.test passed as bücher.test).
    for d in ("\uff42\u00fc\uff43\uff48\uff45\uff52.test", "b\u00fccher\u3002test"):
        tags = TAGS.replace(b"d=a.test; s=k", f"d={d}; s=sél".encode())
        signed = _signed_as_written(pem, b" " + tags + b"; b={b}", message)
        assert dkim_verify.verify(signed, zone)[0].result == "permerror", d


def test_a_job_that_waits_past_max_wait_is_given_up_without_killing_the_helper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst of costly messages must not hold a reply past the client's own time-out
    (RFC 5321 §4.5.3.2.6), which would have it send the message again."""
    monkeypatch.setattr(helper, "MAX_WAIT", 0.5)

    async def run() -> list[object]:
        ours, theirs = socket.socketpair()
        dkim_helper = await _helper_on(ours)
        answers = dkim_helper._answers

        # Each job 0.3 s after the last: the third waits 0.9 s.
        answering = asyncio.ensure_future(_slow_child(theirs, 3, 0.3))
        jobs = [dkim_helper._call(helper.SIGN, b"job") for _ in range(3)]
        done = await asyncio.gather(*jobs, return_exceptions=True)
        await answering
        assert dkim_helper._answers is answers  # not taken for hung
        return [d if isinstance(d, bytes) else type(d) for d in done]

    assert asyncio.run(run()) == [b"ok", helper.HelperTimedOut, helper.HelperTimedOut]


def test_a_pending_key_whose_name_dns_gives_another_key_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys made again after theirs were lost, on the day they were first made, take the
    published selectors' names: they waited for their records for ever, in silence."""
    old_store, store = keys.LocalKeyStore(tmp_path / "old"), keys.LocalKeyStore(tmp_path)
    old = keys.KeyRing(old_store, retire_after=100).ensure("a.test", 0)
    new = keys.KeyRing(store, retire_after=100).ensure("a.test", 0)
    assert [k.selector for k in old] == [k.selector for k in new]
    dns = LoopbackDNS()
    try:
        for key in old:
            dns.txt(f"{key.selector}._domainkey.a.test", key.record())
        cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", dns.port),), timeout=Duration(1)))
        auth = SenderAuth(Config(hostname="mx.a.test", domains=("a.test",)), cache, store)
        with caplog.at_level(logging.WARNING, logger="postroom"):
            asyncio.run(auth.look_for_pending("a.test"))
            asyncio.run(auth.look_for_pending("a.test"))
    finally:
        dns.stop()
    said = [r for r in caplog.records if "DNS shows another key" in r.getMessage()]
    assert len(said) == 2  # once for each of the pair, not at every look
    assert not keys.signing_keys(store.load("a.test"))


def test_large_messages_take_turns_and_give_up_after_half_the_helper_s_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past check_max_size a message is verified all the same, one at a time in a worker
    (each holds its size in memory several times over); its turn is bounded, so that it and
    the helper's wait end within a client's 10 minutes."""
    from postroom.auth import service

    monkeypatch.setattr(service, "MAX_WAIT", 0.4)
    cache = DnsCache(DNSConfig(nameservers=(("127.0.0.1", 9),)))
    auth = SenderAuth(Config(hostname="mx.a.test", domains=("a.test",)), cache, None)  # type: ignore[arg-type]

    async def run() -> list[str]:
        said: list[str] = []

        async def take(name: str, large: bool, hold: float) -> None:
            try:
                async with auth._turn(large):
                    said.append(name)
                    await asyncio.sleep(hold)
            except service.ChecksUnavailable:
                said.append(f"{name}: given up")

        await asyncio.gather(
            take("first", True, 0.5), take("second", True, 0), take("small", False, 0)
        )
        return said

    assert sorted(asyncio.run(run())) == ["first", "second: given up", "small"]
