"""Password checks against the stored argon2 hash: what counts as a wrong password."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from argon2.exceptions import HashingError, VerificationError

from postroom.errors import PasswordUncheckable
from postroom.storage import credentials


def test_a_right_and_a_wrong_password_and_a_hash_nobody_matches() -> None:
    stored = credentials.make_credentials("s3cret").password_hash
    assert credentials.password_matches(stored, "s3cret")
    assert not credentials.password_matches(stored, "wrong")
    assert not credentials.password_matches(None, "s3cret")  # no such user
    for broken in (stored[:-5], stored[:30], "$argon2id$v=19$m=65536,t=3,p=4$AAAA$BBBB", "x"):
        assert not credentials.password_matches(broken, "s3cret"), broken


@pytest.mark.parametrize("failure", ["Memory allocation error", "Threading failure"])
def test_argon2_that_cannot_run_is_no_wrong_password(
    failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """argon2-cffi raises VerificationError, the base of VerifyMismatchError, for every
    libargon2 error: out of memory, a right password was taken as a wrong one (535 and a
    failed login counted towards the lockout; exhaust probe)."""

    class Failing:
        def verify(self, stored: str, password: str) -> bool:
            raise VerificationError(failure)

    monkeypatch.setattr(credentials, "_HASHER", Failing())
    with pytest.raises(PasswordUncheckable, match=failure):
        credentials.password_matches("$argon2id$...", "s3cret")


def test_python_out_of_memory_is_no_wrong_password_either(monkeypatch: pytest.MonkeyPatch) -> None:
    class Failing:
        def verify(self, stored: str, password: str) -> bool:
            raise MemoryError

    monkeypatch.setattr(credentials, "_HASHER", Failing())
    with pytest.raises(PasswordUncheckable, match="out of memory"):
        credentials.password_matches("$argon2id$...", "s3cret")


def test_an_unknown_user_when_the_dummy_hash_cannot_be_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hash an unknown user is checked against could not be made (argon2 short of memory):
    HashingError escaped, the session was dropped with a traceback, and the answer told an
    unknown user from a known one (recheck probe)."""

    class Failing:
        def hash(self, password: str) -> str:
            raise HashingError("Memory allocation error")

        def verify(self, stored: str, password: str) -> bool:
            raise AssertionError("never reached: no hash to verify against")

    monkeypatch.setattr(credentials, "_HASHER", Failing())
    credentials.dummy_hash.cache_clear()
    try:
        credentials.warm_up()  # the start's: quiet
        with pytest.raises(PasswordUncheckable):
            credentials.password_matches(None, "s3cret")
    finally:
        credentials.dummy_hash.cache_clear()


def test_real_argon2_out_of_address_space_is_uncheckable() -> None:
    """The same with libargon2 itself, in a process whose address space is too small for the
    64 MiB an argon2id check of the default parameters takes."""
    script = textwrap.dedent(
        """
        import resource
        from postroom.errors import PasswordUncheckable
        from postroom.storage import credentials
        stored = credentials.make_credentials("s3cret").password_hash
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + (16 << 20),) * 2)
        try:
            credentials.password_matches(stored, "s3cret")
        except PasswordUncheckable as exc:
            print("uncheckable:", exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.startswith("uncheckable: "), out


def test_a_login_with_anything_around_it_names_no_account() -> None:
    """AUTH PLAIN and POP3 logged in with a name that had a line end, a tab, spaces, a line
    separator or NEL around it: the network's login went through the admin's forgiving parser
    (recheck2 probe; RFC 8265 §3.3)."""
    from postroom.storage.credentials import login_key

    assert login_key("Alice@A.test") == login_key("alice@a.test") == "alice@a.test"
    for bad in (
        " alice@a.test",
        "alice@a.test ",
        "alice@a.test\n",
        "\talice@a.test",
        "alice@a.test\u2028",
        "alice@a.test\x85",
        "alice@a.test\r\n",
    ):
        assert login_key(bad) is None, repr(bad)


def test_a_remembered_login_holds_only_while_the_stored_hash_is_the_one_it_proved() -> None:
    # The cache was valid while the store's files looked unchanged: a login checked in the
    # instant between a password change's write and its commit was remembered under the new
    # state, and the old password went on working for five minutes.
    old = credentials.make_credentials("old password").password_hash
    new = credentials.make_credentials("new password").password_hash
    stored = {"ann@a.test": old}
    cache = credentials.LoginCache()
    verify = cache.verify
    assert verify("ann@a.test", "old password", stored.get) == "ann@a.test"
    assert verify("ANN@a.test", "old password", stored.get) == "ann@a.test"
    stored["ann@a.test"] = new
    assert verify("ann@a.test", "old password", stored.get) is None
    assert verify("ann@a.test", "new password", stored.get) == "ann@a.test"
    del stored["ann@a.test"]
    assert verify("ann@a.test", "new password", stored.get) is None
