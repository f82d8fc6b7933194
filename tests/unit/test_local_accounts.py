"""The SQLite account store's alias clean-up: what ``user del`` and ``alias del`` take out."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from postroom.address import Address
from postroom.errors import AccountError
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
