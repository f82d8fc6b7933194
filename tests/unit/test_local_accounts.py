"""The SQLite account store's alias clean-up: what ``user del`` and ``alias del`` take out."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from postroom import passwords
from postroom.address import Address
from postroom.errors import AccountError, PasswordUncheckable, TemporaryStorageError
from postroom.sasl import SCRAM_ITERATIONS, derive_scram_keys
from postroom.storage import credentials
from postroom.storage.local.accounts import Accounts


@pytest.fixture
def accounts(tmp_path: Path) -> Accounts:
    store = Accounts(tmp_path, ["a.test", "b.test"])
    store.add_user(Address("ann", "a.test"), "pw")
    store.add_user(Address("bob", "a.test"), "pw")
    return store


def test_user_del_takes_the_user_out_and_in_turn_emptied_aliases(accounts: Accounts) -> None:
    accounts.add_alias("sales@a.test", ["ann@a.test"])
    accounts.add_alias("team@a.test", ["sales@a.test", "bob@a.test"])
    accounts.add_alias("all@a.test", ["team@a.test", "x@remote.test"])
    accounts.add_alias("@b.test", ["ann@a.test"])
    assert accounts.delete_user(Address("ann", "a.test")) == [
        ("ann@a.test", "@b.test"),
        ("ann@a.test", "sales@a.test"),
        ("sales@a.test", "team@a.test"),  # sales is left with no target: gone too
    ]
    assert accounts.list_aliases() == {
        "all@a.test": ["team@a.test", "x@remote.test"],
        "team@a.test": ["bob@a.test"],
    }


def test_alias_del_takes_the_alias_out_of_every_alias(accounts: Accounts) -> None:
    accounts.add_alias("sales@a.test", ["ann@a.test"])
    accounts.add_alias("team@a.test", ["sales@a.test"])
    accounts.add_alias("all@a.test", ["team@a.test", "bob@a.test"])
    assert accounts.delete_alias("sales@a.test") == [
        ("sales@a.test", "team@a.test"),
        ("team@a.test", "all@a.test"),
    ]
    assert accounts.list_aliases() == {"all@a.test": ["bob@a.test"]}
    with pytest.raises(AccountError, match="no such alias"):
        accounts.delete_alias("sales@a.test")


def test_alias_del_of_a_user_keeps_it_as_a_target(accounts: Accounts) -> None:
    accounts.add_alias("ann@a.test", ["ann@a.test", "x@remote.test"])  # keep a copy, forward
    accounts.add_alias("team@a.test", ["ann@a.test"])
    assert accounts.delete_alias("ann@a.test") == []
    assert accounts.list_aliases() == {"team@a.test": ["ann@a.test"]}


def test_a_forward_of_a_user_does_not_let_its_target_send_as_them(accounts: Accounts) -> None:
    """ann keeps a copy and forwards to bob: bob gets ann's mail, not ann's address; a role
    alias still lets its members send as it."""
    accounts.add_alias("ann@a.test", ["ann@a.test", "bob@a.test"])
    accounts.add_alias("team@a.test", ["bob@a.test"])
    assert accounts.resolve("ann@a.test") == ["ann@a.test", "bob@a.test"]
    assert not accounts.owns("bob@a.test", "ann@a.test")
    assert accounts.owns("ann@a.test", "ann@a.test") and accounts.owns("bob@a.test", "team@a.test")


def test_user_del_is_one_transaction(accounts: Accounts, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user went at once and the aliases after it, each committed alone: a lock held by
    another connection (or a crash) in between left an alias naming a user that was gone."""
    from postroom.storage.local import accounts as accounts_module

    accounts.add_alias("sales@a.test", ["ann@a.test", "bob@a.test"])

    def locked(*_args: object) -> list[tuple[str, str]]:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(accounts_module, "_take_out", locked)
    with pytest.raises(sqlite3.OperationalError):
        accounts.delete_user(Address("ann", "a.test"))
    assert accounts.user_exists("ann@a.test")  # nothing of it was done
    assert accounts.list_aliases() == {"sales@a.test": ["ann@a.test", "bob@a.test"]}


def test_a_credential_changes_with_the_password_and_with_the_account(tmp_path: Path) -> None:
    # What an open SMTP session's login is checked against at each MAIL (policy.py).
    accounts = Accounts(tmp_path, ["a.test"])
    accounts.add_user(Address("ann", "a.test"), "first password")
    first = accounts.credential("ann@a.test")
    assert first is not None and first == accounts.credential("ann@a.test")
    accounts.set_password(Address("ann", "a.test"), "second password")
    second = accounts.credential("ann@a.test")
    assert second not in (None, first)
    accounts.delete_user(Address("ann", "a.test"))
    assert accounts.credential("ann@a.test") is None
    accounts.add_user(Address("ann", "a.test"), "first password")  # the same password again
    assert accounts.credential("ann@a.test") not in (None, first, second)


def test_the_decoy_secret_is_kept_with_the_store(tmp_path: Path) -> None:
    """SCRAM's made-up salt for a login without an account comes from it: made once and the
    same after a restart (it was made anew by every process)."""
    first = Accounts(tmp_path)
    tables = "SELECT name FROM sqlite_master WHERE type='table'"
    with sqlite3.connect(first.path) as db:  # made when needed: a CLI command writes nothing
        assert "secrets" not in {row[0] for row in db.execute(tables)}
    secret = first.decoy_secret
    first.close()
    again = Accounts(tmp_path)
    assert len(secret) == 32 and again.decoy_secret == secret
    assert Accounts(tmp_path / "other").decoy_secret != secret


def test_an_alias_of_a_retired_domain_hands_out_no_sender(tmp_path: Path) -> None:
    """After its domain left ``domains``, an alias still let its target send as it (MAIL
    FROM:<team@b.test> by ann@a.test, recheck3 probe)."""
    store = Accounts(tmp_path, ["a.test", "b.test"])
    store.add_user(Address("ann", "a.test"), "pw-long-enough")
    store.add_alias("team@b.test", ["ann@a.test"])
    assert store.owns("ann@a.test", "team@b.test")
    store.local_domains = ["a.test"]
    assert not store.owns("ann@a.test", "team@b.test")
    assert store.owns("ann@a.test", "ann@a.test")


def test_a_login_of_a_retired_domain_is_checked_as_an_unknown_users() -> None:
    """Its password was verified first and refused after: a right one, verified once and
    kept, came back sooner than any wrong one (recheck3 probe). Now the store is not asked."""
    import asyncio
    import contextlib
    import logging
    from types import SimpleNamespace
    from typing import Any

    from postroom.services import Services

    asked: list[str] = []

    def verify(login: str, password: str) -> str | None:
        asked.append(login)
        return login

    async def check(ip: str, login: str, password: str, verify: Any, failed: bool) -> Any:
        return verify(login, password)

    @contextlib.asynccontextmanager
    async def turn(ip: str) -> Any:
        yield

    throttle = SimpleNamespace(turn=turn, refused=lambda ip: False, failures=lambda ip: 0)
    services: Any = SimpleNamespace(
        throttle=throttle,
        password_checks=SimpleNamespace(check=check),
        accounts=SimpleNamespace(local_domains=frozenset({"a.test"}), verify_password=verify),
        log=logging.getLogger("test"),
    )
    services._in_service = lambda key: Services._in_service(services, key)
    for login, found in (("bob@b.test", None), ("ann@a.test", "ann@a.test")):
        assert asyncio.run(Services.check_password(services, "192.0.2.1", login, "pw")) == found
    assert asked == ["ann@a.test"]


def _age_scram_keys(db_path: Path, key: str, password: str, iterations: int) -> None:
    """Give ``key`` SCRAM keys of another iteration count, as an older version made them (one
    pair per form of the password, as today)."""
    forms = credentials._scram_forms(password, passwords.prepare(password))
    made = [derive_scram_keys(f, b"old-salt-16bytes", iterations) for f in forms]
    old = dataclasses.replace(
        made[0],
        stored_key=b"".join(k.stored_key for k in made),
        server_key=b"".join(k.server_key for k in made),
    )
    with sqlite3.connect(db_path) as db:
        db.execute(
            "UPDATE users SET scram_salt=?, scram_iterations=?, scram_stored_key=?,"
            " scram_server_key=? WHERE address=?",
            (old.salt, old.iterations, old.stored_key, old.server_key, key),
        )


def test_a_plain_login_renews_scram_keys_of_another_iteration_count(
    accounts: Accounts,
) -> None:
    """Accounts made when SCRAM used 600,000 rounds: Cyrus SASL clients refuse them, and
    unknown users' made-up keys have today's count, which told the two apart. The password
    of a plain login makes today's keys (only once); a wrong password changes nothing."""
    _age_scram_keys(accounts.path, "ann@a.test", "pw", 4096)
    assert accounts.verify_password("ann@a.test", "wrong") is None
    assert accounts.scram_keys("ann@a.test")[1].iterations == 4096  # type: ignore[index]
    assert accounts.verify_password("Ann@A.test", "pw") == "ann@a.test"
    found = accounts.scram_keys("ann@a.test")
    assert found is not None
    keys = found[1]
    assert keys.iterations == SCRAM_ITERATIONS and keys.salt != b"old-salt-16bytes"
    assert derive_scram_keys("pw", keys.salt).stored_key == keys.stored_key[:32]
    assert accounts.verify_password("ann@a.test", "pw") == "ann@a.test"
    assert accounts.scram_keys("ann@a.test") == found  # today's: left alone


def test_scram_keys_are_not_renewed_from_a_password_changed_since(accounts: Accounts) -> None:
    _age_scram_keys(accounts.path, "ann@a.test", "pw", 4096)
    found = accounts.scram_keys("ann@a.test")
    assert found is not None
    accounts.set_password(Address("ann", "a.test"), "new")
    now = accounts.scram_keys("ann@a.test")
    accounts._renew_scram("ann@a.test", found[1], "pw")  # verified before the change
    assert accounts.scram_keys("ann@a.test") == now


def test_scram_keys_of_a_password_with_several_forms_are_not_renewed(tmp_path: Path) -> None:
    """Made with "café" decomposed, logged in with it composed: the argon2 check takes both
    (RFC 8265 prepares to NFC), but keys made from the composed form locked out a client that
    hashes the decomposed one as typed (Cyrus SASL; recheck probe). Such keys are left."""
    store = Accounts(tmp_path, ["a.test"])
    typed = "cafe\u0301-secret"
    store.add_user(Address("ann", "a.test"), typed)
    _age_scram_keys(store.path, "ann@a.test", typed, 4096)
    before = store.scram_keys("ann@a.test")
    assert store.verify_password("ann@a.test", "caf\u00e9-secret") == "ann@a.test"
    assert store.verify_password("ann@a.test", typed) == "ann@a.test"
    assert store.scram_keys("ann@a.test") == before
    for name, given, typed in (
        ("bob", "two\u00a0words", "two words"),  # a no-break space: a space (RFC 8265 §4.2.1)
        ("cy", "ab\u212acd-1", "abKcd-1"),  # a Kelvin sign: NFC makes it a K (recheck2 probe)
    ):
        store.add_user(Address(name, "a.test"), given)
        _age_scram_keys(store.path, f"{name}@a.test", given, 4096)
        before = store.scram_keys(f"{name}@a.test")
        assert store.verify_password(f"{name}@a.test", typed) == f"{name}@a.test"
        assert store.scram_keys(f"{name}@a.test") == before
    # One with a single form, spaces and all, is the same string however it is typed.
    store.add_user(Address("dee", "a.test"), "two words")
    _age_scram_keys(store.path, "dee@a.test", "two words", 4096)
    assert store.verify_password("dee@a.test", "two words") == "dee@a.test"
    renewed = store.scram_keys("dee@a.test")
    assert renewed is not None and renewed[1].iterations == SCRAM_ITERATIONS


def test_a_store_damaged_under_a_running_server_refuses_logins_for_now_and_heals(
    tmp_path: Path,
) -> None:
    """Overwritten in place: AUTH ended without a reply (a traceback), and logins failed on
    after the file was put back, until a restart (the connection kept failing)."""
    store = Accounts(tmp_path, ["a.test"])
    store.add_user(Address("u", "a.test"), "secret pw")
    assert store.scram_keys("u@a.test") is not None
    path = tmp_path / "accounts.sqlite"
    store.close()
    with sqlite3.connect(path) as db:  # all of it in the file, none in the write-ahead log
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    original = path.read_bytes()
    path.write_bytes(bytes(range(256)) * (len(original) // 256 + 1))
    store.close()  # (this thread's pages are cached: as a thread that had not looked yet)
    for look in (
        lambda: store.scram_keys("u@a.test"),
        lambda: store.verify_password("u@a.test", "x"),
    ):
        with pytest.raises(PasswordUncheckable):
            look()
    store.close()
    with pytest.raises(TemporaryStorageError):
        store.resolve("u@a.test")  # RCPT: refused for now, not the session ended
    path.write_bytes(original)
    assert store.verify_password("u@a.test", "secret pw") == "u@a.test"
    assert store.resolve("u@a.test") == ["u@a.test"]  # the mended file, opened again
