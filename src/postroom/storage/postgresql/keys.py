"""DKIM keys in PostgreSQL, shared by every node: the ``KeyStore`` of ``auth/keys.py``.

The ``dkim_keys`` table holds what the local store keeps in ``keys.json`` and the PEM files:
one row per key with its state and times, and the private key (PKCS #8 PEM, which never reaches
a log). The key ring calls :meth:`PgKeyStore.load`, :meth:`~PgKeyStore.version` and
:meth:`~PgKeyStore.save` synchronously, at every signature for the first two: on a node they
are answered from an in-memory copy that the worker's watcher keeps fresh (a trigger NOTIFYs
``postroom_dkim`` with the domain), and a save, which is rare (first start, a key seen in DNS,
a key withdrawn or retired, ``dkim rotate``), is one transaction through a
:class:`~db.Door` (the event loop waits for that round trip). The CLI has no copy: it reads
the table each time.

Two nodes could change a domain's keys at once (both start for the first time, both see a new
key in DNS): a save compares the rows with those its caller loaded, under a per-domain advisory
lock, and writes nothing if another node changed them meanwhile. A node then takes the other's
keys (the same key ring rules ran there); the CLI reports the clash (exit 1), unless all it
wanted was a first pair (``postroom dns`` on a domain with no keys yet): then the other's pair
is the one it takes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import asyncpg

from postroom.auth.keys import DkimKey
from postroom.errors import KeysChanged
from postroom.storage.postgresql import db

log = logging.getLogger("postroom")

CHANNEL = "postroom_dkim"
_SELECT = (
    "SELECT domain, selector, algorithm, created, state, published, retire_at, private_pem"
    " FROM dkim_keys"
)

Fingerprint = tuple[tuple[str, float, str, float | None, float | None], ...]


def _key(r: asyncpg.Record) -> DkimKey:
    return DkimKey(
        selector=r["selector"],
        algorithm=r["algorithm"],
        created=r["created"],
        state=r["state"],
        published=r["published"],
        retire_at=r["retire_at"],
        private_pem=bytes(r["private_pem"]),
    )


def _fingerprint(keys: Iterable[DkimKey]) -> Fingerprint:
    return tuple(sorted((k.selector, k.created, k.state, k.published, k.retire_at) for k in keys))


def _lock(domain: str) -> int:
    digest = hashlib.sha256(f"dkim\0{domain}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PgKeyStore:
    """The shared key store (:class:`~postroom.auth.keys.KeyStore`). ``live``: a node's, with a
    copy kept by the watcher; otherwise the CLI's, reading the table each time."""

    channel = CHANNEL

    def __init__(self, url: str, live: bool) -> None:
        self.url = url
        self.live = live
        self._door: db.Door | None = None
        self._copy: dict[str, list[DkimKey]] = {}
        self._versions: dict[str, int] = {}
        self._seen: dict[str, Fingerprint] = {}  # what load() last gave, per domain
        self._pending: set[str] = set()

    def door(self) -> db.Door:
        if self._door is None:
            self._door = db.Door(self.url, "postroom-keys")
        return self._door

    def close(self) -> None:
        if self._door is not None:
            self._door.close()
            self._door = None

    # -- KeyStore ---------------------------------------------------------------------------

    def load(self, domain: str) -> list[DkimKey]:
        if self.live:
            keys = list(self._copy.get(domain, ()))
        else:
            rows = self.door().call(
                lambda c: c.fetch(_SELECT + " WHERE domain=$1 ORDER BY created, selector", domain)
            )
            keys = [_key(r) for r in rows]
        self._seen[domain] = _fingerprint(keys)
        return keys

    def version(self, domain: str) -> object:
        if self.live:
            return self._versions.get(domain, 0)
        return _fingerprint(self.load(domain))

    def save(self, domain: str, keys: list[DkimKey]) -> None:
        expected = self._seen.get(domain, ())

        async def run(conn: asyncpg.Connection) -> list[DkimKey] | None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock(domain))
                rows = await conn.fetch(_SELECT + " WHERE domain=$1", domain)
                now = [_key(r) for r in rows]
                if _fingerprint(now) != expected:
                    return now
                await conn.execute(
                    "DELETE FROM dkim_keys WHERE domain=$1 AND NOT selector = ANY($2::text[])",
                    domain,
                    [k.selector for k in keys],
                )
                await conn.executemany(
                    "INSERT INTO dkim_keys (domain, selector, algorithm, created, state,"
                    " published, retire_at, private_pem) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    " ON CONFLICT (domain, selector) DO UPDATE SET algorithm = EXCLUDED.algorithm,"
                    " created = EXCLUDED.created, state = EXCLUDED.state,"
                    " published = EXCLUDED.published, retire_at = EXCLUDED.retire_at,"
                    " private_pem = EXCLUDED.private_pem",
                    [
                        (
                            domain,
                            k.selector,
                            k.algorithm,
                            k.created,
                            k.state,
                            k.published,
                            k.retire_at,
                            k.private_pem,
                        )
                        for k in keys
                    ],
                )
            return None

        clash = self.door().call(run)
        if clash is None:
            self._set(domain, list(keys))
            return
        if not self.live:
            raise KeysChanged(f"the DKIM keys of {domain} changed meanwhile; run the command again")
        log.info("DKIM keys of %s were changed by another node: taking those", domain)
        self._set(domain, clash)

    def _set(self, domain: str, keys: list[DkimKey]) -> None:
        self._seen[domain] = _fingerprint(keys)
        if self.live:
            self._copy[domain] = sorted(keys, key=lambda k: (k.created, k.selector))
            self._versions[domain] = self._versions.get(domain, 0) + 1

    # -- the watcher's subscriber -------------------------------------------------------------

    def notified(self, payload: str) -> bool:
        self._pending.add(payload)
        return True

    async def load_all(self, conn: asyncpg.Connection) -> None:
        self._pending.clear()
        rows = await conn.fetch(_SELECT + " ORDER BY domain, created, selector")
        found: dict[str, list[DkimKey]] = {}
        for r in rows:
            found.setdefault(r["domain"], []).append(_key(r))
        for domain in set(found) | set(self._copy):
            self._replace(domain, found.get(domain, []))

    async def refresh(self, conn: asyncpg.Connection) -> None:
        domains, self._pending = self._pending, set()
        rows = await conn.fetch(
            _SELECT + " WHERE domain = ANY($1::text[]) ORDER BY created, selector", list(domains)
        )
        found: dict[str, list[DkimKey]] = {}
        for r in rows:
            found.setdefault(r["domain"], []).append(_key(r))
        for domain in domains:
            self._replace(domain, found.get(domain, []))

    def _replace(self, domain: str, keys: list[DkimKey]) -> None:
        if _fingerprint(keys) != _fingerprint(self._copy.get(domain, ())):
            self._copy[domain] = keys
            self._versions[domain] = self._versions.get(domain, 0) + 1
