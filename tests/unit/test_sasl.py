"""SASL mechanisms on the server side: SCRAM-SHA-256's last step."""

from __future__ import annotations

import base64
import hashlib
import hmac

from postroom import sasl
from postroom.sasl import derive_scram_keys

SECRET = b"the account store's decoy secret"


def client_final(first_bare: str, server_first: str, password: str, gs2: str = "n,,") -> bytes:
    """The client-final message of RFC 5802 §3 (its proof) for ``password``."""
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    final_wo = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
    auth_msg = f"{first_bare},{server_first},{final_wo}".encode()
    sig = hmac.new(hashlib.sha256(client_key).digest(), auth_msg, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig, strict=True)))
    return f"{final_wo},p={proof.decode()}".encode()


def scram_to_server_final(password: str = "pw") -> sasl.ScramSha256:
    """A SCRAM exchange driven by hand up to the server-final message."""
    mech = sasl.ScramSha256(SECRET)
    first_bare = "n=u@a.test,r=abc"
    step = mech.start(b"n,," + first_bare.encode())
    assert isinstance(step, sasl.NeedScramKeys)
    step = mech.provide_keys(derive_scram_keys("pw"))
    assert isinstance(step, sasl.Challenge)
    step = mech.step(client_final(first_bare, step.data.decode(), password))
    assert isinstance(step, sasl.Success) and step.final is not None
    return mech


def test_scram_completes_on_an_empty_response_only() -> None:
    assert isinstance(scram_to_server_final().step(b""), sasl.Success)
    # RFC 4954 §4 / RFC 5034 §4: the answer to the server-final message is empty.
    step = scram_to_server_final().step(b"anything")
    assert isinstance(step, sasl.Failure) and step.malformed


def test_scram_mandatory_extension_fails_authentication() -> None:
    # RFC 5802 §5.1: "m" is reserved for mandatory extensions; its presence "MUST cause
    # authentication failure when the attribute is parsed by the other end". It was skipped.
    for first in (b"n,,m=ext,n=u@a.test,r=abc", b"y,,m=,n=u@a.test,r=abc"):
        step = sasl.ScramSha256(SECRET).start(first)
        assert isinstance(step, sasl.Failure) and step.malformed, first
    # Its attributes come in the grammar's order: the user name first, then the nonce.
    step = sasl.ScramSha256(SECRET).start(b"n,,r=abc,n=u@a.test")
    assert isinstance(step, sasl.Failure) and step.malformed


def test_scram_nonce_of_other_than_printable_ascii_is_malformed() -> None:
    """RFC 5802 §7: c-nonce = printable (%x21-2B / %x2D-7E); it was echoed back whatever it held."""
    for nonce in (b"a b", b"a\tb", b"a\x7fb", "n\u00e9".encode()):
        step = sasl.ScramSha256(SECRET).start(b"n,,n=u@a.test,r=" + nonce)
        assert isinstance(step, sasl.Failure) and step.malformed, nonce
    assert isinstance(sasl.ScramSha256(SECRET).start(b"n,,n=u@a.test,r=!~+/="), sasl.NeedScramKeys)


def test_plain_with_another_authzid_fails_naming_who_tried() -> None:
    """The failure is logged and throttled under the authcid: the login can be traced."""
    mech = sasl.new_mechanism("PLAIN", SECRET)
    assert mech is not None
    step = mech.start(b"boss@a.test\0Ann@a.test\0pw")
    assert isinstance(step, sasl.Failure) and not step.malformed
    assert step.username == "Ann@a.test"
    same = sasl.new_mechanism("PLAIN", SECRET)
    assert same is not None
    assert isinstance(same.start(b"ann@a.test\0Ann@a.test\0pw"), sasl.CheckPassword)


def test_scram_authzid_only_for_oneself() -> None:
    """As with PLAIN: an authzid naming the user logging in is taken (and is part of the
    channel binding c=); another one fails, naming who tried; a malformed one is malformed."""
    step = sasl.ScramSha256(SECRET).start(b"n,a=U@A.test,n=u@a.test,r=abc")
    assert isinstance(step, sasl.NeedScramKeys)
    step = sasl.ScramSha256(SECRET).start(b"n,a=boss@a.test,n=u@a.test,r=abc")
    assert isinstance(step, sasl.Failure) and not step.malformed and step.username == "u@a.test"
    for first in (b"n,x=u@a.test,n=u@a.test,r=abc", b"n,a=,n=u@a.test,r=abc", b"p=tls,,n=u,r=a"):
        step = sasl.ScramSha256(SECRET).start(first)
        assert isinstance(step, sasl.Failure) and step.malformed, first


def test_scram_with_an_authzid_logs_in() -> None:
    """The channel binding c= carries the whole GS2 header, authzid included."""
    mech = sasl.ScramSha256(SECRET)
    gs2, first_bare = "n,a=u@a.test,", "n=u@a.test,r=abc"
    assert isinstance(mech.start((gs2 + first_bare).encode()), sasl.NeedScramKeys)
    step = mech.provide_keys(derive_scram_keys("pw", b"s" * 16, 4096))
    assert isinstance(step, sasl.Challenge)
    step = mech.step(client_final(first_bare, step.data.decode(), "pw", gs2))
    assert isinstance(step, sasl.Success) and step.username == "u@a.test"


def test_an_authzid_naming_the_same_account_in_another_spelling_is_taken() -> None:
    """Logins are matched by account key (case, IDNA form, needless quotes, a trailing dot):
    an authzid is compared the same way."""
    for authzid, authcid in (
        ("alice@a.test.", "alice@a.test"),
        ('"alice"@a.test', "alice@a.test"),
        ("carol@xn--bcher-kva.test", "carol@bücher.test"),
        ("ALICE@A.TEST", "alice@a.test"),
    ):
        mech = sasl.new_mechanism("PLAIN", SECRET)
        assert mech is not None
        step = mech.start(f"{authzid}\0{authcid}\0pw".encode())
        assert isinstance(step, sasl.CheckPassword), authzid
    assert not sasl.same_account("alice@a.test", "alice@b.test")
    assert not sasl.same_account("alice@a.test", "not an address")


def test_an_unknown_users_salt_comes_from_the_stores_secret_alone() -> None:
    """The made-up salt is the same for every mechanism object given the store's secret (as
    every node and every restart is) and for every spelling of one account; it was made from
    a per-process secret, so two nodes' answers told who has no account."""

    def salt(secret: bytes, name: str) -> bytes:
        mech = sasl.ScramSha256(secret)
        assert isinstance(mech.start(f"n,,n={name},r=abc".encode()), sasl.NeedScramKeys)
        step = mech.provide_keys(None)
        assert isinstance(step, sasl.Challenge)
        fields = dict(kv.split("=", 1) for kv in step.data.decode().split(","))
        return base64.b64decode(fields["s"])

    first = salt(SECRET, "nobody@a.test")
    assert salt(SECRET, "nobody@a.test") == first == salt(SECRET, "NoBody@A.TEST")
    assert salt(SECRET, "nobody@xn--bcher-kva.test") == salt(SECRET, "nobody@bücher.test")
    assert salt(b"another store", "nobody@a.test") != first
    assert salt(SECRET, "other@a.test") != first
