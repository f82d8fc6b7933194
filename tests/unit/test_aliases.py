"""The alias expansion rule (pure): recursion, self-reference, loops, catch-all, postmaster."""

from __future__ import annotations

from postroom.storage.aliases import expand, owns

USERS = {"ann@a.test", "bob@a.test"}


def resolve(table: dict[str, list[str]], key: str, catch_all: bool = True) -> list[str] | None:
    return expand(key, lambda k: table.get(k, []), USERS.__contains__, catch_all=catch_all)


def test_users_aliases_and_nothing() -> None:
    table = {"team@a.test": ["sales@a.test", "bob@a.test"], "sales@a.test": ["ann@a.test"]}
    assert resolve(table, "ann@a.test") == ["ann@a.test"]
    assert resolve(table, "team@a.test") == ["ann@a.test", "bob@a.test"]
    assert resolve(table, "nobody@a.test") is None


def test_self_reference_keeps_a_copy_and_loops_end_empty() -> None:
    table = {
        "ann@a.test": ["ann@a.test", "x@remote.test"],
        "l1@a.test": ["l2@a.test"],
        "l2@a.test": ["l1@a.test"],
    }
    assert resolve(table, "ann@a.test") == ["ann@a.test", "x@remote.test"]
    assert resolve(table, "l1@a.test") == []  # refused by the caller (alias loop)


def test_catch_all_takes_the_rest_but_not_postmaster_nor_sending() -> None:
    table = {"@a.test": ["bob@a.test"]}
    assert resolve(table, "whoever@a.test") == ["bob@a.test"]
    assert resolve(table, "ann@a.test") == ["ann@a.test"]
    assert resolve(table, "postmaster@a.test") is None
    assert resolve(table, "whoever@b.test") is None
    assert not owns("bob@a.test", "whoever@a.test", resolve(table, "whoever@a.test", False))
    assert owns("bob@a.test", "bob@a.test", None)
