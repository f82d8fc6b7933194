"""Accounts on a real PostgreSQL: the CLI's writes, and a node's live copy seeing them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from postroom.address import Address
from postroom.errors import AccountError
from postroom.sasl import SCRAM_ITERATIONS, derive_scram_keys
from postroom.storage.postgresql import db
from postroom.storage.postgresql.accounts import LiveAccounts, PgAccounts
from tests.pgnode import until

DOMAINS = ("a.test", "b.test")


def addr(text: str) -> Address:
    local, _, domain = text.partition("@")
    return Address(local, domain)


@pytest.fixture
def admin(pg_url: str) -> Iterator[PgAccounts]:
    store = PgAccounts(pg_url, DOMAINS)  # applies the migrations
    yield store
    store.close()


async def watched(url: str) -> tuple[LiveAccounts, db.Watcher]:
    """A node's live copy, loaded by a watcher of its own."""
    live = LiveAccounts(DOMAINS, url)
    watcher = db.Watcher(url, [live])
    await watcher.start()
    return live, watcher


def test_admin_users_and_passwords(admin: PgAccounts) -> None:
    admin.add_user(addr("Ann@a.test"), "pw1")
    with pytest.raises(AccountError, match="already exists"):
        admin.add_user(addr("ann@a.test"), "pw2")
    assert admin.user_exists("ann@a.test")
    assert admin.list_users() == ["ann@a.test"]
    admin.set_password(addr("ann@a.test"), "pw2")
    with pytest.raises(AccountError, match="no such user"):
        admin.set_password(addr("bob@a.test"), "x")
    with pytest.raises(AccountError, match="no such user"):
        admin.delete_user(addr("bob@a.test"))


def test_alias_targets_must_exist_and_user_del_cleans_aliases(admin: PgAccounts) -> None:
    admin.add_user(addr("ann@a.test"), "pw")
    with pytest.raises(AccountError, match=r"target nobody@a\.test is no user or alias here"):
        admin.add_alias("sales@a.test", ["ann@a.test", "nobody@a.test"])
    assert admin.list_aliases() == {}  # all or nothing
    admin.add_alias("sales@a.test", ["ann@a.test", "x@remote.test"])
    admin.add_alias("team@a.test", ["sales@a.test", "ann@a.test"])  # an alias is fine
    admin.add_alias("@b.test", ["ann@a.test"])  # catch-all
    assert admin.alias_targets("sales@a.test") == ["ann@a.test", "x@remote.test"]
    assert admin.delete_user(addr("ann@a.test")) == [
        ("ann@a.test", "@b.test"),
        ("ann@a.test", "sales@a.test"),
        ("ann@a.test", "team@a.test"),
    ]
    assert admin.list_aliases() == {
        "sales@a.test": ["x@remote.test"],
        "team@a.test": ["sales@a.test"],
    }
    admin.add_alias("all@a.test", ["team@a.test"])
    assert admin.delete_alias("sales@a.test") == [
        ("sales@a.test", "team@a.test"),
        ("team@a.test", "all@a.test"),  # team is left with no target: gone too
    ]
    assert admin.list_aliases() == {}
    with pytest.raises(AccountError, match="no such alias"):
        admin.delete_alias("team@a.test")


def test_live_copy_sees_every_change_within_a_second(pg_url: str, admin: PgAccounts) -> None:
    admin.add_user(addr("ann@a.test"), "old")

    async def main() -> None:
        live, watcher = await watched(pg_url)
        try:
            assert live.user_exists("ann@a.test")
            assert live.verify_password("ANN@a.test", "old") == "ann@a.test"
            old = live.credential("ann@a.test")
            assert old is not None and old == admin.credential("ann@a.test")
            await asyncio.to_thread(admin.add_user, addr("bob@a.test"), "pw")
            await until(lambda: live.user_exists("bob@a.test"))
            await asyncio.to_thread(admin.set_password, addr("ann@a.test"), "new")
            await until(lambda: live.verify_password("ann@a.test", "new") == "ann@a.test")
            assert live.credential("ann@a.test") not in (None, old)  # (open sessions: 530)
            assert live.verify_password("ann@a.test", "old") is None  # the cache forgot it
            await asyncio.to_thread(admin.add_alias, "sales@a.test", ["bob@a.test"])
            await until(lambda: live.expand("sales@a.test") == ["bob@a.test"])
            assert live.owns("bob@a.test", "sales@a.test")
            await asyncio.to_thread(admin.delete_user, addr("bob@a.test"))
            await until(lambda: not live.user_exists("bob@a.test"))
            await until(lambda: live.expand("sales@a.test") is None)
            assert live.resolve("sales@a.test") is None
            found = live.scram_keys("ann@a.test")
            assert found is not None
            keys = found[1]
            assert derive_scram_keys("new", keys.salt, keys.iterations) == keys
        finally:
            await watcher.close()

    asyncio.run(main())


def test_catch_all_and_postmaster(pg_url: str, admin: PgAccounts) -> None:
    admin.add_user(addr("ann@a.test"), "pw")
    admin.add_alias("@a.test", ["ann@a.test"])

    async def main() -> None:
        live, watcher = await watched(pg_url)
        try:
            assert live.resolve("whoever@a.test") == ["ann@a.test"]
            assert live.resolve("postmaster@a.test") == ["postmaster@a.test"]  # not the catch-all
            assert live.resolve("whoever@b.test") is None
            assert not live.owns("ann@a.test", "whoever@a.test")  # no sending as anyone
        finally:
            await watcher.close()

    asyncio.run(main())


def test_live_copy_reloads_after_losing_its_connection(
    pg_url: str, admin: PgAccounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "RECONNECT_DELAY", 0.05)

    async def main() -> None:
        live, watcher = await watched(pg_url)
        try:
            other = await asyncpg.connect(pg_url)
            # Kill the listener, then change something while it is away: no notification
            # reaches it, the full load after reconnecting must bring the change.
            killed = await other.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'postroom-watch' AND datname = current_database()"
            )
            assert killed == 1
            await asyncio.to_thread(admin.add_user, addr("late@a.test"), "pw")
            await other.close()
            await until(lambda: live.user_exists("late@a.test"), timeout=3)
        finally:
            await watcher.close()

    asyncio.run(main())


def test_start_fails_when_postgresql_is_away() -> None:
    async def main() -> None:
        await watched("postgresql://postgres@127.0.0.1:1/none")

    with pytest.raises(Exception, match="PostgreSQL"):
        asyncio.run(main())


def test_every_node_has_the_stores_decoy_secret(admin: PgAccounts, pg_url: str) -> None:
    """SCRAM's made-up salt for a login without an account comes from a secret of the store:
    two nodes (and a node after a restart) must hold the same one, or comparing their
    answers tells who has an account."""

    async def two_nodes() -> tuple[bytes, bytes]:
        first, w1 = await watched(pg_url)
        second, w2 = await watched(pg_url)
        await w1.close()
        await w2.close()
        return first.decoy_secret, second.decoy_secret

    one, two = asyncio.run(two_nodes())
    assert len(one) == 32 and one == two == admin.decoy_secret


def test_a_plain_login_renews_old_scram_keys_for_every_node(admin: PgAccounts, pg_url: str) -> None:
    """As the local store's: SCRAM keys of another iteration count are made again from the
    password of a plain login on one node, and every node has the new ones."""
    admin.add_user(addr("ann@a.test"), "pw")
    old = derive_scram_keys("pw", b"old-salt-16bytes", 4096)
    admin._db.call(
        lambda c: c.execute(
            "UPDATE users SET scram_salt=$1, scram_iterations=$2, scram_stored_key=$3,"
            " scram_server_key=$4",
            *(old.salt, old.iterations, old.stored_key, old.server_key),
        )
    )

    async def main() -> None:
        one, w1 = await watched(pg_url)
        two, w2 = await watched(pg_url)
        try:
            assert two.scram_keys("ann@a.test") == ("ann@a.test", old)
            assert await asyncio.to_thread(one.verify_password, "ann@a.test", "pw")
            await until(lambda: two.scram_keys("ann@a.test") != ("ann@a.test", old))
            found = two.scram_keys("ann@a.test")
            assert found is not None and found[1].iterations == SCRAM_ITERATIONS
            assert derive_scram_keys("pw", found[1].salt).server_key == found[1].server_key[:32]
        finally:
            one.close()
            await w1.close()
            await w2.close()

    asyncio.run(main())


def test_a_renewal_never_holds_a_login_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The renewal wrote in the login's own thread: with PostgreSQL frozen every login of the
    node waited for the write's time-out (60 s), one after another (recheck probe). It runs
    in a thread of its own now, one at a time."""
    import threading
    import time

    from postroom.storage.credentials import make_credentials
    from postroom.storage.postgresql import accounts as accounts_module
    from postroom.storage.postgresql.accounts import UserRow

    calls: list[str] = []
    release = threading.Event()

    class FrozenDoor:
        def __init__(self, url: str, name: str) -> None:
            pass

        def call(self, fn: object, *args: object) -> None:
            calls.append("call")
            release.wait(10)

        def close(self) -> None:
            pass

    monkeypatch.setattr(accounts_module.db, "Door", FrozenDoor)
    live = LiveAccounts(DOMAINS, "postgresql://x@127.0.0.1:1/db")
    made = make_credentials("pw")
    old = derive_scram_keys("pw", b"old-salt-16bytes", 4096)
    live._users = {"ann@a.test": UserRow(made.password_hash, old)}
    started = time.monotonic()
    assert live.verify_password("ann@a.test", "pw") == "ann@a.test"
    assert live.verify_password("ann@a.test", "pw") == "ann@a.test"  # (one renewal at a time)
    assert time.monotonic() - started < 5
    release.set()
    deadline = time.monotonic() + 10
    while live._renewing.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == ["call"]
