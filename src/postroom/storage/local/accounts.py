"""The account store: users with argon2id password hashes (plus SCRAM keys) and aliases.

One SQLite file, ``{data_dir}/accounts.sqlite``, in WAL mode so that the CLI can write while a
running server reads: every lookup is a fresh query, so ``user add`` and ``alias add`` take
effect at once, without a restart. Addresses are stored in their :attr:`Address.key` form
(lower-cased, IDNA domain), so logins and lookups are case-insensitive. An alias ``@domain`` is
that domain's catch-all. Mail is only ever routed to a local address that has an account (or
to ``postmaster@``): alias targets are checked when added, users and aliases deleted are
taken out of every alias, and expansion skips a local target that has no account.

Passwords are kept as ``storage/credentials.py`` makes them: an argon2id hash, and for
SCRAM-SHA-256 (RFC 7677, RFC 5802) salt, iteration count, StoredKey and ServerKey, derived at
``user add``/``passwd`` time; they allow a login without the password being sent, never the
recovery of the password.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from postroom.address import Address
from postroom.errors import AccountError, PasswordUncheckable, TemporaryStorageError
from postroom.sasl import ScramKeys
from postroom.storage import aliases as alias_rules
from postroom.storage.aliases import account_address, alias_key
from postroom.storage.credentials import (
    LoginCache,
    login_key,
    make_credentials,
    make_scram_keys,
    scram_renewable,
)

__all__ = ["Accounts", "account_address", "alias_key"]

log = logging.getLogger("postroom")

CACHE_SIZE = 50_000
CACHE_MAX_AGE = 5.0  # seconds; a belt to the stat-signature braces

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    address TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    scram_salt BLOB NOT NULL,
    scram_iterations INTEGER NOT NULL,
    scram_stored_key BLOB NOT NULL,
    scram_server_key BLOB NOT NULL,
    created REAL NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS REAL))
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (alias, target)
);
"""


class Accounts(alias_rules.AliasLookups):
    """Users and aliases in ``accounts.sqlite``. Safe to share between threads."""

    def __init__(self, data_dir: Path, domains: Iterable[str] = ()) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._domains = frozenset(domains)
        self.path = data_dir / "accounts.sqlite"
        self._wal = data_dir / "accounts.sqlite-wal"
        self._cache: dict[str, list[str] | None] = {}
        self._cache_sig: tuple[int, ...] = ()
        self._cache_time = 0.0
        self._logins = LoginCache()
        self._local = threading.local()
        with self._db() as db:
            db.executescript(_SCHEMA)

    @functools.cached_property
    def decoy_secret(self) -> bytes:
        """See :class:`~postroom.storage.interfaces.AccountLookup`: made the first time the
        server needs it (a CLI command never writes it: the store may be read-only to it)."""
        query = "SELECT value FROM secrets WHERE name='scram-decoy'"
        with contextlib.suppress(sqlite3.OperationalError):  # no such table (yet)
            row = self._db().execute(query).fetchone()
            if row is not None:
                return bytes(row[0])
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB)")
            made = secrets.token_bytes(32)
            db.execute("INSERT OR IGNORE INTO secrets VALUES ('scram-decoy', ?)", (made,))
            return bytes(db.execute(query).fetchone()[0])

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction (the connection is in autocommit mode, where ``with db`` makes
        none): taken whole by every other connection, the server's included, or not at all."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _forget(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- users -----------------------------------------------------------------------------

    def add_user(self, address: Address, password: str) -> None:
        creds = make_credentials(password)
        keys = creds.scram
        try:
            with self._db() as db:
                db.execute(
                    "INSERT INTO users (address, password_hash, scram_salt, scram_iterations,"
                    " scram_stored_key, scram_server_key) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        address.key,
                        creds.password_hash,
                        keys.salt,
                        keys.iterations,
                        keys.stored_key,
                        keys.server_key,
                    ),
                )
        except sqlite3.IntegrityError:
            raise AccountError(f"user {address.key} already exists") from None

    def set_password(self, address: Address, password: str) -> None:
        creds = make_credentials(password)
        keys = creds.scram
        with self._db() as db:
            cur = db.execute(
                "UPDATE users SET password_hash=?, scram_salt=?, scram_iterations=?,"
                " scram_stored_key=?, scram_server_key=? WHERE address=?",
                (
                    creds.password_hash,
                    keys.salt,
                    keys.iterations,
                    keys.stored_key,
                    keys.server_key,
                    address.key,
                ),
            )
        if cur.rowcount == 0:
            raise AccountError(f"no such user {address.key}")

    def delete_user(self, address: Address) -> list[tuple[str, str]]:
        """Remove the user and take it out of every alias (:func:`_take_out`), in one
        transaction: no alias goes on delivering to a user that is gone."""
        key = address.key
        with self._transaction() as db:
            cur = db.execute("DELETE FROM users WHERE address=?", (key,))
            if cur.rowcount == 0:
                raise AccountError(f"no such user {key}")
            return _take_out(db, key)

    def list_users(self) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT address FROM users ORDER BY address")]

    def user_exists(self, key: str) -> bool:
        return self.credential(key) is not None

    def credential(self, key: str) -> str | None:
        with self._looked_up():
            return self._password_hash(key)

    @contextlib.contextmanager
    def _looked_up(self) -> Iterator[None]:
        """A server's look into the store (RCPT, MAIL): one that cannot be read now (damaged,
        replaced in place) is refused for now (TemporaryStorageError: 451), and this thread's
        connection is closed (it failed on after the file was mended)."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            self.close()
            raise TemporaryStorageError(f"the account store: {exc}") from None

    def verify_password(self, login: str, password: str) -> str | None:
        """The account key when ``password`` is right for ``login``; None otherwise.

        Costs one argon2 verification whether or not the user exists (no user enumeration by
        timing). Blocking and CPU-heavy: call it from a worker thread. A successful login is
        remembered (as an HMAC with a per-process secret, never the password) while the
        account's stored hash is unchanged, for at most ``LOGIN_CACHE_TIME``, as Dovecot's auth
        cache does: a mail client that logs in for every message costs one argon2 run, not one
        per message.
        """
        with self._readable():
            before = self.scram_keys(login)  # read first: a password changed after, not renewed
            key = self._logins.verify(login, password, self._password_hash)
        if key is not None and before is not None and before[0] == key:
            self._renew_scram(key, before[1], password)
        return key

    @contextlib.contextmanager
    def _readable(self) -> Iterator[None]:
        """A login's look into the store: one that cannot be read now (damaged, replaced in
        place) refuses the login for now (PasswordUncheckable: 454, ``[SYS/TEMP]``), where
        the session ended without a reply; and this thread's connection is closed, so that
        the next look opens the file again (mended, say: the old connection failed on)."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            self.close()
            raise PasswordUncheckable(f"the account store: {exc}") from None

    def _renew_scram(self, key: str, old: ScramKeys, password: str) -> None:
        """Give ``key`` SCRAM keys of today's iteration count when its, ``old``, are
        :func:`~postroom.storage.credentials.scram_renewable`, unless its password changed
        since they were read (a new one has a new salt). The login goes on whatever happens
        here."""
        if not scram_renewable(old, password):
            return
        keys = make_scram_keys(password, password)
        try:
            with self._db() as db:
                db.execute(
                    "UPDATE users SET scram_salt=?, scram_iterations=?, scram_stored_key=?,"
                    " scram_server_key=? WHERE address=? AND scram_salt=?",
                    (*_scram_row(keys), key, old.salt),
                )
        except sqlite3.Error as exc:
            log.warning("the SCRAM keys of %s could not be renewed: %s", key, exc)

    def _password_hash(self, key: str) -> str | None:
        row = (
            self._db().execute("SELECT password_hash FROM users WHERE address=?", (key,)).fetchone()
        )
        return None if row is None else str(row[0])

    def scram_keys(self, login: str) -> tuple[str, ScramKeys] | None:
        key = login_key(login)
        if key is None:
            return None
        with self._readable():
            row = (
                self._db()
                .execute(
                    "SELECT scram_salt, scram_iterations, scram_stored_key, scram_server_key"
                    " FROM users WHERE address=?",
                    (key,),
                )
                .fetchone()
            )
        if row is None:
            return None
        return key, ScramKeys(bytes(row[0]), int(row[1]), bytes(row[2]), bytes(row[3]))

    # -- aliases ---------------------------------------------------------------------------

    def add_alias(self, alias: str, targets: Iterable[str]) -> None:
        """Add ``targets`` to ``alias`` (a key, or ``@domain`` for a domain's catch-all),
        checked by :func:`~postroom.storage.aliases.check_targets` (AccountError naming a
        local target that is no user or alias)."""
        with self._transaction() as db:
            rows = alias_rules.check_targets(
                alias,
                targets,
                self._domains,
                self.user_exists,
                lambda key: bool(self.alias_targets(key)),
            )
            db.executemany(
                "INSERT OR IGNORE INTO aliases (alias, target) VALUES (?, ?)",
                [(alias, t) for t in rows],
            )

    def delete_alias(self, alias: str) -> list[tuple[str, str]]:
        """Remove the alias and, unless it is a user too, take it out of every alias (in one
        transaction)."""
        with self._transaction() as db:
            cur = db.execute("DELETE FROM aliases WHERE alias=?", (alias,))
            if cur.rowcount == 0:
                raise AccountError(f"no such alias {alias}")
            if db.execute("SELECT 1 FROM users WHERE address=?", (alias,)).fetchone():
                return []
            return _take_out(db, alias)

    def list_aliases(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for alias, target in self._db().execute(
            "SELECT alias, target FROM aliases ORDER BY alias, target"
        ):
            out.setdefault(alias, []).append(target)
        return out

    def alias_targets(self, key: str) -> list[str]:
        rows = self._db().execute("SELECT target FROM aliases WHERE alias=?", (key,))
        return [r[0] for r in rows]

    def _signature(self) -> tuple[int, ...]:
        """Changes whenever any connection (the CLI) commits: size and mtime of db and WAL."""
        sig: list[int] = []
        for path in (self.path, self._wal):
            try:
                st = os.stat(path)
                sig += (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                sig += (0, 0)
        return tuple(sig)

    def expand(self, key: str, max_depth: int = alias_rules.MAX_DEPTH) -> list[str] | None:
        """Resolve aliases recursively to final addresses (keys for local ones).

        None when ``key`` is neither a user nor an alias. An alias may also name itself as a
        target (keep a copy and forward), which ends the recursion there. An alias that only
        leads back to itself, or nests aliases deeper than ``max_depth``, expands to an empty
        list.
        Answers are cached until the store changes on disk (checked with two stat calls), so
        the RCPT hot path costs no SQL, and a change by the CLI is seen at once.
        """
        now = time.monotonic()
        sig = self._signature()
        if sig != self._cache_sig or now - self._cache_time > CACHE_MAX_AGE:
            self._cache.clear()
            self._cache_sig, self._cache_time = sig, now
        if key in self._cache:
            return self._cache[key]
        with self._looked_up():
            value = super().expand(key, max_depth)
        if len(self._cache) < CACHE_SIZE:
            self._cache[key] = value
        return value


def _scram_row(keys: ScramKeys) -> tuple[bytes, int, bytes, bytes]:
    return keys.salt, keys.iterations, keys.stored_key, keys.server_key


def _take_out(db: sqlite3.Connection, key: str) -> list[tuple[str, str]]:
    """Take ``key`` (gone) out of every alias that names it, and in turn every alias left with
    no target and no user of its name; the ``(target, alias)`` pairs taken out, in order."""
    removed: list[tuple[str, str]] = []
    gone = [key]
    while gone:
        target = gone.pop(0)
        names = [
            r[0]
            for r in db.execute(
                "SELECT DISTINCT alias FROM aliases WHERE target=? ORDER BY alias", (target,)
            )
        ]
        db.execute("DELETE FROM aliases WHERE target=?", (target,))
        for name in names:
            removed.append((target, name))
            if not db.execute(
                "SELECT 1 FROM aliases WHERE alias=? UNION ALL SELECT 1 FROM users WHERE address=?",
                (name, name),
            ).fetchone():
                gone.append(name)
    return removed
