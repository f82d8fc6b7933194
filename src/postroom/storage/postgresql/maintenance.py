"""The ``postroom db`` commands: migrate, check, and import a local node's data.

``check`` reports whether PostgreSQL answers (and which server it is), the schema version and
the migrations still pending; it succeeds only when the database is reachable and current.
``import`` copies what a single node keeps under its ``data_dir`` into the database: users
(their argon2id hashes and SCRAM keys as they are, so every password keeps working), aliases,
and every Maildir's messages with the UIDL the node's POP3 gave them (so mail clients do not
fetch them again) and their seen flag. It can be run again: what is there already is skipped.
The local queue is not imported: let the single node empty it first (``postroom queue list``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import asyncpg

from postroom.errors import PostroomError, TemporaryStorageError
from postroom.storage.local import files
from postroom.storage.postgresql import db, migrations
from postroom.storage.postgresql.accounts import INSERT_USER
from postroom.wire.framing import to_crlf

log = logging.getLogger("postroom")

IMPORT_BATCH = 200


def migrate(url: str) -> list[str]:
    """Apply pending migrations; one line per step applied, or one saying none were."""
    conn = db.Door(url)
    try:
        done = conn.call(migrations.migrate)
        version = conn.call(migrations.current_version)
    finally:
        conn.close()
    if not done:
        return [f"schema is up to date (version {version})"]
    return [f"applied {m.version}: {m.name}" for m in done]


def check(url: str) -> tuple[bool, list[str]]:
    """(ok, report lines): reachable, at the latest version, nothing pending."""
    try:
        conn = db.Door(url)
    except TemporaryStorageError as exc:
        return False, [f"connection: failed ({exc})"]
    try:
        server = conn.call(lambda c: c.fetchval("SHOW server_version"))
        lines = [f"connection: ok (PostgreSQL {server})"]
        version = conn.call(migrations.current_version)
        lines.append(f"schema version: {version} (this postroom: {migrations.LATEST})")
        try:
            todo = conn.call(migrations.pending)
        except migrations.SchemaError as exc:
            return False, [*lines, f"pending: ? ({exc})"]
    except (TemporaryStorageError, asyncpg.PostgresError) as exc:
        return False, [f"connection: failed ({exc})"]
    finally:
        conn.close()
    if todo:
        lines += [f"pending: {m.version}: {m.name}" for m in todo]
        lines.append("run: postroom db migrate (or start a node, which migrates)")
        return False, lines
    return True, [*lines, "pending: none"]


# -- import ---------------------------------------------------------------------------------


def _mail_files(data_dir: Path) -> Iterator[_Source]:
    """Every message in ``data_dir/mail/DOMAIN/LOCAL`` as the node's POP3 listed it: the same
    UIDLs (those kept from Dovecot, two files of one name told apart) and only regular files
    (a link there may point at the server's TLS key; a FIFO would hang the import)."""
    from postroom.blocking import BlockingPool
    from postroom.storage.local.maildrop import MaildirMaildrop

    mail = data_dir / "mail"
    if not mail.is_dir():
        return
    io = BlockingPool(1)
    for domain in sorted(os.listdir(mail)):
        if not (mail / domain).is_dir():
            continue
        for local in sorted(os.listdir(mail / domain)):
            box = mail / domain / local
            if not all((box / subdir).is_dir() for subdir in ("cur", "new")):
                continue
            for f in MaildirMaildrop(box, io).listing():
                yield f"{local}@{domain}", f.subdir, str(box / f.subdir / f.name), f.uid


_Source = tuple[str, str, str, str]  # mailbox key, subdir, path, UIDL
MessageRow = tuple[str, str, int, str, bytes]


def _message_row(key: str, subdir: str, path: str, uidl: str) -> MessageRow | None:
    """The row of one message, None if it is no longer a regular file."""
    try:
        data = files.read_regular(path, follow_links=False)
    except FileNotFoundError:
        return None
    except OSError as exc:  # no regular file, or a link put there since the listing, say
        log.warning("%s left out: %s", path, exc)
        return None
    body = to_crlf(data)
    if body and not body.endswith(b"\n"):
        body += b"\r\n"  # RFC 1939 §3: as the node's RETR sent it
    name = os.path.basename(path)
    flags_text = name.split(":2,", 1)[1] if subdir == "cur" and ":2," in name else ""
    return key, uidl, len(body), "".join(sorted(set(flags_text))), body


def _batches(items: Iterable[_Source]) -> Iterator[list[_Source]]:
    batch: list[_Source] = []
    for item in items:
        batch.append(item)
        if len(batch) >= IMPORT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def import_local(url: str, data_dir: Path, domains: Iterable[str]) -> list[str]:
    """Copy accounts, aliases and Maildirs of a local ``data_dir``; a summary, line by line."""
    local_domains = set(domains)
    store = data_dir / "accounts.sqlite"
    users: list[tuple[object, ...]] = []
    alias_rows: list[tuple[str, str]] = []
    decoy: bytes | None = None
    if store.exists():
        src = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        try:
            users = src.execute(
                "SELECT address, password_hash, scram_salt, scram_iterations,"
                " scram_stored_key, scram_server_key FROM users"
            ).fetchall()
            alias_rows = src.execute("SELECT alias, target FROM aliases").fetchall()
            with contextlib.suppress(sqlite3.OperationalError):  # (none made yet)
                found = src.execute("SELECT value FROM secrets WHERE name='scram-decoy'")
                decoy = next((bytes(row[0]) for row in found), None)
        finally:
            src.close()
    elif not (data_dir / "mail").is_dir():
        raise PostroomError(f"{data_dir}: no accounts.sqlite and no mail/ to import")
    conn = db.Door(url)
    try:
        conn.call(migrations.migrate)

        async def put_accounts(c: asyncpg.Connection) -> tuple[int, int]:
            async with c.transaction():
                before = await c.fetchval("SELECT count(*) FROM users")
                if decoy is not None and before == 0:
                    # The users' made-up SCRAM salts go on as they were: new ones, beside
                    # the real ones kept, told anyone who had asked before who exists.
                    await c.execute("UPDATE secrets SET value=$1 WHERE name='scram-decoy'", decoy)
                await c.executemany(
                    INSERT_USER + " ON CONFLICT DO NOTHING",
                    [(u[0], u[1], bytes(u[2]), int(u[3]), bytes(u[4]), bytes(u[5])) for u in users],  # type: ignore[call-overload]
                )
                after = await c.fetchval("SELECT count(*) FROM users")
                aliases_before = await c.fetchval("SELECT count(*) FROM aliases")
                await c.executemany(
                    "INSERT INTO aliases (alias, target) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    alias_rows,
                )
                aliases_after = await c.fetchval("SELECT count(*) FROM aliases")
            return int(after - before), int(aliases_after - aliases_before)

        added_users, added_aliases = conn.call(put_accounts)
        stored = skipped = 0
        for batch in _batches(_mail_files(data_dir)):
            rows = [row for item in batch if (row := _message_row(*item)) is not None]

            async def put(c: asyncpg.Connection, rows: list[MessageRow] = rows) -> int:
                n = 0
                async with c.transaction():
                    for row in rows:
                        status = await c.execute(
                            "INSERT INTO messages (mailbox, uidl, size, flags, body)"
                            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                            *row,
                        )
                        n += status == "INSERT 0 1"
                return n

            n = conn.call(put, rows)
            stored += n
            skipped += len(rows) - n
    finally:
        conn.close()
    lines_keys = _import_keys(url, data_dir, sorted(local_domains))
    outside = sorted({str(u[0]) for u in users} - {""})
    outside = [u for u in outside if u.rpartition("@")[2] not in local_domains]
    lines = [
        f"users: {added_users} added ({len(users) - added_users} there already)",
        f"alias targets: {added_aliases} added ({len(alias_rows) - added_aliases} there already)",
        f"messages: {stored} added ({skipped} there already)",
    ]
    lines += lines_keys
    if outside:
        lines.append(f"note: users of domains not in this config: {', '.join(map(str, outside))}")
    return lines


def _import_keys(url: str, data_dir: Path, domains: list[str]) -> list[str]:
    """The DKIM keys of ``data_dir``, for each domain the database has none of yet: the
    records published for the single node go on matching."""
    from postroom.auth.keys import LocalKeyStore
    from postroom.storage.postgresql.keys import PgKeyStore

    local, shared = LocalKeyStore(data_dir), PgKeyStore(url, live=False)
    lines = []
    try:
        for domain in domains:
            keys = local.load(domain)
            if not keys:
                continue
            if shared.load(domain):
                lines.append(f"dkim keys of {domain}: the database has its own, kept")
                continue
            shared.save(domain, keys)
            lines.append(f"dkim keys of {domain}: {len(keys)} added")
    finally:
        shared.close()
    return lines
