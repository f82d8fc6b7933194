"""Users and aliases in PostgreSQL: the admin side (writes) and each node's live copy (reads).

The tables (``users``, ``aliases``; see ``migrations.py``) hold the same as the local SQLite
store: argon2id hashes, SCRAM keys, alias rows, ``@DOMAIN`` catch-alls, with the same rules
(``storage/aliases.py``, ``storage/credentials.py``). Writes go to the database:
:class:`PgAccounts` (the CLI, from any node) runs each change in one transaction, and checks
there what must hold at commit (a local alias target exists; ``user del`` takes the user out of
every alias).

Lookups happen per RCPT and per login, in code that is synchronous (the SMTP policy, SASL), so
a node answers them from memory: :class:`LiveAccounts` is a subscriber of the worker's
:class:`~postroom.storage.postgresql.db.Watcher`: it loads both tables at start, hears on
``postroom_accounts`` which key changed (a trigger names it) and reads that key again, and
loads everything again now and then. A change made on any node is seen by every node within
milliseconds; while PostgreSQL is away a node keeps answering from its last copy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import asyncpg

from postroom.address import Address
from postroom.errors import AccountError, StorageUnavailable
from postroom.sasl import ScramKeys
from postroom.storage import aliases as alias_rules
from postroom.storage.credentials import (
    LoginCache,
    login_key,
    make_credentials,
    make_scram_keys,
    password_matches,
    scram_renewable,
)
from postroom.storage.postgresql import db, migrations

log = logging.getLogger("postroom")

CHANNEL = "postroom_accounts"

INSERT_USER = (
    "INSERT INTO users (address, password_hash, scram_salt, scram_iterations,"
    " scram_stored_key, scram_server_key) VALUES ($1, $2, $3, $4, $5, $6)"
)
_SELECT_DECOY = "SELECT value FROM secrets WHERE name = 'scram-decoy'"
_SELECT_USERS = (
    "SELECT address, password_hash, scram_salt, scram_iterations, scram_stored_key,"
    " scram_server_key FROM users"
)


class UserRow(NamedTuple):
    password_hash: str
    scram: ScramKeys


def _user_row(r: asyncpg.Record) -> UserRow:
    keys = ScramKeys(
        bytes(r["scram_salt"]),
        int(r["scram_iterations"]),
        bytes(r["scram_stored_key"]),
        bytes(r["scram_server_key"]),
    )
    return UserRow(r["password_hash"], keys)


def _credential_row(address: Address, password: str) -> tuple[object, ...]:
    """The values of a users row (in INSERT_USER's order) for a new password."""
    creds = make_credentials(password)
    s = creds.scram
    return (address.key, creds.password_hash, s.salt, s.iterations, s.stored_key, s.server_key)


# -- the admin side: one transaction per change ------------------------------------------------


class PgAccounts(alias_rules.AliasLookups):
    """The account store as the CLI sees it (:class:`~postroom.storage.interfaces.AccountStore`,
    every call a query: the CLI makes a few)."""

    def __init__(self, url: str, domains: Iterable[str]) -> None:
        self._domains = frozenset(domains)
        self._db = db.Door(url)
        try:
            self._db.call(migrations.migrate)  # "user add" works before the first serve
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def add_user(self, address: Address, password: str) -> None:
        row = _credential_row(address, password)

        async def run(conn: asyncpg.Connection) -> None:
            try:
                await conn.execute(INSERT_USER, *row)
            except asyncpg.UniqueViolationError:
                raise AccountError(f"user {address.key} already exists") from None

        self._db.call(run)

    def set_password(self, address: Address, password: str) -> None:
        row = _credential_row(address, password)
        status = self._db.call(
            lambda conn: conn.execute(
                "UPDATE users SET password_hash=$2, scram_salt=$3, scram_iterations=$4,"
                " scram_stored_key=$5, scram_server_key=$6 WHERE address=$1",
                *row,
            )
        )
        if status == "UPDATE 0":
            raise AccountError(f"no such user {address.key}")

    def delete_user(self, address: Address) -> list[tuple[str, str]]:
        """Remove the user and take it out of every alias (:func:`_take_out`), in one
        transaction; the ``(target, alias)`` pairs taken out."""

        async def run(conn: asyncpg.Connection) -> list[tuple[str, str]]:
            async with conn.transaction():
                status = await conn.execute("DELETE FROM users WHERE address=$1", address.key)
                if status == "DELETE 0":
                    raise AccountError(f"no such user {address.key}")
                return await _take_out(conn, address.key)

        return self._db.call(run)

    def list_users(self) -> list[str]:
        rows = self._db.call(lambda c: c.fetch("SELECT address FROM users ORDER BY address"))
        return [r["address"] for r in rows]

    def user_exists(self, key: str) -> bool:
        return self.credential(key) is not None

    def credential(self, key: str) -> str | None:
        found = self._db.call(
            lambda c: c.fetchval("SELECT password_hash FROM users WHERE address=$1", key)
        )
        return None if found is None else str(found)

    def add_alias(self, alias: str, targets: Iterable[str]) -> None:
        """Add ``targets`` to ``alias`` (a key, or ``@domain`` for a domain's catch-all), in
        one transaction, checked by :func:`~postroom.storage.aliases.check_targets`."""
        wanted = [alias_rules.target_key(t, self._domains) for t in targets]

        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                # Serialise with user del, which could take a target away before the commit.
                await conn.execute("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
                users = {
                    r["address"]
                    for r in await conn.fetch(
                        "SELECT address FROM users WHERE address = ANY($1::text[])", wanted
                    )
                }
                aliases = {
                    r["alias"]
                    for r in await conn.fetch(
                        "SELECT DISTINCT alias FROM aliases WHERE alias = ANY($1::text[])", wanted
                    )
                }
                rows = alias_rules.check_targets(
                    alias, wanted, self._domains, users.__contains__, aliases.__contains__
                )
                await conn.executemany(
                    "INSERT INTO aliases (alias, target) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    [(alias, t) for t in rows],
                )

        self._db.call(run)

    def delete_alias(self, alias: str) -> list[tuple[str, str]]:
        """Remove the alias and, unless it is a user too, take it out of every alias."""

        async def run(conn: asyncpg.Connection) -> list[tuple[str, str]]:
            async with conn.transaction():
                # Serialise with alias add, which could name the alias before the commit.
                await conn.execute("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
                status = await conn.execute("DELETE FROM aliases WHERE alias=$1", alias)
                if status == "DELETE 0":
                    raise AccountError(f"no such alias {alias}")
                if await conn.fetchval("SELECT 1 FROM users WHERE address=$1", alias):
                    return []
                return await _take_out(conn, alias)

        return self._db.call(run)

    def list_aliases(self) -> dict[str, list[str]]:
        rows = self._db.call(
            lambda c: c.fetch("SELECT alias, target FROM aliases ORDER BY alias, target")
        )
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r["alias"], []).append(r["target"])
        return out

    def alias_targets(self, key: str) -> list[str]:
        rows = self._db.call(
            lambda c: c.fetch("SELECT target FROM aliases WHERE alias=$1 ORDER BY target", key)
        )
        return [r["target"] for r in rows]

    def _user(self, login: str) -> tuple[str | None, UserRow | None]:
        key = login_key(login)
        if key is None:
            return None, None
        row = self._db.call(lambda c: c.fetchrow(_SELECT_USERS + " WHERE address=$1", key))
        return key, None if row is None else _user_row(row)

    # The lookups of the servers (the alias ones from AliasLookups), one query each: the CLI's
    # view; a node uses LiveAccounts.

    def verify_password(self, login: str, password: str) -> str | None:
        key, row = self._user(login)
        ok = password_matches(row.password_hash if row else None, password)
        return key if ok else None

    def scram_keys(self, login: str) -> tuple[str, ScramKeys] | None:
        key, row = self._user(login)
        return None if key is None or row is None else (key, row.scram)

    @property
    def decoy_secret(self) -> bytes:
        return bytes(self._db.call(lambda c: c.fetchval(_SELECT_DECOY)))


# -- the node side: an in-memory copy kept fresh -----------------------------------------------


class LiveAccounts(alias_rules.AliasLookups):
    """One worker's copy of the users and aliases
    (:class:`~postroom.storage.interfaces.AccountLookup`): every lookup is answered from
    memory. A :class:`~postroom.storage.postgresql.db.Watcher` subscriber."""

    channel = CHANNEL

    def __init__(self, domains: Iterable[str], url: str) -> None:
        self._domains = frozenset(domains)
        self._url = url
        self._door: db.Door | None = None  # made for the rare write: SCRAM keys renewed
        self._renewing = threading.Lock()  # held while one renewal runs (in a thread)
        self._users: dict[str, UserRow] = {}
        self._aliases: dict[str, tuple[str, ...]] = {}
        self.version = 0  # changes with every change applied (the login cache's key)
        self._logins = LoginCache()
        self._pending: set[str] = set()
        self.decoy_secret = b""  # the store's, from load_all (before the node serves)

    def close(self) -> None:
        """The watcher owns the connection that reads; the one that wrote goes."""
        if self._door is not None:
            self._door.close()
            self._door = None

    # -- keeping it fresh (called by the watcher) ------------------------------------------

    def notified(self, payload: str) -> bool:
        self._pending.add(payload)
        return True

    async def load_all(self, conn: asyncpg.Connection) -> None:
        self._pending.clear()  # what is notified from here on is read again afterwards
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            users = await conn.fetch(_SELECT_USERS)
            rows = await conn.fetch("SELECT alias, target FROM aliases ORDER BY alias, target")
            self.decoy_secret = bytes(await conn.fetchval(_SELECT_DECOY))
        aliases: dict[str, list[str]] = {}
        for r in rows:
            aliases.setdefault(r["alias"], []).append(r["target"])
        self._users = {r["address"]: _user_row(r) for r in users}
        self._aliases = {k: tuple(v) for k, v in aliases.items()}
        self.version += 1

    async def refresh(self, conn: asyncpg.Connection) -> None:
        keys, self._pending = self._pending, set()
        users = [k[1:] for k in keys if k.startswith("u")]
        alias_keys = [k[1:] for k in keys if k.startswith("a")]
        if users:
            rows = await conn.fetch(_SELECT_USERS + " WHERE address = ANY($1::text[])", users)
            found = {r["address"]: _user_row(r) for r in rows}
            for key in users:
                if key in found:
                    self._users[key] = found[key]
                else:
                    self._users.pop(key, None)
        if alias_keys:
            rows = await conn.fetch(
                "SELECT alias, target FROM aliases WHERE alias = ANY($1::text[])"
                " ORDER BY alias, target",
                alias_keys,
            )
            targets: dict[str, list[str]] = {}
            for r in rows:
                targets.setdefault(r["alias"], []).append(r["target"])
            for key in alias_keys:
                if key in targets:
                    self._aliases[key] = tuple(targets[key])
                else:
                    self._aliases.pop(key, None)
        self.version += 1

    # -- lookups (synchronous, from memory) ------------------------------------------------

    def user_exists(self, key: str) -> bool:
        return key in self._users

    def credential(self, key: str) -> str | None:
        row = self._users.get(key)
        return None if row is None else row.password_hash

    def alias_targets(self, key: str) -> Sequence[str]:
        return self._aliases.get(key, ())

    def list_users(self) -> list[str]:
        return sorted(self._users)

    def list_aliases(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in sorted(self._aliases.items())}

    def verify_password(self, login: str, password: str) -> str | None:
        """The account key when ``password`` is right for ``login``; None otherwise. One
        argon2 verification whether or not the user exists; CPU-heavy: call it from a thread."""
        name = login_key(login)
        before = None if name is None else self._users.get(name)  # as the local store's
        key = self._logins.verify(login, password, self.credential)
        if key is not None and before is not None:
            self._renew_scram(key, before.scram, password)
        return key

    def _renew_scram(self, key: str, old: ScramKeys, password: str) -> None:
        """As the local store's: new SCRAM keys for ``key`` if its, ``old``, are of another
        iteration count than today's and its password did not change since; every node
        hears of it. In a thread of its own, one at a time (a later login renews the next):
        in the login's, a PostgreSQL that did not answer held every login of the node for
        the write's time-out, one after another."""
        if not scram_renewable(old, password) or not self._renewing.acquire(blocking=False):
            return
        args = (key, old, password)
        threading.Thread(target=self._renew, args=args, name="postroom-scram", daemon=True).start()

    def _renew(self, key: str, old: ScramKeys, password: str) -> None:
        try:
            keys = make_scram_keys(password, password)
            if self._door is None:
                self._door = db.Door(self._url, "postroom-accounts")
            self._door.call(
                lambda c: c.execute(
                    "UPDATE users SET scram_salt=$2, scram_iterations=$3, scram_stored_key=$4,"
                    " scram_server_key=$5 WHERE address=$1 AND scram_salt=$6",
                    key,
                    *(keys.salt, keys.iterations, keys.stored_key, keys.server_key),
                    old.salt,
                )
            )
        except (StorageUnavailable, asyncpg.PostgresError) as exc:
            log.warning("the SCRAM keys of %s could not be renewed: %s", key, exc)
        finally:
            self._renewing.release()

    def scram_keys(self, login: str) -> tuple[str, ScramKeys] | None:
        key = login_key(login)
        row = None if key is None else self._users.get(key)
        return None if key is None or row is None else (key, row.scram)


async def _take_out(conn: asyncpg.Connection, key: str) -> list[tuple[str, str]]:
    """Take ``key`` (gone) out of every alias that names it, and in turn every alias left with
    no target and no user of its name; the ``(target, alias)`` pairs taken out, in order."""
    removed: list[tuple[str, str]] = []
    gone = [key]
    while gone:
        target = gone.pop(0)
        rows = await conn.fetch("DELETE FROM aliases WHERE target=$1 RETURNING alias", target)
        for name in sorted({r["alias"] for r in rows}):
            removed.append((target, name))
            left = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM aliases WHERE alias=$1)"
                " OR EXISTS (SELECT 1 FROM users WHERE address=$1)",
                name,
            )
            if not left:
                gone.append(name)
    return removed
